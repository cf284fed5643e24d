"""Which model the "Localize anomalies" panel runs: picked by hand, or preselected by a guess.

When an image is selected, a worker guesses its modality (:func:`guess_in_worker`) and the panel
preselects a model of that modality (:func:`~napari_vaeloc.models.choice.choose_model`, as
``vaeloc localize --model auto`` does), unless a model is picked by hand meanwhile (``_picks``
counts those) or no modality is recognised; a new selection makes older guesses stale
(``_guess_token``). A run started meanwhile waits for the guess's preparation and reuses it
when it prepares the scan the same way, else it stops the guess (it prepares the scan itself).
While the guess runs, the progress bar is busy (:data:`GUESS_LABEL`). The model line shows the
model and what the guess found.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from napari.utils.notifications import show_error

from ._widget_controller import TOOLTIPS
from ._widget_layers import scan_inputs
from ._widget_run import live, start_worker
from .io import Volume
from .models.choice import ModalityGuess, choose_model
from .prepare import too_thin

#: the model list's entry that asks for a model folder
FOLDER_CHOICE = "__folder__"
#: the progress bar's label while the modality guess prepares the scan
GUESS_LABEL = "checking the scan (brain extraction, registration)…"


#: the modality guess, which runs before any click, looks at a block-averaged copy of a scan
#: with more voxels than this (a 1 mm head has 8.5 million; preparing a 600x600x400 scan
#: for the guess took 36 s and 5.4 GB, wasted when the run then scores it as given)
GUESS_MAX_VOXELS = 1 << 24


def coarse_copy(volume: Volume, max_voxels: int | None = None) -> Volume:
    """``volume`` itself when it has at most ``max_voxels`` voxels (default
    :data:`GUESS_MAX_VOXELS`), else a copy averaged over
    blocks of f x f x f voxels (the smallest integer f that brings it under the limit; the
    last partial blocks are left out), with the affine of the blocks' centres, float32."""
    max_voxels = GUESS_MAX_VOXELS if max_voxels is None else max_voxels
    n = int(np.prod(volume.shape, dtype=np.int64))
    if n <= max_voxels or len(volume.shape) != 3:
        return volume
    f = int(np.ceil((n / max_voxels) ** (1 / 3)))
    shape = tuple(s // f for s in volume.shape)
    data = np.asarray(volume.data)[: shape[0] * f, : shape[1] * f, : shape[2] * f]
    blocks = data.reshape(shape[0], f, shape[1], f, shape[2], f)
    coarse = blocks.mean(axis=(1, 3, 5), dtype=np.float32)
    affine = np.array(volume.affine, dtype=np.float64)
    affine[:3, 3] += affine[:3, :3] @ np.full(3, (f - 1) / 2)  # the first block's centre
    affine[:3, :3] *= f
    return Volume.from_array(coarse, affine)


def guess_in_worker(inputs: dict, cancel: Callable[[], bool]) -> ModalityGuess:
    """Runs in a worker thread: the modality the scan looks like and its correlation with that
    modality's template (prepared once per scan content, then cached; a very large scan is
    looked at block-averaged, :func:`coarse_copy`)."""
    from .models.choice import guess_modality

    vol = Volume.from_array(
        inputs["data"], inputs["affine"], header=inputs["header"], path=inputs["path"],
        missing=inputs.get("missing"),
    )  # fmt: skip
    return guess_modality(coarse_copy(vol), cancel=cancel)


class GuessMixin:
    """The model part of :class:`~napari_vaeloc._widget.LocalizeWidget`: the model list, the
    model line and the modality guess. It uses the panel's controls and state (``image``,
    ``model``, ``model_info``, ``session``, ``_folders``, ...)."""

    def _init_guess(self) -> None:
        """The model list's and the guess's state (before the panel is laid out)."""
        self._folders: dict[str, str] = {}  # choice value -> model folder
        self._last_model = ""
        self._model_guard = False  # set while the panel itself changes the model box
        self._picks = 0  # models chosen by hand (a modality guess never overrides one)
        self._guess_worker: Any = None
        self._guess_token = 0  # results of older guesses are ignored
        self._guess_cancel = threading.Event()
        self._guess: dict[str, Any] | None = None  # the modality guess's state for the label
        self._model_text = ""
        self._bar_before: tuple[str, int, int] | None = None  # the bar the guess's busy bar hid

    def _model_choices(self, _widget: Any = None) -> list[tuple[str, str]]:
        return [(n, n) for n in self._folders] + [("load from folder…", FOLDER_CHOICE)]

    def add_model_folder(self, folder: str | Path) -> bool:
        """Offer a model folder in the model list and select it; False (and a notification)
        when it is not a model folder."""
        from .errors import ModelError
        from .models.store import read_card

        try:
            card = read_card(folder)
        except ModelError as exc:
            show_error(str(exc))
            return False
        key = f"{card.name} ({Path(folder).name})" if card.name in self._folders else card.name
        self._folders[key] = str(folder)
        self._picked_by_hand()
        self._model_guard = True
        try:
            self.model.reset_choices()
            self.model.value = key
        finally:
            self._model_guard = False
        self._describe_model()
        return True

    def _on_model_changed(self, *_: Any) -> None:
        if self._model_guard:
            return
        if self.model.value == FOLDER_CHOICE:
            from qtpy.QtWidgets import QFileDialog

            folder = QFileDialog.getExistingDirectory(self.native, "Model folder")
            if not (folder and self.add_model_folder(folder)):
                self._model_guard = True
                try:
                    last = self._last_model if self._last_model in self._folders else None
                    self.model.value = last
                finally:
                    self._model_guard = False
            return
        self._picked_by_hand()
        self._describe_model()

    def _picked_by_hand(self) -> None:
        self._picks += 1
        if self._guess is not None:
            self._guess["chosen"] = None

    def _describe_model(self) -> None:
        self._show_fit()  # a fit line of another model's run is hidden
        self._show_threshold_info()  # names the result's model when it is another
        value = self.model.value
        if value is None or value == FOLDER_CHOICE:
            self._model_text = "no model: load one from a folder"
            self._show_model_info(None)
            return
        self._last_model = value
        card = self._card()
        if card is None:
            return
        cal = "calibrated" if card.calibration else "uncalibrated (thresholds relative to the scan)"
        axes = " + ".join(card.defaults.fused_axes(str(card.axis), self._card_quiet))
        if card.defaults.fuses:
            axes += " fused"
        self._model_text = f"{card.modality}, {axes}; {cal}"
        self._show_model_info(card)
        self.model_info.tooltip = (
            f"{TOOLTIPS['model_info']}\n{card.provenance.description}\n{card.provenance.sources}"
        )
        if self.session is None:
            self.restore_defaults()

    def _show_model_info(self, card: Any = None) -> None:
        """The model's line, with what the modality guess found under it."""
        line = self._guess_line(card)
        self.model_info.value = self._model_text + (f"\n{line}" if line else "")

    def _guess_line(self, card: Any) -> str:
        g = self._guess
        if g is None:
            return ""
        if g["state"] == "running":
            return "checking which modality the scan looks like…"
        if g["state"] == "stopped":
            return (
                "modality not checked before the run (it started first); "
                "the fit line says what the run found"
            )
        if g["state"] == "failed":
            return f"could not tell the scan's modality ({g['message']}); model left as it is"
        guess: ModalityGuess = g["guess"]
        modality, looks = guess.modality, guess.describe()
        if modality is None:
            return f"{looks}; model left as it is"
        if g["chosen"] is not None and g["chosen"] == self.model.value:
            return f"{modality} model chosen: {looks}"
        if card is not None and str(card.modality).lower() != modality.lower():
            return f"{looks}, but this model learned {card.modality} scans"
        if not g["found"]:
            return f"{looks}; no {modality} model with a template is loaded"
        return looks

    # ---------------------------------------------------------------- modality guess
    @property
    def guessing(self) -> bool:
        """True while the modality of the selected image is being guessed."""
        return self._guess_worker is not None

    def _start_guess(self, *_: Any) -> None:
        """Guess the selected image's modality in a worker and preselect a model for it (unless
        a model is picked by hand meanwhile); a new selection makes older guesses stale."""
        from napari.qt.threading import create_worker

        self._stop_guess()
        self._guess = None
        layer = self.image.value
        inputs = None
        if layer is not None:
            try:
                inputs = scan_inputs(layer, self._volume_index(layer))
            except ValueError:
                inputs = None
        if inputs is None or too_thin(inputs["shape"]):
            self._show_model_info(self._card_quiet(self.model.value))
            return
        token, picks, cancel = self._guess_token, self._picks, threading.Event()
        self._guess_cancel = cancel
        self._guess = {"state": "running"}
        self._show_model_info(self._card_quiet(self.model.value))
        connect = {
            "returned": lambda out: self._on_guess(token, picks, out),
            "errored": lambda exc: self._on_guess_error(token, exc),
            "finished": lambda: self._on_guess_finished(token),
        }
        self._guess_worker = create_worker(
            guess_in_worker, inputs, cancel.is_set, _start_thread=False, _connect=connect
        )
        self._show_guess_busy()
        start_worker(self._guess_worker)

    def _stop_guess(self, *_: Any) -> None:
        """Cancel the running guess and ignore whatever it still returns."""
        self._guess_token += 1
        self._guess_cancel.set()
        self._guess_worker = None
        self._clear_guess_busy()

    def _show_guess_busy(self) -> None:
        """A busy progress bar labelled :data:`GUESS_LABEL` while the guess runs (the guess's
        preparation reports no fraction done), unless a run or an export owns the bar."""
        if self.running or self.exporting:
            return
        bar = self.progress
        if bar.label != GUESS_LABEL:
            self._bar_before = (bar.label, bar.max, bar.value)
        bar.value, bar.max = 0, 0
        bar.label = GUESS_LABEL

    def _clear_guess_busy(self) -> None:
        """The guess ended or was stopped: give the bar back as it was before it (unless a run
        or an export has taken it over since)."""
        if self.closed or self.progress.label != GUESS_LABEL:
            return
        label, maximum, value = self._bar_before or ("", 1, 0)
        self.progress.max = max(maximum, 1)
        self.progress.value, self.progress.label = value, label

    def _stop_guess_for_run(self, same_preparation: bool) -> None:
        """A run starts. When it prepares the scan as the guess does (``same_preparation``: the
        same scan, not block-averaged, in "auto" mode), a running guess goes on and the run
        waits for its preparation and reuses it (:func:`~napari_vaeloc.prepare.prepare_cached`);
        the guess then only reports the modality, it no longer changes the model. Otherwise
        it stops (the scan is not prepared twice at once) and the model line says the modality
        was not checked."""
        if not self.guessing:
            return
        if same_preparation:
            self._picks += 1  # the run's model stays: as if picked by hand
            return
        self._stop_guess()
        self._guess = {"state": "stopped"}
        self._show_model_info(self._card_quiet(self.model.value))

    @staticmethod
    def guess_prepares_as_run(mode: str, shape: tuple[int, ...]) -> bool:
        """Whether the guess prepares a scan of ``shape`` as a run in ``mode`` does (the same
        scan, settings and template space: the bundled templates share one)."""
        return mode == "auto" and int(np.prod(shape, dtype=np.int64)) <= GUESS_MAX_VOXELS

    @live
    def _on_guess(self, token: int, picks: int, guess: ModalityGuess) -> None:
        if token != self._guess_token:
            return  # another image was selected meanwhile
        chosen, changed = None, False
        if guess.modality is None:
            found = False  # no modality recognised: the model stays as it is
        elif picks == self._picks:  # no model picked by hand since the guess started
            cards = {name: self._card_quiet(name) for name in self._folders}
            chosen = choose_model(guess.modality, cards, self.model.value)
            found = chosen is not None
            if chosen is not None and chosen != self.model.value:
                self._model_guard = True
                try:
                    self.model.value = chosen
                finally:
                    self._model_guard = False
                changed = True
        else:
            found = True  # not looked for: the model was chosen by hand
        self._guess = {"state": "done", "guess": guess, "chosen": chosen, "found": found}
        if changed:
            self._describe_model()  # as for a model chosen from the list: its defaults too
        else:
            self._show_model_info(self._card_quiet(self.model.value))

    @live
    def _on_guess_error(self, token: int, exc: BaseException) -> None:
        from .errors import Cancelled

        if token != self._guess_token or isinstance(exc, Cancelled):
            return
        message = str(exc) if str(exc) else type(exc).__name__
        self._guess = {"state": "failed", "message": message}
        self._show_model_info(self._card_quiet(self.model.value))

    def _on_guess_finished(self, token: int) -> None:
        if token == self._guess_token:
            self._guess_worker = None
            self._clear_guess_busy()

    def _card_quiet(self, name: str | None) -> Any:
        """The model card of a listed model, or None (no notification)."""
        from .errors import ModelError
        from .models.store import read_card

        folder = self._folders.get(name or "")
        if folder is None:
            return None
        try:
            return read_card(folder)
        except ModelError:
            return None

    def _card(self) -> Any:
        from .errors import ModelError
        from .models.store import read_card

        folder = self._folders.get(self.model.value or "")
        if folder is None:
            return None
        try:
            return read_card(folder)
        except ModelError as exc:
            show_error(str(exc))
            return None
