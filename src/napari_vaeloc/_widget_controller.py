"""The widget's state without any Qt: the cached result of one run and the cheap recomputation of
the combined map and the mask when a slider moves (cellpose-napari's "re-threshold" pattern).

The recomputation itself is the one post-processing pipeline every front uses
(:class:`~napari_vaeloc.combine.PostProcessor`); this module adds only what the panel shows:
contrast limits and the meaning of the threshold in words.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .combine import PostProcessor
from .mapnames import SLIDER_MAPS

if TYPE_CHECKING:  # the engine pulls in torch: never at plugin import time
    from .engine import LocalizationResult

#: result layers besides the combined map and the mask: layer suffix -> map name
MAP_LAYERS = {"reconstruction": "reconstruction", "Rec-Error": "rec_error", "KL-Grad": "kl_grad"}


class Session(PostProcessor):
    """One finished run: its result (with the scan and the model's card) and the current
    settings. Nothing here ever runs the network.

    The scales of every slider component are computed on creation (in the worker thread), so
    that a slider move in the GUI thread only re-sums and re-thresholds.
    """

    def __init__(self, result: LocalizationResult) -> None:
        super().__init__(result)
        for name in sorted(set(SLIDER_MAPS) | set(self.settings.weights)):
            if name in result.maps:
                self.scale(name)

    @property
    def volume(self):
        return self.result.volume

    def display_range(self) -> tuple[float, float]:
        """Fixed contrast limits of the combined map, in scale units (never per-volume min-max):
        from 0.8 of the summed weights (just below the healthy 99th percentile, so healthy brain
        stays dark) to twice it; with per-scan normalisation, 2 to 8 robust z-units."""
        if self.settings.scan_normalise:
            return (2.0, 8.0)
        total = sum(abs(w) for w in self.settings.weights.values()) or 1.0
        return (0.8 * total, 2.0 * total)

    def map_range(self, name: str) -> tuple[float, float]:
        """Contrast limits of a component map: 0 to twice its (calibrated) scale; for the
        reconstruction, the scan's minimum to its 99.5th percentile."""
        if name == "reconstruction":
            data = self.volume.data
            return (float(data.min()), float(np.percentile(data[::2, ::2, ::2], 99.5)))
        return (0.0, 2.0 * self.scale(name)[0])

    def threshold_text(self) -> str:
        """What the current threshold means, in calibrated terms when it can."""
        t = self.settings.threshold
        if not self.is_calibrated():
            return f"{t:.2f} × this scan's own 99th percentile (uncalibrated model)"
        pairs = self.fpr_table()
        if pairs:
            if t > pairs[-1][0]:
                return f"healthy false-positive rate < {pairs[-1][1]:.2%}"
            if t < pairs[0][0]:
                return f"healthy false-positive rate > {pairs[0][1]:.0%}"
            fpr = self.fpr_for_threshold(t)
            return f"healthy false-positive rate ≈ {fpr:.3g} ({fpr:.2%} of healthy voxels)"
        if self.settings.scan_normalise:
            return f"{t:.2f} robust z-units above this scan's median (no FPR calibration)"
        return f"{t:.2f} × healthy 99th percentile (custom weights: no FPR calibration)"
