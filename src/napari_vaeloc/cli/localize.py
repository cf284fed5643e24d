"""``vaeloc localize``: score one scan and write its maps, mask and scores.

The options that decide a scan's result (:func:`add_scan_options`, read back as a
:class:`~napari_vaeloc.pipeline.ScanSettings` by :func:`scan_settings`) are defined here once
and shared with ``vaeloc screen``; the scan itself goes through
:func:`napari_vaeloc.pipeline.localize_scan`, as every scan of a screen does.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import VaelocError
from ..mapnames import COMBINABLE_MAPS, DEFAULT_MAPS, MAP_DTYPES, OUTPUT_MAPS, PRESETS, check_names
from ..pipeline import ScanSettings
from . import options

if TYPE_CHECKING:
    from ..combine import PostProcessor
    from ..pipeline import ScanOutputs


def _epilog() -> str:
    maps = f"{', '.join(DEFAULT_MAPS[:-1])} and {DEFAULT_MAPS[-1]}"
    return (
        f"Outputs (localize): SCAN_<map>.nii.gz for {maps} and any map the model's default "
        "combination uses (restoration for the bundled models), or for the maps of --maps "
        "and those the combination uses; "
        "SCAN_combined.nii.gz, SCAN_mask.nii.gz (uint8) and SCAN_scores.json (slice and "
        "volume scores), all in the scan's own geometry."
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
    add_scan_options(lo)
    options.add_threads(lo)  # not a scan option: `screen` sets each worker's own
    options.add_overwrite(lo)
    options.add_quiet(lo)
    lo.set_defaults(func=run)


def add_scan_options(p: argparse.ArgumentParser, out_help: str | None = None) -> None:
    """The options that decide how one scan is scored and combined (``--axis``, ``--fuse``,
    ``--prepare`` and its step switches, ``--device``, ``--out``, ``--volume-index``,
    ``--batch-size``, ``--preset``, ``--threshold``, ``--no-outline``, ``--weights``,
    ``--smoothing``, ``--scan-normalise``), shared by ``localize`` and ``screen``; read them
    back with :func:`scan_settings`. ``out_help``: what ``--out`` means for the command."""
    options.add_axis(p, help="anatomical slicing axis (default: the model's training axis)")
    p.add_argument(
        "--fuse",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average in the model's companion models for the other slicing axes (default: "
        "as the model card says: t1-brain fuses its axial, coronal and sagittal models, and "
        "its calibrated threshold and rates are the fused map's; --no-fuse scores one axis: "
        "the scoring is about three times faster, preparing the scan and mapping the maps "
        "back take as long)",
    )
    options.add_prepare(p)
    options.add_device(p)
    options.add_out(
        p,
        help=out_help
        or "output folder (default: next to the scan; the current folder for a sample)",
        required=out_help is not None,
    )
    options.add_volume_index(p)
    p.add_argument("--batch-size", type=int, default=64, help="slices per batch (default: 64)")
    p.add_argument(
        "--preset",
        choices=PRESETS,
        default="default",
        help="the combination to start from: the model's default, or paper (Zimmerer et al. "
        "2019 as published: Combi alone, no 3D smoothing or per-scan normalisation, threshold "
        "at the healthy 99th percentile); the options below change it (default: default)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="mask threshold in units of the combined map (default: the model's)",
    )
    p.add_argument(
        "--no-outline",
        action="store_true",
        help="mask the voxels above the threshold only. By default (as the model's card says) "
        "each part found by the threshold ends where the map falls to a fraction of the part's "
        "peak, never below the model's grow level: weak parts grow beyond the threshold's "
        "voxels, strong ones are trimmed inside them",
    )
    p.add_argument(
        "--weights",
        default=None,
        help="combination weights, e.g. combi=1,elbo_grad=0.5 (default: the model's)",
    )
    p.add_argument(
        "--smoothing",
        type=float,
        default=None,
        help="3D Gaussian smoothing of the combined map, sigma in mm (default: the model's); "
        "lower it for small lesions. Where the model is calibrated at that smoothing (the "
        "bundled models: 0-8 mm) the outline's grow level, and the threshold unless "
        "--threshold is given, move to the default's healthy false-positive levels there",
    )
    p.add_argument(
        "--maps",
        default=None,
        help="the maps to compute and write, comma-separated, e.g. rec_error,kl_grad; "
        f"'default' (the model's default maps, the default), 'all', or names from: "
        f"{', '.join(OUTPUT_MAPS)}. Maps that the combination's weights use are always "
        "computed and written too",
    )
    p.add_argument(
        "--map-dtype",
        choices=MAP_DTYPES,
        default="float32",
        help="precision the maps are kept in while the scan is processed: float16 halves "
        "their memory, for very large scans; files are float32 either way (default: float32)",
    )
    p.add_argument(
        "--scan-normalise",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="express the combined map in robust z-units of the scan itself; the threshold is "
        "then in those units (default: the model's)",
    )


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


def scan_settings(args: argparse.Namespace, check_device: bool = True) -> ScanSettings:
    """The :class:`~napari_vaeloc.pipeline.ScanSettings` of the options of
    :func:`add_scan_options` and ``--model``, checked before anything is loaded: a typo fails
    at once. ``check_device``: also check that ``--device`` exists here (not for scans
    that run on other machines).

    Raises:
        VaelocError: malformed or unknown weights, negative smoothing or threshold, a batch
            size below 1.
        InputError: an unknown or unavailable device.
    """
    weights = parse_weights(args.weights) if args.weights else None
    if weights is not None:
        check_names(weights, COMBINABLE_MAPS, "weights")
    if args.smoothing is not None and args.smoothing < 0:
        raise VaelocError(f"--smoothing must be >= 0 mm, not {args.smoothing}")
    if args.threshold is not None and args.threshold < 0:
        raise VaelocError(f"--threshold must be >= 0, not {args.threshold}")
    if args.batch_size < 1:
        raise VaelocError(f"--batch-size must be at least 1, not {args.batch_size}")
    maps = None
    if args.maps is not None and args.maps.strip() != "default":
        maps = tuple(dict.fromkeys(m.strip() for m in args.maps.split(",") if m.strip()))
        if maps == ("all",):
            maps = OUTPUT_MAPS
        if not maps:
            raise VaelocError("--maps needs at least one map name")
        unknown = [m for m in maps if m not in OUTPUT_MAPS]
        if unknown:
            always = (
                " (the combined map and the mask are always written)"
                if {"combined", "mask"} & set(unknown)
                else ""
            )
            raise VaelocError(
                f"--maps: unknown map(s) {', '.join(unknown)}{always}; use 'default', 'all' "
                f"or names from {', '.join(OUTPUT_MAPS)}"
            )
    from ..engine import resolve_device

    if check_device:
        resolve_device(args.device)  # an unavailable device fails before the scan is prepared
    return ScanSettings(
        model=args.model,
        prepare=options.prepare_settings(args),
        axis=args.axis,
        fuse=args.fuse,
        volume_index=args.volume_index,
        device=args.device,
        batch_size=args.batch_size,
        preset=args.preset,
        threshold=args.threshold,
        outline=not args.no_outline,
        weights=weights,
        smoothing=args.smoothing,
        scan_normalise=args.scan_normalise,
        maps=maps,
        map_dtype=args.map_dtype,
    )


def _maps_to_check(settings: ScanSettings) -> tuple[str, ...]:
    """The maps a run may write, known before the scan is read: those of ``--maps`` (or the
    default maps) and those the combination weights, for the model named, or for every
    bundled model with ``--model auto`` (the one chosen is known only after the scan was
    prepared). The pipeline checks the exact list again once the model is known."""
    from ..models.store import bundled_models, read_card, resolve_model_path
    from ..pipeline import AUTO_MODEL

    try:
        folders = (
            list(bundled_models().values())
            if settings.model == AUTO_MODEL
            else [resolve_model_path(settings.model)]
        )
        cards = [read_card(f) for f in folders]
    except VaelocError:  # an unknown model: reported by the run, with its own message
        cards = []
    wanted = [*(settings.maps or DEFAULT_MAPS)]
    for card in cards:
        wanted += settings.wanted_maps(card, settings.combine_settings(card))
    return tuple(dict.fromkeys(wanted))


def run(args: argparse.Namespace) -> int:
    """Localize anomalies in ``args.scan`` and write the results; returns the exit status."""
    # check the combination options first: a typo fails at once, before anything is loaded
    settings = scan_settings(args)
    options.use_threads(args)
    from ..io import default_output_folder

    out = Path(args.out) if args.out else default_output_folder(args.scan)

    # the output folder and the files a run would replace: checked before any work
    from ..export import planned_paths
    from ..io import check_output_folder, refuse_existing

    check_output_folder(out)
    early = planned_paths(Path(args.scan), out, maps=_maps_to_check(settings))
    refuse_existing(early.values(), args.overwrite, "output file")

    from ..pipeline import localize_scan

    started = time.perf_counter()
    with options.LazyBar("scoring slices", "slice", args) as bar:
        done = localize_scan(
            args.scan,
            settings,
            out,
            overwrite=args.overwrite,
            progress=bar.progress,
            stage=None if args.quiet else bar.stage,
            log=options.print_line,
        )
    result, paths = done.result, done.paths
    if result.preparation is not None:
        options.print_preparation(result.preparation, args)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    took = time.perf_counter() - started  # reading, preparing, scoring and writing
    print(f"{result.model_name} on {result.device}, {result.slices}, {took:.1f} s in all")
    print(mask_summary(done))
    for p in paths.values():
        print(p)
    return 0


def mask_summary(done: ScanOutputs) -> str:
    """One line on the mask written: its volume (the scores file's ``mask_volume_ml``), its
    connected parts, the threshold and, for a calibrated combination, the healthy
    false-positive rate it was read at, e.g. "mask: 11.1 ml in 2 parts (threshold 2.66,
    healthy false-positive rate 0.1 %)"; with outlined parts their grow level and fraction,
    and for the default mask its own healthy rate first, e.g. "(threshold 5.22, each part
    (down to 3.24) outlined to 0.4 of its peak; on healthy brains this mask marks 0.68 % of
    the voxels, the threshold alone 0.1 %)", or, outlined on a sharper map, "each part (down to
    2.85) outlined to 0.3 of its peak on the unsmoothed map"; an empty mask "mask: empty
    (threshold ...", without an outline, and what it does not rule out; when a check of the
    preparation warned, the line ends by naming those checks."""
    prepared = done.result.preparation
    warned = [c.name for c in prepared.checks if c.level != "ok"] if prepared else []
    return describe_mask(
        done.post, done.mask_volume_ml(), done.mask_components(), done.result.notes, warned
    )


def describe_mask(
    post: PostProcessor, ml: float, n: int, notes: list[str], warned: Sequence[str] = ()
) -> str:
    """:func:`mask_summary` of a mask of ``ml`` millilitres in ``n`` connected parts, made by
    ``post``; ``notes`` are the localization's notes (an unprepared scan says so), ``warned``
    the names of the preparation's checks that warned (the line then says so)."""
    from ..combine import sharper_map

    threshold = post.settings.threshold
    fpr, pairs = post.fpr_for_threshold(threshold), post.fpr_table()
    if fpr is None and post.is_calibrated() and post.settings.is_paper():
        rate = "the paper's method: the healthy 99th percentile of Combi, 1 % of validation pixels"
    elif fpr is None:
        rate = "no healthy false-positive rate: " + (
            "uncalibrated model"
            if not post.is_calibrated()
            else post.uncalibrated_smoothing() or "custom combination"
        )
    elif threshold > pairs[-1][0]:
        rate = f"healthy false-positive rate < {pairs[-1][1] * 100:.2g} %"
    elif threshold < pairs[0][0]:
        rate = f"healthy false-positive rate > {pairs[0][1] * 100:.2g} %"
    else:
        rate = f"healthy false-positive rate {fpr * 100:.2g} %"
    source = post.levels_source()
    if source is not None:
        rate += f" ({source})"
    grow = post.settings.grow_level()
    if post.settings.outline_dropped():
        rate += (
            f"; no outline: the threshold is at or below its grow level "
            f"{post.settings.grow_threshold:.3g}"
        )
    if grow is not None:
        fraction = post.settings.outline_fraction
        sharp = post.settings.sharp_outline()
        if sharp is not None:
            outline = (
                f"each part (down to {grow:.3g}) outlined to {fraction:g} of its peak on "
                + sharper_map(sharp)
            )
        elif fraction:
            outline = f"each part (down to {grow:.3g}) outlined to {fraction:g} of its peak"
        else:
            outline = f"each part grown down to {grow:.3g}"
        parts = [outline] if n else []  # an empty mask has no part to outline
        mask_fpr = post.mask_fpr()
        if mask_fpr is not None and fpr is not None:
            # one rate leads: the mask's own (its parts reach below the threshold)
            rate = "; ".join([
                *parts, f"on healthy brains this mask marks {mask_fpr * 100:.2g} % of the "
                f"voxels, the threshold alone {fpr * 100:.2g} %",
            ])  # fmt: skip
        else:
            if fpr is not None:  # the threshold's rate: the mask's is measured at the default
                rate = f"the threshold's {rate}"
            rate = "; ".join([rate, *parts])
    from ..engine import APPROXIMATE_RATES, UNPREPARED_NOTE

    if any(note.endswith(UNPREPARED_NOTE) for note in notes):
        rate += "; NOT PREPARED: scored as given, see the note"
    if fpr is not None and post.rates_approximate():
        rate += f"; {APPROXIMATE_RATES}"
    if warned:
        rate += f"; the scan fits the model with warnings ({', '.join(warned)}): read with care"
    hint = post.small_lesion_hint("--smoothing {mm}") if n == 0 else post.cut_note()
    if hint is not None:
        rate += f"; {hint}"
    size = f"{ml:.1f} ml in {n} part{'' if n == 1 else 's'}" if n else "empty"
    return f"mask: {size} (threshold {threshold:.3g}, {rate})"
