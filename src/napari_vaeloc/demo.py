"""The end-to-end demonstration behind ``vaeloc demo``: a bundled model localizes the synthetic
lesion of the bundled sample scan, and every map is scored against the known ground truth."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from .combine import CombineSettings, apply_settings
from .engine import localize
from .evaluation.runner import COMPONENTS, pixel_metrics
from .export import write_result
from .io import load_volume
from .models.store import load_model
from .samples import sample_path


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    denom = a.sum() + b.sum()
    return float(2 * (a & b).sum() / denom) if denom else 1.0


def run_demo(
    out_dir: str | Path,
    model: str = "t2-brain",
    device: str = "auto",
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Localize the lesion of the T2 sample with ``model``, write every output to ``out_dir``
    and score each map inside the brain against the ground truth.

    Returns {"metrics": {map: {auroc, ap, best_dice}}, "mask_dice": float, "files": {...},
    "result": LocalizationResult}.
    """
    loaded = load_model(model)
    scan = load_volume(sample_path("t2-lesion"))
    truth = load_volume(sample_path("t2-lesion-truth")).data > 0
    result = localize(scan, loaded, device=device, progress=progress)
    settings = CombineSettings.from_card(loaded.card)
    c = apply_settings(
        result.maps, result.foreground, scan.spacing, settings, loaded.card.calibration
    )
    files = write_result(
        result, scan, out_dir, settings, loaded.card.calibration, overwrite=overwrite, combination=c
    )
    region = result.foreground | truth
    metrics = {k: pixel_metrics(result.maps[k][region], truth[region]) for k in COMPONENTS}
    metrics["combined (default)"] = pixel_metrics(c.combined[region], truth[region])
    return {
        "metrics": metrics,
        "mask_dice": dice(c.mask, truth),
        "files": files,
        "result": result,
        "settings": settings,
    }
