"""The widget's state without any Qt: the cached result of one run and the cheap recomputation of
the combined map and the mask when a slider moves (cellpose-napari's "re-threshold" pattern)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .combine import CombineSettings, combine, component_scales, finish, smooth, threshold_mask

if TYPE_CHECKING:  # the engine pulls in torch: never at plugin import time
    from .engine import LocalizationResult
    from .io import Volume

#: components offered as weight sliders, in display order
WEIGHT_COMPONENTS = ("rec_error_smooth", "rec_error", "elbo_grad", "kl_grad", "combi")
#: result layers besides the combined map and the mask: suffix -> map name
MAP_LAYERS = {"reconstruction": "reconstruction", "Rec-Error": "rec_error", "KL-Grad": "kl_grad"}


def _fpr_table(calibration: dict | None) -> list[tuple[float, float]]:
    """(threshold, fpr) pairs of the default combined map, sorted by threshold."""
    table = (calibration or {}).get("combined_fpr") or {}
    pairs = sorted((float(t), float(f)) for f, t in table.items() if float(f) > 0)
    return pairs


def fpr_for_threshold(calibration: dict | None, threshold: float) -> float | None:
    """Healthy false-positive rate of ``threshold`` on the default combined map, interpolated in
    log space between the calibrated levels; None without a table. Outside the table the nearest
    level is returned (callers say "<" or ">")."""
    pairs = _fpr_table(calibration)
    if not pairs:
        return None
    thr = np.array([p[0] for p in pairs])
    logf = np.log10([p[1] for p in pairs])
    return float(10 ** np.interp(threshold, thr, logf))


def threshold_for_fpr(calibration: dict | None, fpr: float) -> float | None:
    """Inverse of :func:`fpr_for_threshold`."""
    pairs = _fpr_table(calibration)
    if not pairs:
        return None
    thr = np.array([p[0] for p in pairs])[::-1]
    logf = np.log10([p[1] for p in pairs])[::-1]
    return float(np.interp(math.log10(fpr), logf, thr))


@dataclass
class Session:
    """One finished run: the scan, its result, the model's card, and the current settings.

    ``combined()`` and ``mask()`` cache their last output, so moving the threshold does not
    recombine, and nothing here ever runs the network.
    """

    volume: Volume
    result: LocalizationResult
    card: object
    settings: CombineSettings = field(init=False)
    scales: dict[str, float] = field(init=False)
    calibrated: dict[str, bool] = field(init=False)
    _combined_key: tuple | None = field(default=None, init=False, repr=False)
    _combined: np.ndarray | None = field(default=None, init=False, repr=False)
    _mask_key: tuple | None = field(default=None, init=False, repr=False)
    _mask: np.ndarray | None = field(default=None, init=False, repr=False)
    _smooth_cache: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.settings = self.default_settings()
        names = sorted(set(WEIGHT_COMPONENTS) | set(self.settings.weights))
        self.scales, self.calibrated = {}, {}
        fg = self.result.foreground
        for name in names:
            if name in self.result.maps:
                s, ok = component_scales(self.result.maps, fg, self.calibration, [name])
                self.scales[name], self.calibrated[name] = s[name], ok

    @property
    def calibration(self) -> dict | None:
        return getattr(self.card, "calibration", None)

    def default_settings(self) -> CombineSettings:
        s = CombineSettings.from_card(self.card)
        s.weights = {k: float(v) for k, v in s.weights.items()}
        return s

    def uses_default_combination(self) -> bool:
        """True when weights and smoothing are those the FPR table was calibrated for."""
        d = self.default_settings()
        cal_w = (self.calibration or {}).get("combined_weights") or d.weights
        w = {k: v for k, v in self.settings.weights.items() if v}
        return (
            w == {k: float(v) for k, v in cal_w.items() if v}
            and math.isclose(self.settings.smoothing_mm, d.smoothing_mm)
            and self.settings.scan_normalise == d.scan_normalise
        )

    def is_calibrated(self) -> bool:
        used = [k for k, w in self.settings.weights.items() if w]
        return bool(used) and all(self.calibrated.get(k, False) for k in used)

    def combined(self) -> np.ndarray:
        s = self.settings
        key = (
            tuple(sorted(s.weights.items())),
            s.smoothing_mm,
            s.foreground_only,
            s.scan_normalise,
        )
        if key != self._combined_key or self._combined is None:
            fg = self.result.foreground if s.foreground_only else None
            weights = {k: w for k, w in s.weights.items() if w and k in self.scales}
            if not weights:
                self._combined = np.zeros(self.result.shape, dtype=np.float32)
            elif s.smoothing_mm > 0:
                # smoothing is linear: smooth each scaled component once, then a weight move
                # costs a weighted sum instead of a 3D Gaussian over the whole volume
                total = np.zeros(self.result.shape, dtype=np.float32)
                for k, w in weights.items():
                    total += np.float32(w) * self._smoothed(k, s.smoothing_mm)
                self._combined = finish(total, fg, s.scan_normalise)
            else:
                self._combined = combine(
                    self.result.maps, weights, self.scales, fg, 0.0, self.volume.spacing,
                    s.scan_normalise,
                )  # fmt: skip
            self._combined_key, self._mask_key = key, None
        return self._combined

    def _smoothed(self, name: str, smoothing_mm: float) -> np.ndarray:
        """``map / scale`` of one component smoothed by ``smoothing_mm``, cached for the
        current smoothing only."""
        key = (name, smoothing_mm, self.scales[name])
        if key not in self._smooth_cache:
            self._smooth_cache = {
                k: v for k, v in self._smooth_cache.items() if k[1] == smoothing_mm
            }
            scaled = self.result.maps[name] * np.float32(1.0 / self.scales[name])
            self._smooth_cache[key] = smooth(scaled, smoothing_mm, self.volume.spacing)
        return self._smooth_cache[key]

    def mask(self) -> np.ndarray:
        s = self.settings
        combined = self.combined()
        key = (self._combined_key, s.threshold, s.min_size_mm3)
        if key != self._mask_key or self._mask is None:
            self._mask = threshold_mask(combined, s.threshold, s.min_size_mm3, self.volume.spacing)
            self._mask_key = key
        return self._mask

    def display_range(self) -> tuple[float, float]:
        """Fixed contrast limits of the combined map, in scale units (never per-volume min-max):
        from 0.8 of the summed weights (just below the healthy 99th percentile, so healthy brain
        stays dark) to twice it; with per-scan normalisation, 2 to 8 robust z-units."""
        if self.settings.scan_normalise:
            return (2.0, 8.0)
        total = sum(abs(w) for w in self.settings.weights.values()) or 1.0
        return (0.8 * total, 2.0 * total)

    def map_range(self, name: str) -> tuple[float, float]:
        """Contrast limits of a component map: 0 to twice its (calibrated) scale."""
        if name == "reconstruction":
            data = self.volume.data
            return (float(data.min()), float(np.percentile(data[::2, ::2, ::2], 99.5)))
        scale = self.scales.get(name)
        if scale is None:
            scale, _ = component_scales(self.result.maps, self.result.foreground, None, [name])
            scale = scale[name]
            self.scales[name], self.calibrated[name] = scale, False
        return (0.0, 2.0 * scale)

    def threshold_text(self) -> str:
        """What the current threshold means, in calibrated terms when it can."""
        t = self.settings.threshold
        if not self.is_calibrated():
            return f"{t:.2f} × this scan's own 99th percentile (uncalibrated model)"
        if self.uses_default_combination() and _fpr_table(self.calibration):
            pairs = _fpr_table(self.calibration)
            if t > pairs[-1][0]:
                return f"healthy false-positive rate < {pairs[-1][1]:.2%}"
            if t < pairs[0][0]:
                return f"healthy false-positive rate > {pairs[0][1]:.0%}"
            fpr = fpr_for_threshold(self.calibration, t)
            return f"healthy false-positive rate ≈ {fpr:.3g} ({fpr:.2%} of healthy voxels)"
        if self.settings.scan_normalise:
            return f"{t:.2f} robust z-units above this scan's median (no FPR calibration)"
        return f"{t:.2f} × healthy 99th percentile (custom weights: no FPR calibration)"
