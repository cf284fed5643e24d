"""The post-processing pipeline: cached component maps in, combined map and mask out (numpy only).

Every front (the widget, the command line, the demo, the evaluation runner, the scripts) goes
through one :class:`PostProcessor`, so that the same scan and settings give the same combined
map and mask everywhere. Its steps, in order:

1. **component scales**: a component map is divided by its *scale*, the model's calibrated
   healthy-foreground value (``Calibration.scales[name]``, the 99th percentile on healthy
   validation slices). An uncalibrated model falls back to the scan's own foreground 99th
   percentile; results then say ``calibrated: false`` and a threshold means "above this scan's
   own 99th percentile", not a false-positive rate.
2. **weights**: the weighted sum ``sum_k w_k * map_k / scale_k`` (components with weight 0 are
   skipped).
3. **3D smoothing**: a Gaussian of sigma ``smoothing_mm`` (mm, per-axis voxels). For a prepared
   scan, whose maps are 0 outside the extracted brain, it is normalised to the foreground
   (values outside never leak in); otherwise the model's outputs around the object take part,
   as they did when the thresholds were calibrated. Smoothing is linear, so each scaled
   component is smoothed once and cached: moving a weight then costs a weighted sum.
4. **per-scan normalisation** (``scan_normalise``): robust z-units of the scan itself,
   ``max(0, (c - median) / (1.4826 MAD))`` over the foreground, so that a scan whose healthy
   tissue is explained worse overall (another scanner, unusual anatomy) does not light up
   everywhere at a fixed threshold. Then zero outside the foreground (``foreground_only``).
5. **threshold** and **minimum component size** (26-connected, mm^3) give the mask.

The threshold <-> healthy false-positive rate conversion reads the model's calibrated table
(``Calibration.combined_fpr``), valid for the combination it was calibrated for.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .errors import InputError
from .mapnames import COMBINABLE_MAPS, PRESETS, check_names

if TYPE_CHECKING:  # the engine pulls in torch lazily; only its result type is needed here
    from .engine import LocalizationResult
    from .models.card import Calibration, ModelCard

#: fallback when a model has no calibration: the scan's own foreground percentile
FALLBACK_PERCENTILE = 99.0
DEFAULT_WEIGHTS = {"combi": 1.0}


@dataclass(frozen=True)
class CombineSettings:
    """Weights per component, extra 3D smoothing (sigma, mm), per-scan robust normalisation,
    threshold (scale units, or robust z-units with ``scan_normalise``) and minimum lesion size
    (mm^3). Validated when made: change one with :meth:`replace`.

    Raises:
        InputError: a weight names an unknown map (the message lists the valid names), or a
            value is not finite, or smoothing or minimum size is negative.
    """

    weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    smoothing_mm: float = 0.0
    threshold: float = 1.0
    min_size_mm3: float = 0.0
    foreground_only: bool = True
    scan_normalise: bool = False

    def __post_init__(self) -> None:
        check_names(self.weights, COMBINABLE_MAPS, "weights")
        weights = {str(k): float(v) for k, v in self.weights.items()}
        if not all(math.isfinite(w) for w in weights.values()):
            raise InputError(f"weights must be finite numbers, got {weights}")
        object.__setattr__(self, "weights", weights)
        for name in ("smoothing_mm", "threshold", "min_size_mm3"):
            value = float(getattr(self, name))
            if not math.isfinite(value):
                raise InputError(f"{name} must be a finite number, not {value}")
            object.__setattr__(self, name, value)
        if self.smoothing_mm < 0 or self.min_size_mm3 < 0 or self.threshold < 0:
            raise InputError("threshold, smoothing and minimum size must be >= 0")

    @classmethod
    def from_card(cls, card: ModelCard) -> CombineSettings:
        """The model's default combination (its card's defaults; the class defaults for fields
        the card leaves out)."""
        d = card.defaults
        given = {
            f.name: getattr(d, f.name)
            for f in dataclasses.fields(cls)
            if getattr(d, f.name, None) is not None
        }
        return cls(**given)

    @classmethod
    def preset(cls, name: str, card: ModelCard) -> CombineSettings:
        """A named combination (:data:`PRESETS`): "default", the model card's; "paper", the
        method of Zimmerer et al. (MICCAI 2019) as published: the Combi map alone, no 3D
        smoothing, no per-scan normalisation, no minimum size, thresholded at 1 (the model's
        healthy 99th percentile of Combi: a 1 % healthy false-positive rate per pixel).

        Raises:
            InputError: an unknown name (the message lists the presets).
        """
        if name == "default":
            return cls.from_card(card)
        if name == "paper":
            return cls(weights={"combi": 1.0}, threshold=1.0)
        raise InputError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")

    def replace(self, **changes) -> CombineSettings:
        """A copy with some fields changed, validated again."""
        return dataclasses.replace(self, **changes)

    def used_weights(self) -> dict[str, float]:
        """The non-zero weights."""
        return {k: w for k, w in self.weights.items() if w}


@dataclass
class Combination:
    """The combined map and mask of one volume under some settings, with the scales used."""

    combined: np.ndarray  # float32, the maps' shape
    mask: np.ndarray  # uint8, the maps' shape
    scales: dict[str, float]
    calibrated: bool


class PostProcessor:
    """One result's post-processing under changing settings; nothing here runs the network.

    ``combined()`` and ``mask()`` cache their last output (keyed on the settings that matter to
    them) and each smoothed, scaled component, so a threshold move only re-thresholds and a
    weight move only re-sums.

    Args:
        result: the engine's output (maps on the scan's grid, foreground, the volume, the card).
        settings: the starting settings (default: the card's).
        calibration: overrides the card's calibration (None: the card's).
    """

    def __init__(
        self,
        result: LocalizationResult,
        settings: CombineSettings | None = None,
        calibration: Calibration | None = None,
    ) -> None:
        self.result = result
        self.card = result.card
        self.calibration = calibration if calibration is not None else result.card.calibration
        self.spacing = result.volume.spacing
        self.settings = settings if settings is not None else self.default_settings()
        self._scales: dict[str, tuple[float, bool]] = {}
        self._smooth_cache: dict[tuple[str, float], np.ndarray] = {}
        self._combined_key: tuple | None = None
        self._combined: np.ndarray | None = None
        self._mask_key: tuple | None = None
        self._mask: np.ndarray | None = None

    def default_settings(self) -> CombineSettings:
        return CombineSettings.from_card(self.card)

    # -- scales ----------------------------------------------------------------------------
    def scale(self, name: str) -> tuple[float, bool]:
        """(scale, calibrated) of one component map: the model's calibrated scale, or the
        scan's own foreground 99th percentile."""
        if name not in self._scales:
            calib = self.calibration.scales if self.calibration is not None else {}
            if calib.get(name, 0) > 0:
                self._scales[name] = (float(calib[name]), True)
            else:
                self._scales[name] = (_fallback_scale(self.result.maps[name], self.fg()), False)
        return self._scales[name]

    def fg(self) -> np.ndarray:
        return self.result.foreground

    def is_calibrated(self) -> bool:
        used = self._used()
        return bool(used) and all(self.scale(k)[1] for k in used)

    def _used(self) -> dict[str, float]:
        return {k: w for k, w in self.settings.used_weights().items() if k in self.result.maps}

    # -- the pipeline ----------------------------------------------------------------------
    def combined(self) -> np.ndarray:
        """The combined map, float32 of the scan's shape (steps 1-4 of the module doc)."""
        s = self.settings
        key = (tuple(sorted(s.weights.items())), s.smoothing_mm, s.foreground_only,
               s.scan_normalise)  # fmt: skip
        if key != self._combined_key or self._combined is None:
            missing = set(s.used_weights()) - set(self.result.maps)
            if missing:
                raise InputError(
                    f"the result has no {', '.join(sorted(missing))} map(s) to combine; "
                    "localize with those maps"
                )
            used = self._used()
            # maps that are 0 outside an extracted brain (a prepared scan) are smoothed within
            # the foreground; the model's own outputs outside the object take part otherwise, as
            # they did when the thresholds were calibrated
            inside = s.foreground_only and self.result.prepared is not None
            terms = {k: self._scaled(k, s.smoothing_mm, inside) for k in used}
            total = weighted_sum(terms, used, shape=self.result.shape)
            fg = self.fg() if s.foreground_only else None
            self._combined = finish(total, fg, s.scan_normalise)
            self._combined_key, self._mask_key = key, None
        return self._combined

    def _scaled(self, name: str, smoothing_mm: float, inside: bool = True) -> np.ndarray:
        """``map / scale`` of one component, smoothed (within the foreground when ``inside``);
        cached for the current smoothing only."""
        key = (name, smoothing_mm, inside)
        if key not in self._smooth_cache:
            kept = self._smooth_cache.items()
            self._smooth_cache = {k: v for k, v in kept if k[1] == smoothing_mm}
            scaled = self.result.maps[name] * np.float32(1.0 / self.scale(name)[0])
            where = self.fg() if inside else None
            self._smooth_cache[key] = smooth(scaled, smoothing_mm, self.spacing, where)
        return self._smooth_cache[key]

    def mask(self) -> np.ndarray:
        """uint8 mask of the combined map above the threshold, small components removed."""
        s = self.settings
        combined = self.combined()
        key = (self._combined_key, s.threshold, s.min_size_mm3)
        if key != self._mask_key or self._mask is None:
            self._mask = threshold_mask(combined, s.threshold, s.min_size_mm3, self.spacing)
            self._mask_key = key
        return self._mask

    def combination(self) -> Combination:
        """Combined map, mask and the scales of the weighted components."""
        scales = {k: self.scale(k)[0] for k in self._used()}
        return Combination(self.combined(), self.mask(), scales, self.is_calibrated())

    # -- threshold <-> healthy false-positive rate -----------------------------------------
    def uses_default_combination(self) -> bool:
        """True when weights, smoothing and normalisation are those the model's FPR table was
        calibrated for."""
        d = self.default_settings()
        cal = self.calibration
        cal_w = (cal.combined_weights if cal is not None else None) or d.weights
        return (
            self.settings.used_weights() == {k: float(v) for k, v in cal_w.items() if v}
            and math.isclose(self.settings.smoothing_mm, d.smoothing_mm)
            and self.settings.scan_normalise == d.scan_normalise
        )

    def fpr_table(self) -> list[tuple[float, float]]:
        """(threshold, fpr) pairs that hold for the current settings (empty when they differ
        from the calibrated combination, or the model has none)."""
        if self.calibration is None or not self.uses_default_combination():
            return []
        return self.calibration.fpr_table()

    def fpr_for_threshold(self, threshold: float) -> float | None:
        """Healthy false-positive rate of ``threshold``, interpolated in log space between the
        calibrated levels (the nearest level outside them); None without a table."""
        pairs = self.fpr_table()
        if not pairs:
            return None
        thr = np.array([p[0] for p in pairs])
        logf = np.log10([p[1] for p in pairs])
        return float(10 ** np.interp(threshold, thr, logf))

    def threshold_for_fpr(self, fpr: float) -> float | None:
        """Inverse of :meth:`fpr_for_threshold`."""
        pairs = self.fpr_table()
        if not pairs:
            return None
        thr = np.array([p[0] for p in pairs])[::-1]
        logf = np.log10([p[1] for p in pairs])[::-1]
        return float(np.interp(math.log10(fpr), logf, thr))


def weighted_sum(
    terms: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
    scales: Mapping[str, float] | None = None,
    shape: tuple[int, ...] | None = None,
) -> np.ndarray:
    """``sum_k w_k * terms_k / scale_k`` over the non-zero weights (scale 1 when ``scales`` is
    None), float32; zeros of ``shape`` when no weight is used. The one formula of the combined
    map (step 2 of the module doc), also used by the calibration after training.

    Raises:
        KeyError: a weighted term is missing.
    """
    used = {k: float(w) for k, w in weights.items() if w}
    if not used:
        if shape is None:
            raise ValueError("no weights and no shape")
        return np.zeros(shape, dtype=np.float32)
    total: np.ndarray | None = None
    for k, w in used.items():
        factor = np.float32(w / (scales[k] if scales is not None else 1.0))
        part = terms[k] * factor
        total = part if total is None else total + part
    return np.asarray(total, dtype=np.float32)


def _fallback_scale(values: np.ndarray, foreground: np.ndarray | None) -> float:
    vals = values[foreground] if foreground is not None and foreground.any() else values.ravel()
    step = max(1, vals.size // 2_000_000)
    v = float(np.percentile(vals[::step], FALLBACK_PERCENTILE))
    return v if v > 0 else float(np.abs(vals).max() or 1.0)


def smooth(
    values: np.ndarray,
    smoothing_mm: float,
    spacing: tuple[float, ...],
    where: np.ndarray | None = None,
) -> np.ndarray:
    """3D Gaussian smoothing with sigma ``smoothing_mm`` (mm, per-axis voxels from ``spacing``),
    float32; ``values`` itself when ``smoothing_mm`` is 0. Truncated at 3 sigma (a third faster
    than scipy's 4; the tail beyond holds 0.3 % of the weight), nearest-value borders.

    With ``where`` (bool, the values' shape) the smoothing is normalised to it (normalised
    convolution, Knutsson & Westin 1993): ``G * (v 1_where) / G * 1_where`` inside ``where``,
    0 outside, so values outside the object (background, or zeros outside an extracted brain)
    never leak in. Still linear in ``values``."""
    if smoothing_mm <= 0:
        return values
    from scipy.ndimage import gaussian_filter

    sigma = [smoothing_mm / max(s, 1e-6) for s in spacing[: values.ndim]]

    def g(a: np.ndarray) -> np.ndarray:
        return gaussian_filter(a, sigma=sigma, mode="nearest", truncate=3.0)

    if where is None:
        return g(values).astype(np.float32, copy=False)
    num = g(np.where(where, values, 0).astype(np.float32))
    den = g(where.astype(np.float32))
    out = np.zeros(values.shape, np.float32)
    np.divide(num, den, out=out, where=where & (den > 1e-6))
    return out


def finish(values: np.ndarray, foreground: np.ndarray | None, scan_normalise: bool) -> np.ndarray:
    """The last steps on a (smoothed) weighted sum: per-scan robust z-scores when asked (only
    "higher than this scan's median" counts: negative values become 0), then zero outside the
    foreground when one is given (in place when no z-scoring)."""
    out = values
    if scan_normalise:
        out = np.maximum(robust_z(out, foreground), 0)
    if foreground is not None:
        out[~foreground] = 0
    return out


def robust_z(values: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
    """``(values - median) / (1.4826 * MAD)`` with median and MAD over ``values[where]`` (all
    values when ``where`` is None or empty; at most 2 million of them, evenly strided); float32."""
    ref = values[where] if where is not None and where.any() else values.ravel()
    ref = ref[:: max(1, ref.size // 2_000_000)]
    med = float(np.median(ref))
    mad = 1.4826 * float(np.median(np.abs(ref - med)))
    out = values - np.float32(med)
    out /= np.float32(mad if mad > 0 else 1.0)
    return out


def threshold_mask(
    combined: np.ndarray,
    threshold: float,
    min_size_mm3: float = 0.0,
    spacing: tuple[float, ...] = (1.0, 1.0, 1.0),
) -> np.ndarray:
    """uint8 mask of voxels above ``threshold``, without connected components (26-connected)
    smaller than ``min_size_mm3``."""
    mask = combined > threshold
    if min_size_mm3 > 0 and mask.any():
        from skimage.morphology import remove_small_objects

        voxel = float(np.prod(spacing[: mask.ndim]))
        min_voxels = int(np.ceil(min_size_mm3 / voxel))
        if min_voxels > 1:
            mask = remove_small_objects(mask, max_size=min_voxels - 1, connectivity=mask.ndim)
    return mask.astype(np.uint8)
