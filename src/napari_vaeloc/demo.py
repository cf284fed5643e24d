"""The end-to-end demonstration behind ``vaeloc demo``: a bundled model localizes the synthetic
lesion of the bundled sample scan, and every map is scored against the known ground truth."""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .combine import CombineSettings, combine, component_scales, threshold_mask
from .engine import localize
from .evaluate import COMPONENTS, pixel_metrics
from .export import write_result
from .io import load_volume
from .models.store import load_model

SAMPLES = {
    "t2-healthy": "sample_t2_healthy.nii.gz",
    "t1-healthy": "sample_t1_healthy.nii.gz",
    "t2-lesion": "sample_t2_lesion.nii.gz",
    "t2-lesion-truth": "sample_t2_lesion_truth.nii.gz",
}


def sample_path(name: str = SAMPLES["t2-healthy"]) -> Path:
    """Path of a file bundled in the package's data folder (a sample key or a file name)."""
    name = SAMPLES.get(name, name)
    return Path(str(importlib.resources.files("napari_vaeloc") / "data" / name))


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
    files = write_result(
        result, scan, out_dir, settings, loaded.card.calibration, overwrite=overwrite
    )
    region = result.foreground | truth
    metrics = {k: pixel_metrics(result.maps[k][region], truth[region]) for k in COMPONENTS}
    fg = result.foreground if settings.foreground_only else None
    scales, _ = component_scales(result.maps, fg, loaded.card.calibration, list(settings.weights))
    combined = combine(
        result.maps, settings.weights, scales, fg, settings.smoothing_mm, scan.spacing
    )
    metrics["combined (default)"] = pixel_metrics(combined[region], truth[region])
    mask = threshold_mask(combined, settings.threshold, settings.min_size_mm3, scan.spacing)
    return {
        "metrics": metrics,
        "mask_dice": dice(mask, truth),
        "files": files,
        "result": result,
        "settings": settings,
    }
