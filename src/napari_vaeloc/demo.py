"""The end-to-end demonstration behind ``vaeloc demo``: a bundled model localizes the synthetic
lesion of a bundled sample scan, and every map is scored against the known ground truth.

The default sample is a raw individual head (skull and face on, its own orientation), so the
demonstration runs the whole pipeline: preparation (bias correction, brain extraction,
registration, fit checks), scoring in the template's space, and the maps back on the scan's grid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .samples import sample_path

if TYPE_CHECKING:
    import numpy as np


@dataclass(frozen=True)
class Demo:
    """A sample with a known lesion, the model that fits it, and its reference brain mask
    (None: the model's foreground counts as the brain)."""

    scan: str
    truth: str
    model: str
    brain_mask: str | None
    description: str


DEMOS = {
    d.scan: d
    for d in (
        Demo("t1-head-lesion", "t1-head-lesion-truth", "t1-brain", "t1-head-brain-mask",
             "raw T1 head (skull on, its own orientation) with a synthetic lesion"),
        Demo("t2-lesion", "t2-lesion-truth", "t2-brain", None,
             "skull-stripped T2 brain in template space with a synthetic lesion"),
    )
}  # fmt: skip
DEFAULT_DEMO = "t1-head-lesion"


def demo_for(sample: str) -> Demo:
    """The demo of a sample key. Raises :class:`InputError` naming the known ones."""
    from .errors import InputError

    if sample not in DEMOS:
        raise InputError(f"no demo for {sample!r}; choose one of {', '.join(DEMOS)}")
    return DEMOS[sample]


def check_demo_outputs(
    out_dir: str | Path, overwrite: bool = False, sample: str = DEFAULT_DEMO
) -> dict[str, Path]:
    """Check, before anything is loaded or scored, that ``out_dir`` can take the demo's files
    and that none would be replaced without ``overwrite``; returns name -> path. Cheap: loads
    neither a model nor a scan.

    Raises:
        OutputError: the folder is a file, lies under one, or cannot be created or written; or
            a target is a folder.
        OutputExistsError: some outputs exist and ``overwrite`` is false.
    """
    from .export import planned_paths
    from .io import check_output_folder, refuse_existing

    out = check_output_folder(out_dir)
    paths = planned_paths(sample_path(demo_for(sample).scan), out)
    refuse_existing(paths.values(), overwrite, "output file")
    return paths


def run_demo(
    out_dir: str | Path,
    model: str | None = None,
    device: str = "auto",
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    sample: str = DEFAULT_DEMO,
    prepare: str = "auto",
    stage: Callable[[str], None] | None = None,
) -> dict:
    """Localize the lesion of a bundled sample (default: the raw head) with ``model`` (default:
    the one that fits the sample), write every output to ``out_dir`` and score each map inside
    the brain against the ground truth.

    Returns {"demo": Demo, "metrics": {map: {auroc, ap, best_dice}}, "mask_dice": float,
    "mask_ml": the mask's volume (ml), "parts": its connected parts, "stray_parts" and
    "stray_ml": the parts that do not touch the lesion (false positives) and their volume (ml),
    "outside_ml": mask volume outside the brain (ml), "files": {...}, "result":
    LocalizationResult, "settings": CombineSettings, "post": the PostProcessor that made
    the mask}.

    Raises:
        OutputError, OutputExistsError: as :func:`check_demo_outputs`, before any scoring.
    """
    import numpy as np

    from .combine import PostProcessor
    from .engine import EngineOptions, localize
    from .evaluation.metrics import Overlap, pixel_metrics
    from .export import write_result
    from .io import load_volume
    from .mapnames import DEFAULT_MAPS, EVALUATED_MAPS
    from .models.store import cached_model

    demo = demo_for(sample)
    check_demo_outputs(out_dir, overwrite, sample)
    loaded = cached_model(model or demo.model)
    scan = load_volume(sample_path(demo.scan))
    truth = load_volume(sample_path(demo.truth), scorable=False).data > 0
    options = EngineOptions(device=device, progress=progress, stage=stage)
    result = localize(scan, loaded, options, prepare=prepare)
    post = PostProcessor(result)
    files = write_result(result, post, out_dir, overwrite=overwrite)
    c = post.combination()
    if demo.brain_mask is not None:
        brain = load_volume(sample_path(demo.brain_mask), scorable=False).data > 0
    else:
        brain = result.foreground
    region = brain | truth
    shown = [*EVALUATED_MAPS, *(k for k in result.maps if k not in DEFAULT_MAPS)]
    metrics = {k: pixel_metrics(result.maps[k][region], truth[region]) for k in shown}
    metrics["combined (default)"] = pixel_metrics(c.combined[region], truth[region])
    overlap = Overlap()
    overlap.add(c.mask, truth)
    voxel_ml = float(np.prod(scan.spacing)) / 1000.0
    labels, parts = mask_parts(c.mask)
    stray = np.isin(labels, np.unique(labels[truth]), invert=True) & (labels > 0)
    return {
        "demo": demo,
        "metrics": metrics,
        "mask_dice": overlap.dice,
        "mask_ml": float(c.mask.sum()) * voxel_ml,
        "parts": parts,
        "stray_parts": len(np.unique(labels[stray])),
        "stray_ml": float(stray.sum()) * voxel_ml,
        "outside_ml": float((c.mask.astype(bool) & ~region).sum()) * voxel_ml,
        "files": files,
        "result": result,
        "settings": post.settings,
        "post": post,
    }


def mask_parts(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The connected parts of a mask (any shape; 26-connected in 3D, as the mask's minimum
    size counts them): an int32 label array of its shape (0 outside, 1..n) and n."""
    import numpy as np
    from scipy.ndimage import label

    labels, n = label(np.asarray(mask) > 0, structure=np.ones((3,) * np.ndim(mask), bool))
    return labels.astype(np.int32, copy=False), int(n)


def count_parts(mask: np.ndarray) -> int:
    """The number of :func:`mask_parts`, labelled within the mask's bounding box only (the
    labels of a whole 600x600x400 scan would be 0.5 GiB of int32; an empty mask has none)."""
    import numpy as np

    from .preprocess import bounding_box

    mask = np.asarray(mask) > 0
    return mask_parts(mask[bounding_box(mask)])[1] if mask.any() else 0
