"""The typed model card: everything needed to use a model besides its weights (``model.json``).

This module is the only place that knows the card's JSON key names. A card is made of typed parts:

- :class:`Architecture`: the network (``config()`` of :mod:`.vae`) and its likelihood;
- :class:`Preprocessing`: slicing axis, intensity normalisation, modality;
- :class:`Calibration`: healthy-voxel statistics per map and the combined map's FPR table;
- :class:`PostProcessingDefaults`: the combination the plugin starts from;
- :class:`Provenance`: description, sources, licence, training record, versions.

Loading validates every field's type and refuses unknown or missing keys with a message that names
the field; saving writes the same JSON (sorted keys, indent 2), so load -> save is byte-identical.
"""

from __future__ import annotations

import json
import math
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ModelError
from ..mapnames import AXES
from ..preprocess import Normalisation

FORMAT_VERSION = 1


def _check(value: Any, hint: Any, where: str) -> Any:
    """Validate ``value`` against the type ``hint``; nested card parts are built. Numbers keep
    their JSON type (an int in a float field stays an int), so a round trip is byte-identical."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check(value, inner[0], where)
    if hint is Any:
        return value
    if isinstance(hint, type) and hasattr(hint, "_card_keys"):
        return hint.from_dict(value, where)
    if hint is Normalisation:
        if not isinstance(value, dict):
            raise ModelError(f"{where} must be an object, not {type(value).__name__}")
        try:
            return Normalisation.from_dict(value)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{where}: {exc}") from exc
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ModelError(f"{where} must be a number, not {value!r}")
        if not math.isfinite(value):
            raise ModelError(f"{where} must be finite, not {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ModelError(f"{where} must be true or false, not {value!r}")
        return value
    if hint in (int, str):
        if isinstance(value, bool) or not isinstance(value, hint):
            kind = "an integer" if hint is int else "a string"
            raise ModelError(f"{where} must be {kind}, not {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ModelError(f"{where} must be a list, not {type(value).__name__}")
        (item,) = typing.get_args(hint) or (Any,)
        return [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ModelError(f"{where} must be an object, not {type(value).__name__}")
        _, item = typing.get_args(hint) or (str, Any)
        return {k: _check(v, item, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"no check for {hint!r}")  # a programming error, not bad input


def _dump(value: Any) -> Any:
    if hasattr(type(value), "_card_keys"):
        return value.to_dict()
    if isinstance(value, Normalisation):
        return value.to_dict()
    if isinstance(value, list):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    return value


class _Part:
    """Shared load/save of a card part: JSON key = field name unless ``_card_keys`` maps it;
    optional fields (default None) are left out of the JSON when None."""

    _card_keys: typing.ClassVar[dict[str, str]] = {}
    _required: typing.ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_dict(cls, d: Any, where: str = "model card") -> Any:
        if not isinstance(d, dict):
            raise ModelError(f"{where} must be an object, not {type(d).__name__}")
        hints = typing.get_type_hints(cls)
        keys = {f.name: cls._card_keys.get(f.name, f.name) for f in fields(cls) if f.init}
        unknown = sorted(set(d) - set(keys.values()))
        if unknown:
            raise ModelError(
                f"{where} has unknown field(s) {', '.join(unknown)}; "
                f"expected {', '.join(sorted(keys.values()))}"
            )
        kwargs = {}
        for f in fields(cls):
            key = keys.get(f.name)
            if key is None:
                continue
            if key not in d:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise ModelError(f"{where} lacks the field {key!r}")
                continue
            kwargs[f.name] = _check(d[key], hints[f.name], f"{where}.{key}")
        obj = cls(**kwargs)
        obj.validate(where)
        return obj

    def validate(self, where: str) -> None:
        """Checks beyond types; raise :class:`ModelError` naming the field."""

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None and f.default is None:
                continue
            out[self._card_keys.get(f.name, f.name)] = _dump(v)
        return out


@dataclass
class Architecture(_Part):
    """The network: ``type`` "conv" (widths, in_channels, out_channels: None for the same as
    in_channels) or "mlp" (hidden); square inputs of ``image_size`` pixels; ``z_dim`` latent
    dimensions."""

    type: str
    image_size: int
    z_dim: int
    in_channels: int | None = None
    out_channels: int | None = None
    widths: list[int] | None = None
    hidden: int | None = None

    def validate(self, where: str) -> None:
        if self.type not in ("conv", "mlp"):
            raise ModelError(
                f"bad architecture: {where}.type must be conv or mlp, not {self.type!r}"
            )
        if self.image_size < 4 or self.z_dim < 1:
            raise ModelError(f"bad architecture: {where} needs image_size >= 4 and z_dim >= 1")

    def config(self) -> dict:
        """The ``build_model`` configuration."""
        return self.to_dict()


@dataclass
class Preprocessing(_Part):
    """How a scan is brought to the model: the slicing ``axis`` it was trained on, the intensity
    normalisation, the modality it learned (e.g. "T2"), and the template whose space it learned
    (``template``, ``template_brain_mask``: NIfTI file names inside the model folder, at the
    model's working resolution; None for a model without one, which scans cannot be registered
    to). ``neighbours``: slices on each side of a slice that the model also sees, as extra
    input channels (:func:`napari_vaeloc.preprocess.with_neighbours`; 0: the slice alone).
    ``intensity_excess``: the engine adds to the ``restoration`` map how far each voxel's
    intensity lies beyond the template's healthy range (docs/engine.md; kept where it wins on
    the individual benchmark: the bundled ``t1-brain``)."""

    axis: str = "axial"
    normalisation: Normalisation = field(default_factory=Normalisation)
    modality: str = "T2"
    template: str | None = None
    template_brain_mask: str | None = None
    neighbours: int = 0
    intensity_excess: bool = False

    def validate(self, where: str) -> None:
        if self.axis not in AXES:
            raise ModelError(f"{where}.axis must be one of {', '.join(AXES)}, not {self.axis!r}")
        if self.neighbours < 0:
            raise ModelError(f"{where}.neighbours must be 0 or more, not {self.neighbours}")

    def to_dict(self) -> dict:
        out = super().to_dict()
        if not self.neighbours:  # a one-slice model's card keeps the layout it always had
            out.pop("neighbours", None)
        if not self.intensity_excess:
            out.pop("intensity_excess", None)
        return out


@dataclass
class Calibration(_Part):
    """Statistics of every map on healthy foreground voxels.

    Attributes:
        scales: map -> the value a map is divided by before combining (its healthy 99th
            percentile, model units).
        percentiles: map -> {percentile: value}.
        kl_grad_scale: the KL-Grad scale the engine uses for the Combi map.
        combined_fpr: healthy false-positive rate (as a string key, e.g. "0.001") -> threshold
            of the default combined map; calibrated for ``combined_weights``,
            ``combined_smoothing_mm`` and ``combined_scan_normalise``.
        combined_dice: healthy false-positive rate -> pooled Dice of the default mask at that
            level on lesions seeded into held-out healthy volumes, when the default level was
            chosen that way (:mod:`napari_vaeloc.training.operating_point`), over
            ``combined_dice_cases`` lesioned copies.
        combined_smoothing_scores: smoothing sigma (mm, as a string) -> average precision plus
            mean Dice per case on lesions seeded into held-out healthy individuals, when the
            default smoothing was chosen that way
            (:func:`napari_vaeloc.training.operating_point.choose_smoothing`).
        combined_outline_scores: candidate outline ("combined/0.4": on the combined map at
            0.4 of a part's peak; "0/0.3": on the unsmoothed map at 0.3) -> mean Dice per case
            on lesions seeded into held-out healthy individuals, when the default outline was
            chosen that way (:func:`napari_vaeloc.training.operating_point.choose_outline`).
        combined_healthy_scans: file name -> sha256 of the healthy scans calibrated on next
            to the held-out individuals (``vaeloc calibrate --healthy-scans``).
        mask_fpr: the fraction of the held-out healthy brain voxels the default mask marks
            (threshold, outline and minimum size applied) on brains its levels were not set
            on: each brain's mask with the levels read from the other brains' table (leave one
            out; with one brain, as ``mask_fpr_calibration``). The rate the default mask
            claims, above the threshold's own rate when parts are outlined below it.
        mask_fpr_calibration: the same fraction with the levels set on all of them (the
            brains the claim would otherwise be measured on).
        smoothing_fpr: smoothing sigma (mm, as a string, e.g. "3") -> {fpr: threshold}: the
            false-positive tables of the same combination (``combined_weights``,
            ``combined_scan_normalise``) at smoothings other than ``combined_smoothing_mm``,
            read from the same healthy brains, so that a smoothing other than the default
            still has calibrated levels (:meth:`fpr_table`).
        combined_beyond_template: True when the held-out brains of the false-positive table
            were scored beyond the template's brain too (``vaeloc calibrate
            --beyond-template``), kept by a later recalibration unless told otherwise.
        heldout_ventricles_mm: how far (mm, the largest draw) the held-out synthetic
            individuals' ventricles were grown for this calibration when the training record
            grew them less (``vaeloc calibrate --ventricles``); None: as trained.
        individual_lesions: one [lesion volume in ml, 1 when the default mask marked part of
            it else 0] per intensity and tumour lesion seeded into the real individual
            anatomy of the individual benchmark (``vaeloc evaluate individual --card-out``),
            localized with the card's defaults; what an empty mask can miss
            (:func:`napari_vaeloc.combine.missed_lesions`). A recalibration drops it.
        individual_source: the benchmark run that measured ``individual_lesions``.
    """

    scales: dict[str, float] = field(default_factory=dict)
    kl_grad_scale: float = 1.0
    percentiles: dict[str, dict[str, float]] | None = None
    n_pixels: int | None = None
    source: str | None = None
    combined_fpr: dict[str, float] | None = None
    combined_weights: dict[str, float] | None = None
    combined_smoothing_mm: float | None = None
    combined_scan_normalise: bool | None = None
    combined_source: str | None = None
    combined_dice: dict[str, float] | None = None
    combined_dice_cases: int | None = None
    combined_smoothing_scores: dict[str, float] | None = None
    combined_outline_scores: dict[str, float] | None = None
    combined_healthy_scans: dict[str, str] | None = None
    mask_fpr: float | None = None
    mask_fpr_calibration: float | None = None
    smoothing_fpr: dict[str, dict[str, float]] | None = None
    combined_beyond_template: bool | None = None
    heldout_ventricles_mm: float | None = None
    individual_lesions: list[list[float]] | None = None
    individual_source: str | None = None

    def validate(self, where: str) -> None:
        for i, pair in enumerate(self.individual_lesions or []):
            if len(pair) != 2 or not pair[0] > 0 or pair[1] not in (0, 1):
                raise ModelError(
                    f"{where}.individual_lesions[{i}] must be [volume in ml > 0, 0 or 1], "
                    f"not {pair!r}"
                )
        for sigma in self.smoothing_fpr or {}:
            try:
                ok = math.isfinite(float(sigma)) and float(sigma) >= 0
            except ValueError:
                ok = False
            if not ok:
                raise ModelError(f"{where}.smoothing_fpr: {sigma!r} is not a sigma >= 0 in mm")
        v = self.heldout_ventricles_mm
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ModelError(f"{where}.heldout_ventricles_mm must be a distance > 0 when given")

    def fpr_table(self, smoothing_mm: float | None = None) -> list[tuple[float, float]]:
        """(threshold, fpr) pairs, sorted by threshold, of the default combined map (None), or
        of the same combination smoothed with ``smoothing_mm``: the table calibrated at that
        sigma, or between two calibrated sigmas each level's threshold interpolated linearly
        in sigma; empty beyond the calibrated sigmas (:meth:`smoothing_tables`)."""
        if smoothing_mm is None:
            table = self.combined_fpr or {}
        else:
            table = self._table_at(float(smoothing_mm))
        return sorted((float(t), float(f)) for f, t in table.items() if float(f) > 0)

    def smoothing_tables(self) -> dict[float, dict[str, float]]:
        """Every calibrated sigma (mm, ascending) -> its {fpr: threshold} table: the default's
        (``combined_smoothing_mm``) and those of ``smoothing_fpr``."""
        out = {float(k): v for k, v in (self.smoothing_fpr or {}).items()}
        if self.combined_fpr and self.combined_smoothing_mm is not None:
            out[float(self.combined_smoothing_mm)] = self.combined_fpr
        return dict(sorted(out.items()))

    def smoothing_source(self, smoothing_mm: float) -> str | None:
        """How :meth:`fpr_table` gets the levels at ``smoothing_mm``: "calibrated at 3 mm",
        "interpolated between the 3 and 4 mm calibrations", or None (no levels there)."""
        around = _around(list(self.smoothing_tables()), smoothing_mm)
        if around is None:
            return None
        lo, hi = around
        if lo == hi:
            return f"calibrated at {lo:g} mm"
        return f"interpolated between the {lo:g} and {hi:g} mm calibrations"

    def _table_at(self, smoothing_mm: float) -> dict[str, float]:
        tables = self.smoothing_tables()
        around = _around(list(tables), smoothing_mm)
        if around is None:
            return {}
        lo, hi = around
        if lo == hi:
            return tables[lo]
        w = (smoothing_mm - lo) / (hi - lo)
        levels = set(tables[lo]) & set(tables[hi])
        return {f: (1 - w) * float(tables[lo][f]) + w * float(tables[hi][f]) for f in levels}


def _around(sigmas: list[float], sigma: float) -> tuple[float, float] | None:
    """The calibrated ``sigmas`` (ascending) around ``sigma``: (s, s) when one is ``sigma``,
    (the next below, the next above) between two, None beyond them."""
    for s in sigmas:
        if math.isclose(s, sigma, abs_tol=1e-6):
            return s, s
    below = [s for s in sigmas if s < sigma]
    above = [s for s in sigmas if s > sigma]
    return (below[-1], above[0]) if below and above else None


@dataclass
class PostProcessingDefaults(_Part):
    """The combination the plugin and the command line start from (see
    :class:`napari_vaeloc.combine.CombineSettings`); ``threshold_fpr`` is the healthy
    false-positive rate the threshold was read at, ``grow_fpr`` the one the grow level was
    read at (``outline_fraction``: of a part's peak, on the combination smoothed with
    ``outline_smoothing_mm`` when that is set); ``fuse_with`` names companion models
    for the other slicing axes and ``fuse`` whether they are used by default."""

    weights: dict[str, float] | None = None
    smoothing_mm: float | None = None
    threshold: float | None = None
    threshold_fpr: float | None = None
    grow_threshold: float | None = None
    grow_fpr: float | None = None
    outline_fraction: float | None = None
    outline_smoothing_mm: float | None = None
    min_size_mm3: float | None = None
    foreground_only: bool | None = None
    scan_normalise: bool | None = None
    fuse: bool | None = None
    fuse_with: list[str] | None = None

    @property
    def fuses(self) -> bool:
        """Whether a localization fuses the companions by default: some are named and
        ``fuse`` is not false."""
        return bool(self.fuse_with) and self.fuse is not False

    def fused_axes(self, axis: str, card_of: Callable[[str], ModelCard | None]) -> list[str]:
        """The slicing axes a default localization scores: ``axis`` (the model's own) and,
        when it :attr:`fuses`, each companion's axis as ``card_of(name)`` gives its card (the
        companion's name where that gives None)."""
        if not self.fuses:
            return [axis]
        others = [str(c.axis) if (c := card_of(n)) is not None else n for n in self.fuse_with or []]
        return [axis, *others]


@dataclass
class Provenance(_Part):
    """Where a model came from: free-text description, data sources and licence, the training
    record (configuration, split, history; see :mod:`napari_vaeloc.training`), versions."""

    _card_keys: typing.ClassVar[dict[str, str]] = {"sources": "provenance"}

    description: str = ""
    sources: str = ""
    licence: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    package_version: str = ""


@dataclass
class ModelCard:
    """A model's card, in typed parts. ``model.json`` keeps its flat layout: the parts' fields sit
    at the top level except ``architecture``, ``normalisation``, ``calibration`` and
    ``defaults``.

    Attributes:
        name: short identifier, e.g. "t2-brain".
        architecture, preprocessing, calibration (None: uncalibrated), defaults, provenance: the
            typed parts.
        likelihood_log_std: log sigma of the Gaussian likelihood (0 -> sigma = 1).
        weights_sha256: checksum of the weights file, filled in on save.
    """

    name: str
    architecture: Architecture
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    likelihood_log_std: float = 0.0
    calibration: Calibration | None = None
    defaults: PostProcessingDefaults = field(default_factory=PostProcessingDefaults)
    provenance: Provenance = field(default_factory=Provenance)
    weights_sha256: str = ""
    format_version: int = FORMAT_VERSION

    # -- shortcuts used everywhere ---------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.architecture.image_size

    @property
    def axis(self) -> str:
        return self.preprocessing.axis

    @property
    def modality(self) -> str:
        return self.preprocessing.modality

    @property
    def normalisation(self) -> Normalisation:
        return self.preprocessing.normalisation

    # -- JSON ------------------------------------------------------------------------------
    _TOP: typing.ClassVar[tuple[str, ...]] = (
        "name", "likelihood_log_std", "weights_sha256", "format_version"
    )  # fmt: skip
    _NESTED: typing.ClassVar[dict[str, type[_Part]]] = {
        "architecture": Architecture, "calibration": Calibration, "defaults": PostProcessingDefaults
    }  # fmt: skip
    _FLAT: typing.ClassVar[dict[str, type[_Part]]] = {
        "preprocessing": Preprocessing, "provenance": Provenance
    }  # fmt: skip

    def to_dict(self) -> dict:
        out: dict[str, Any] = {k: getattr(self, k) for k in self._TOP}
        for k in self._NESTED:
            v = getattr(self, k)
            out[k] = None if v is None else v.to_dict()
        for k in self._FLAT:
            out.update(getattr(self, k).to_dict())
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Any, where: str = "model card") -> ModelCard:
        """Build and validate a card from parsed JSON.

        Raises:
            ModelError: not an object, a missing or unknown field, a field of the wrong type
                (the message names it), or a card from a newer format.
        """
        if not isinstance(d, dict):
            raise ModelError(f"{where} must hold a JSON object")
        version = d.get("format_version", FORMAT_VERSION)
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise ModelError(f"{where} is from a newer napari-vaeloc; upgrade the package")
        flat_keys = {
            part: {c._card_keys.get(f.name, f.name) for f in fields(c)}
            for part, c in cls._FLAT.items()
        }
        known = set(cls._TOP) | set(cls._NESTED) | set().union(*flat_keys.values())
        unknown = sorted(set(d) - known)
        if unknown:
            raise ModelError(f"{where} has unknown field(s) {', '.join(unknown)}")
        for key in ("name", "architecture"):
            if key not in d:
                raise ModelError(f"{where} lacks the field {key!r}")
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        for k in cls._TOP:
            if k in d:
                kwargs[k] = _check(d[k], hints[k], f"{where}.{k}")
        for k, part in cls._NESTED.items():
            if k in d and d[k] is not None:
                kwargs[k] = part.from_dict(d[k], f"{where}.{k}")
        for k, part in cls._FLAT.items():
            kwargs[k] = part.from_dict({x: d[x] for x in flat_keys[k] if x in d}, where)
        card = cls(**kwargs)
        arch, k = card.architecture, card.preprocessing.neighbours
        if arch.type == "conv" and (arch.in_channels or 1) != 2 * k + 1:
            raise ModelError(
                f"{where}: a model that sees {k} neighbouring slice(s) on each side takes "
                f"{2 * k + 1} input channels, not {arch.in_channels or 1}"
            )
        return card

    @classmethod
    def from_json(cls, text: str, where: str = "model card") -> ModelCard:
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelError(f"{where} is not valid JSON: {exc}") from exc
        return cls.from_dict(raw, where)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the card as JSON, atomically (see :func:`napari_vaeloc.io.write_text_atomic`)."""
        from ..io import write_text_atomic

        return write_text_atomic(self.to_json() + "\n", Path(path), overwrite=overwrite)

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        """Read and validate a card file.

        Raises:
            ModelError: missing or unreadable file, invalid JSON, or an invalid card.
        """
        p = Path(path)
        try:
            text = p.read_text()
        except FileNotFoundError as exc:
            raise ModelError(f"{p.parent} is not a model folder: no {p.name}") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelError(f"cannot read {p}: {exc}") from exc
        return cls.from_json(text, str(p))
