"""The end-to-end demonstration behind ``vaeloc demo``: a bundled model localizes the synthetic
lesion of the bundled sample scan, and every map is scored against the known ground truth."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .combine import PostProcessor
from .engine import EngineOptions, localize
from .evaluation.metrics import Overlap, pixel_metrics
from .export import write_result
from .io import load_volume
from .mapnames import EVALUATED_MAPS
from .models.store import cached_model
from .samples import sample_path


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
    loaded = cached_model(model)
    scan = load_volume(sample_path("t2-lesion"))
    truth = load_volume(sample_path("t2-lesion-truth")).data > 0
    result = localize(scan, loaded, EngineOptions(device=device, progress=progress))
    post = PostProcessor(result)
    files = write_result(result, post, out_dir, overwrite=overwrite)
    c = post.combination()
    region = result.foreground | truth
    metrics = {k: pixel_metrics(result.maps[k][region], truth[region]) for k in EVALUATED_MAPS}
    metrics["combined (default)"] = pixel_metrics(c.combined[region], truth[region])
    overlap = Overlap()
    overlap.add(c.mask, truth)
    return {
        "metrics": metrics,
        "mask_dice": overlap.dice,
        "files": files,
        "result": result,
        "settings": post.settings,
    }
