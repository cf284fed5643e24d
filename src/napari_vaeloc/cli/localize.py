"""``vaeloc localize``: score one scan and write its maps, mask and scores."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import VaelocError
from ..mapnames import COMBINABLE_MAPS, DEFAULT_MAPS, PRESETS, check_names
from . import options

if TYPE_CHECKING:
    from ..combine import PostProcessor


def _epilog() -> str:
    maps = f"{', '.join(DEFAULT_MAPS[:-1])} and {DEFAULT_MAPS[-1]}"
    return (
        f"Outputs (localize): SCAN_<map>.nii.gz for {maps}, SCAN_combined.nii.gz, "
        "SCAN_mask.nii.gz (uint8) and SCAN_scores.json (slice and volume scores), all in the "
        "scan's own geometry."
    )


EPILOG = _epilog()


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``localize`` subcommand."""
    lo = subparsers.add_parser(
        "localize",
        help="score a NIfTI scan and write anomaly maps and a mask",
        description="Score every slice of a scan with a VAE and write the anomaly "
        "maps, the combined map and a mask as NIfTI next to a JSON of scores.",
        epilog=EPILOG,
    )
    lo.add_argument("scan", help="the scan, .nii or .nii.gz (2D, 3D, or 4D with --volume-index)")
    options.add_model(lo, options.AUTO_MODEL, options.AUTO_MODEL_HELP)
    options.add_axis(lo, help="anatomical slicing axis (default: the model's training axis)")
    lo.add_argument(
        "--fuse",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average in the model's companion models for the other slicing axes (default: "
        "as the model card says; t1-brain can fuse three axes, off by default)",
    )
    options.add_prepare(lo)
    options.add_device(lo)
    options.add_out(
        lo, help="output folder (default: next to the scan; the current folder for a sample)"
    )
    options.add_volume_index(lo)
    lo.add_argument("--batch-size", type=int, default=64, help="slices per batch (default: 64)")
    lo.add_argument(
        "--preset",
        choices=PRESETS,
        default="default",
        help="the combination to start from: the model's default, or paper (Zimmerer et al. "
        "2019 as published: Combi alone, no 3D smoothing or per-scan normalisation, threshold "
        "at the healthy 99th percentile); the options below change it (default: default)",
    )
    lo.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="mask threshold in units of the combined map (default: the model's)",
    )
    lo.add_argument(
        "--weights",
        default=None,
        help="combination weights, e.g. combi=1,elbo_grad=0.5 (default: the model's)",
    )
    lo.add_argument(
        "--smoothing",
        type=float,
        default=None,
        help="3D Gaussian smoothing of the combined map, sigma in mm (default: the model's)",
    )
    lo.add_argument(
        "--scan-normalise",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="express the combined map in robust z-units of the scan itself; the threshold is "
        "then in those units (default: the model's)",
    )
    options.add_overwrite(lo)
    options.add_quiet(lo)
    lo.set_defaults(func=run)


def parse_weights(text: str) -> dict[str, float]:
    """ "combi=1,elbo_grad=0.5" -> {"combi": 1.0, "elbo_grad": 0.5}.

    Raises:
        VaelocError: a part is not ``name=number``.
    """
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep:
            raise VaelocError(f"weights must look like name=value[,name=value], got {part!r}")
        try:
            out[name.strip()] = float(value)
        except ValueError as exc:
            raise VaelocError(f"weight of {name!r} is not a number: {value!r}") from exc
    return out


def run(args: argparse.Namespace) -> int:
    """Localize anomalies in ``args.scan`` and write the results; returns the exit status."""
    # check the combination options first: a typo fails at once, before anything is loaded
    weights = parse_weights(args.weights) if args.weights else None
    if weights is not None:
        check_names(weights, COMBINABLE_MAPS, "weights")
    if args.smoothing is not None and args.smoothing < 0:
        raise VaelocError(f"--smoothing must be >= 0 mm, not {args.smoothing}")
    if args.threshold is not None and args.threshold < 0:
        raise VaelocError(f"--threshold must be >= 0, not {args.threshold}")
    if args.batch_size < 1:
        raise VaelocError(f"--batch-size must be at least 1, not {args.batch_size}")
    from ..engine import resolve_device

    resolve_device(args.device)  # an unavailable device fails before the scan is prepared
    prepare = options.prepare_settings(args)
    from ..io import default_output_folder

    out = Path(args.out) if args.out else default_output_folder(args.scan)

    # the output folder and the files a run would replace: checked before any work
    from ..export import planned_paths
    from ..io import check_output_folder, refuse_existing

    check_output_folder(out)
    refuse_existing(planned_paths(Path(args.scan), out).values(), args.overwrite, "output file")

    from ..combine import CombineSettings, PostProcessor
    from ..engine import EngineOptions, localize, maps_for
    from ..export import write_result
    from ..io import load_volume, scan_stem
    from ..models.store import cached_model

    volume = load_volume(args.scan, volume_index=args.volume_index)
    model = cached_model(options.model_for_scan(args, volume, prepare))
    changes = {
        "threshold": args.threshold,
        "weights": weights,
        "smoothing_mm": args.smoothing,
        "scan_normalise": args.scan_normalise,
    }
    settings = CombineSettings.preset(args.preset, model.card).replace(
        **{k: v for k, v in changes.items() if v is not None}
    )
    maps = maps_for(model.card, settings.used_weights())  # the model's may add costly maps
    planned = planned_paths(Path(args.scan), out, maps=maps)
    refuse_existing(planned.values(), args.overwrite, "output file")
    with options.LazyBar("scoring slices", "slice", args) as bar:
        engine = EngineOptions(
            device=args.device,
            batch_size=args.batch_size,
            progress=bar.progress,
            stage=None if args.quiet else bar.stage,
        )
        result = localize(
            volume, model, engine, axis=args.axis, fuse=args.fuse, prepare=prepare, maps=maps
        )
    post = PostProcessor(result, settings)
    paths = write_result(result, post, out, stem=scan_stem(args.scan), overwrite=args.overwrite)
    if result.preparation is not None:
        for line in result.preparation.lines():
            print(line)
        for warning in result.preparation.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"{result.model_name} on {result.device}, {result.axis} slices, {result.seconds:.1f} s")
    print(mask_summary(post, paths["scores"]))
    for p in paths.values():
        print(p)
    return 0


def mask_summary(post: PostProcessor, scores: Path) -> str:
    """One line on the mask written: its volume (the scores file's ``mask_volume_ml``), its
    connected parts (:func:`..demo.mask_parts`), the threshold and, for a calibrated
    combination, the healthy false-positive rate it was read at, e.g. "mask: 11.1 ml in 2
    parts (threshold 2.66, healthy false-positive rate 0.1 %)"."""
    import json

    from ..demo import mask_parts

    ml = json.loads(Path(scores).read_text())["mask_volume_ml"]
    n = mask_parts(post.mask())[1]
    threshold = post.settings.threshold
    fpr, pairs = post.fpr_for_threshold(threshold), post.fpr_table()
    if fpr is None:
        rate = "no healthy false-positive rate: " + (
            "uncalibrated model" if not post.is_calibrated() else "custom combination"
        )
    elif threshold > pairs[-1][0]:
        rate = f"healthy false-positive rate < {pairs[-1][1] * 100:.2g} %"
    elif threshold < pairs[0][0]:
        rate = f"healthy false-positive rate > {pairs[0][1] * 100:.2g} %"
    else:
        rate = f"healthy false-positive rate {fpr * 100:.2g} %"
    return (
        f"mask: {ml:.1f} ml in {n} part{'' if n == 1 else 's'} (threshold {threshold:.3g}, {rate})"
    )
