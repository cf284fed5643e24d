"""Which model scores a scan when none is named: the main model of the modality the scan looks
like. ``vaeloc localize --model auto`` (the default) and the napari panel's preselection both
decide with :func:`choose_model` on a :func:`guess_modality`.

The modality is read from the preparation's modality check (:mod:`napari_vaeloc.prepare`): the
scan is prepared against the first bundled template (cached, so the run that follows reuses it)
and correlated with every bundled template inside the brain. A best correlation below
:data:`~napari_vaeloc.prepare.MIN_MODALITY_R` ``["fail"]`` recognises no modality (a binary
mask, noise, a scan that is no brain MRI).

This module sits above :mod:`napari_vaeloc.prepare` in the layering (it runs a preparation),
although it lives in the ``models`` package; nothing in ``models`` imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..io import Volume
    from ..prepare import PreparationReport, PrepareSettings
    from .card import ModelCard


@dataclass(frozen=True)
class ModalityGuess:
    """What a scan looks like.

    Attributes:
        modality: the modality recognised ("T1", "T2", ...), None when no template correlates
            at least ``floor``.
        best: the modality whose template correlates best ("" when none could be compared).
        r: that correlation (Pearson, inside the brain on the template's grid).
        floor: the least correlation that recognises a modality.
        report: the preparation's steps and checks.
    """

    modality: str | None
    best: str
    r: float
    floor: float
    report: PreparationReport

    @classmethod
    def from_report(cls, report: PreparationReport) -> ModalityGuess:
        """The guess a preparation's modality scores (``report.modality_scores``) give."""
        from ..prepare import MIN_MODALITY_R

        scores = report.modality_scores
        best = max(scores, key=scores.get) if scores else ""
        r = float(scores[best]) if scores else 0.0
        floor = MIN_MODALITY_R["fail"]
        return cls(best if best and r >= floor else None, best, r, floor, report)

    @property
    def weak(self) -> bool:
        """True when a modality is recognised but its template correlates less than a clear
        fit needs (``prepare.MIN_MODALITY_R["ok"]``, where the preparation's modality check
        warns): another modality (FLAIR, PD) or a scan unlike every template."""
        from ..prepare import MIN_MODALITY_R

        return self.modality is not None and self.r < MIN_MODALITY_R["ok"]

    def describe(self) -> str:
        """One phrase: "the scan looks like T1 (r = 0.58)", "the scan looks only weakly like
        T2 (r = 0.32; a clear fit is 0.40 or more)", or "no known modality recognised (best
        r = 0.11, T2; at least 0.25 needed)"."""
        from ..prepare import MIN_MODALITY_R

        if self.weak:
            return (
                f"the scan looks only weakly like {self.modality} (r = {self.r:.2f}; a clear "
                f"fit is {MIN_MODALITY_R['ok']:.2f} or more)"
            )
        if self.modality is not None:
            return f"the scan looks like {self.modality} (r = {self.r:.2f})"
        best = f", {self.best}" if self.best else ""
        return (
            f"no known modality recognised (best r = {self.r:.2f}{best}; at least "
            f"{self.floor:.2f} needed)"
        )


def guess_modality(
    volume: Volume,
    settings: PrepareSettings | None = None,
    *,
    stage: Callable[[str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> ModalityGuess:
    """Prepare ``volume`` against the first bundled template (with ``settings``, default
    "auto"; cached by :func:`~napari_vaeloc.prepare.prepare_cached`, so a run with the same
    settings and any bundled model reuses it) and read which modality it looks like. A clear
    misfit is not refused here: the run that follows refuses it with its own model.

    Raises:
        InputError: no bundled model ships a template, or the scan cannot be prepared (too
            coarse, no brain found, ...).
        Cancelled: ``cancel`` returned True.
    """
    from ..errors import InputError
    from ..prepare import bundled_templates, prepare_cached

    templates = bundled_templates()
    if not templates:
        raise InputError("no bundled model ships a template to compare the scan with")
    prepared = prepare_cached(volume, templates[0], settings, stage=stage, cancel=cancel,
                              templates=templates, refuse=False)  # fmt: skip
    return ModalityGuess.from_report(prepared.report)


def main_model(card: ModelCard | None, modality: str) -> bool:
    """True for a model that learned ``modality`` and ships a template to prepare scans with
    (the companions of other slicing axes ship none)."""
    if card is None or str(card.modality).lower() != modality.lower():
        return False
    return bool(getattr(card.preprocessing, "template", None))


def choose_model(
    modality: str | None, cards: Mapping[str, Any], current: str | None = None
) -> str | None:
    """The model for a scan that looks like ``modality``: ``current`` when it is a main model of
    that modality (:func:`main_model`), else the first such model in ``cards`` (name -> model
    card or None, bundled first); None when there is none or no modality was recognised."""
    if modality is None:
        return None
    if current is not None and main_model(cards.get(current), modality):
        return current
    return next((name for name, card in cards.items() if main_model(card, modality)), None)


def bundled_cards() -> dict[str, ModelCard]:
    """Name -> card of every bundled model, in :func:`~.store.bundled_models` order."""
    from .store import bundled_models, read_card

    return {name: read_card(folder) for name, folder in bundled_models().items()}
