"""``vaeloc calibrate``: set a trained model's default combination and threshold."""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path

from ..combine import GROW_FPR, OUTLINE_FRACTION, sharper_map
from ..errors import InputError
from ..models.card import Calibration
from ..prepare import TEMPLATE_MARGIN_MM
from ..training.operating_point import SMOOTHING_CANDIDATES_MM
from . import options

#: the smoothing (sigma, mm) a card never calibrated for a combination is calibrated at
DEFAULT_SMOOTHING_MM = 8.0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``calibrate`` subcommand."""
    ca = subparsers.add_parser(
        "calibrate",
        help="set a trained model's default combination and threshold",
        description="Recalibrate a model folder written by `vaeloc train` for a default "
        "combination: the false-positive table is measured on the held-out healthy brains of "
        "its training run (put through the preparation stage when the model ships a template), and "
        "the default threshold is read at --fpr, or chosen on lesions seeded into those "
        "brains (--fpr best-dice). Only model.json is rewritten.",
    )
    ca.add_argument(
        "model",
        help="a model folder written by `vaeloc train` (rewritten in place), or, with --out, "
        "a bundled model's name or any model folder to calibrate a copy of",
    )
    options.add_out(
        ca,
        help="calibrate a copy: MODEL is copied to this new folder, named after it, and only the "
        "copy is calibrated (removed again if calibration fails)",
    )
    ca.add_argument(
        "--weights",
        default="restoration=1",
        metavar="MAP=W,...",
        help="the default combination (default: restoration=1, the bundled models' default)",
    )
    ca.add_argument(
        "--smoothing-mm",
        default=None,
        help="3D smoothing of the combined map, sigma in mm (default: the one the model's "
        f"card was calibrated at, {DEFAULT_SMOOTHING_MM:g} for a card never calibrated), or "
        "best: try "
        f"{', '.join(f'{c:g}' for c in SMOOTHING_CANDIDATES_MM)} mm, give each its own "
        "false-positive table and threshold (at --fpr, outlined as --grow-fpr says), seed a "
        "medium and a large lesion of two kinds into every held-out brain, and keep the one "
        "with the largest average precision plus mean Dice of its mask (the bundled models "
        "chose 6). Needs a model that ships a template; not with --fpr best-dice",
    )
    ca.add_argument(
        "--no-scan-normalise",
        action="store_true",
        help="keep the model's scale instead of normalising each scan's map",
    )
    ca.add_argument(
        "--fpr",
        default="0.001",
        help="healthy false-positive rate of the default threshold, one of the calibrated "
        "levels (0.0001 ... 0.1; default 0.001), or best-dice: the level whose mask best "
        "matches lesions seeded into the held-out brains",
    )
    ca.add_argument(
        "--grow-fpr",
        default=str(GROW_FPR),
        help="outline the default mask's parts down to the threshold of this healthy "
        "false-positive rate (a calibrated level looser than --fpr), or none for a plain "
        f"threshold (default: {GROW_FPR})",
    )
    ca.add_argument(
        "--outline-fraction",
        type=float,
        default=None,
        help="when the mask is outlined (--grow-fpr, on by default): a part's outline lies "
        "at this fraction of its peak, never below the grow level (default: the model card's, "
        f"else {OUTLINE_FRACTION})",
    )
    ca.add_argument(
        "--outline-smoothing-mm",
        default=None,
        help="when the mask is outlined (--grow-fpr, on by default): draw each part's edge on "
        "the combination smoothed with this sigma (mm; 0: unsmoothed), a sharper map than the "
        "default's, whose wide Gaussian moves a lesion's edge outwards; none to draw it on "
        "the combined map itself; or best: try the combined map and 0, 2, 3 and 4 mm, each at "
        "0.3, 0.4 and 0.5 of the part's peak, on a medium and a large lesion of two kinds seeded "
        "into every held-out brain (two draws), and keep the outline with the best mean Dice "
        "(the bundled t1-brain chose 0 and 0.3; needs a model that ships a template; not with "
        "--outline-fraction, --smoothing-mm best or --fpr best-dice). Default: as the model's "
        "card says",
    )
    ca.add_argument(
        "--cache",
        default=None,
        help="the folder the synthetic individuals were cached in (`vaeloc train --cache`); "
        "without it they are made again from their seeds",
    )
    ca.add_argument(
        "--sources",
        default=None,
        metavar="DIR",
        help="the folder holding the NIfTI training files the model card names (default: the "
        "working folder); packaged templates are found by name",
    )
    ca.add_argument(
        "--beyond-template",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="when measuring the false-positive table, also score the held-out brains where "
        f"they reach more than {TEMPLATE_MARGIN_MM:g} mm beyond the template's brain "
        "(localize, the widget and the "
        "cohort runner never score there). The threshold comes out stricter; use it when the "
        "default threshold flags too much of real healthy scans because the held-out brains "
        "are more regular than real ones (the bundled t2-brain is calibrated this way). "
        "Default: as the model's card was calibrated",
    )
    ca.add_argument(
        "--healthy-scans",
        nargs="+",
        default=[],
        metavar="SCAN",
        help="healthy scans (NIfTI: raw heads with skull or brains, as your scanner writes "
        "them) to calibrate on as well, each prepared as `vaeloc localize` prepares a scan: "
        "the false-positive table, the threshold and the rate the mask claims then hold for "
        "scans like them too. Needs a model that ships a template",
    )
    ca.add_argument(
        "--ventricles",
        type=float,
        default=None,
        metavar="MM",
        help="grow the held-out synthetic individuals' ventricles into the tissue around them "
        "by a distance drawn from 0 to MM (as `vaeloc train --ventricles`), so that a model "
        "trained without older brains' ventricles is calibrated on brains that have them "
        "(default: as the model's calibration was made; 0: the held-out brains as they were "
        "made for training)",
    )
    options.add_threads(ca)
    ca.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Recalibrate ``args.model``; returns the exit status."""
    from .localize import parse_weights

    weights = parse_weights(args.weights)
    fpr = _level(args.fpr, "--fpr", allow="best-dice")
    grow_fpr = _level(args.grow_fpr, "--grow-fpr", allow="none")
    if grow_fpr is not None and fpr is not None and grow_fpr <= fpr:
        raise InputError(f"--grow-fpr ({grow_fpr:g}) must be a looser level than --fpr ({fpr:g})")
    smoothing, candidates = _smoothing(args.smoothing_mm, args.model)
    if candidates is not None and fpr is None:
        raise InputError("--smoothing-mm best and --fpr best-dice cannot be chosen together")
    outline_smoothing = _outline_smoothing(args.outline_smoothing_mm)
    shaped = args.outline_fraction is not None or args.outline_smoothing_mm not in (None, "none")
    if args.outline_smoothing_mm == "best" and args.outline_fraction is not None:
        raise InputError("--outline-smoothing-mm best chooses the fraction too: leave out "
                         "--outline-fraction")  # fmt: skip
    if grow_fpr is None and shaped:
        raise InputError(
            "--outline-fraction and --outline-smoothing-mm shape the outline down to --grow-fpr; "
            "with --grow-fpr none the mask is a plain threshold: leave them out"
        )
    if args.outline_fraction is not None and not 0.0 <= args.outline_fraction < 1.0:
        raise InputError(f"--outline-fraction must be in [0, 1), not {args.outline_fraction}")
    missing = [p for p in args.healthy_scans if not Path(p).is_file()]
    if missing:
        raise InputError(f"healthy scan not found: {missing[0]}")
    if not args.out and not Path(args.model).is_dir():
        from ..models.store import bundled_models

        if args.model in bundled_models():
            raise InputError(
                f"{args.model} is a bundled model, which calibration never rewrites: calibrate "
                "a copy of it with --out NEW_FOLDER"
            )
    options.use_threads(args)
    if args.out:
        from ..models.store import copy_model

        if Path(args.out).exists():
            raise InputError(f"{args.out} exists; give --out a new folder for the calibrated copy")
        folder = copy_model(args.model, args.out)
    else:
        folder = args.model
    try:
        cal = _recalibrate(
            args, folder, weights, fpr, smoothing, grow_fpr, candidates, outline_smoothing
        )
    except BaseException:
        if args.out:  # nothing half-made is left behind
            shutil.rmtree(folder, ignore_errors=True)
        raise
    _report(cal, folder, candidates)
    return 0


def _recalibrate(
    args: argparse.Namespace,
    folder: str | Path,
    weights: dict[str, float],
    fpr: float | None,
    smoothing: float | None,
    grow_fpr: float | None,
    candidates: tuple[float, ...] | None,
    outline_smoothing: float | str | None,
) -> Calibration:
    from ..training.builder import recalibrate

    return recalibrate(
        folder,
        weights,
        fpr=fpr,
        smoothing_mm=smoothing,
        scan_normalise=not args.no_scan_normalise,
        cache_dir=args.cache,
        source_dir=args.sources,
        grow_fpr=grow_fpr,
        outline_fraction=args.outline_fraction,
        outline_smoothing_mm=outline_smoothing,
        beyond_template=args.beyond_template,
        smoothing_candidates=candidates,
        healthy_scans=args.healthy_scans,
        ventricles_mm=args.ventricles,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )


def _report(cal: Calibration, folder: str | Path, candidates: tuple[float, ...] | None) -> None:
    """What the calibration chose, on stdout."""
    from ..models.store import read_card

    table = cal.combined_fpr or {}
    d = read_card(folder).defaults
    if cal.combined_dice:
        print("healthy FPR  threshold  Dice on seeded lesions")
        for level, dice in sorted(cal.combined_dice.items(), key=lambda kv: float(kv[0])):
            print(f"{float(level):<12g} {table[level]:<10.3f} {dice:.3f}")
    if cal.combined_smoothing_scores and candidates is not None:
        print("smoothing (mm)  AP + mean Dice on seeded lesions")
        for mm, score in cal.combined_smoothing_scores.items():
            print(f"{mm:<15} {score:.3f}")
        print(f"default smoothing: {cal.combined_smoothing_mm:g} mm")
    if cal.combined_outline_scores:
        print("outline (map smoothing mm / fraction of the peak)  mean Dice on seeded lesions")
        for name, score in cal.combined_outline_scores.items():
            print(f"{name:<50} {score:.3f}")
    if cal.combined_source:
        print(f"calibrated on: {cal.combined_source}")
    print(
        f"default threshold: {d.threshold:.3f} at the healthy false-positive rate "
        f"{d.threshold_fpr:g} (written to {folder})"
    )
    if cal.mask_fpr is not None:
        seen = cal.mask_fpr_calibration
        how = ""
        if d.outline_fraction is not None:
            how = f"each part outlined at {d.outline_fraction:g} of its peak"
            if d.outline_smoothing_mm is not None:
                how += " on " + sharper_map(d.outline_smoothing_mm)
            how += "; "
        print(
            f"default mask: {how}marks {cal.mask_fpr:.3%} of the held-out healthy brain "
            "voxels, each brain's levels set on the others"
            + (f" ({seen:.3%} with the levels set on all)" if seen is not None else "")
        )
    return 0


def _smoothing(text: str | None, model: str) -> tuple[float | None, tuple[float, ...] | None]:
    """``--smoothing-mm``: (sigma, None), or (None, the candidates) for best; not given,
    (None, None) (the card's smoothing) for a ``model`` whose card has a calibrated
    combination, else :data:`DEFAULT_SMOOTHING_MM`.

    Raises:
        InputError: neither a finite sigma of at least 0 nor best; ``model`` is not found.
    """
    if text is None:
        from ..models.store import read_card, resolve_model_path

        calibrated = read_card(resolve_model_path(model)).calibration.combined_smoothing_mm
        return (DEFAULT_SMOOTHING_MM if calibrated is None else None), None
    if text == "best":
        return None, SMOOTHING_CANDIDATES_MM
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0.0):
        raise InputError(f"--smoothing-mm must be a sigma in mm (0 or more) or best, not {text!r}")
    return value, None


def _outline_smoothing(text: str | None) -> float | str | None:
    """``--outline-smoothing-mm``: a sigma in mm, None for none,
    :data:`~napari_vaeloc.training.builder.BEST` for best, or
    :data:`~napari_vaeloc.training.builder.KEEP` when not given (the card's).

    Raises:
        InputError: neither a sigma of at least 0 nor none.
    """
    from ..training.builder import BEST, KEEP

    if text is None:
        return KEEP
    if text == "best":
        return BEST
    if text == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0.0):
        raise InputError(
            f"--outline-smoothing-mm must be a sigma in mm (0 or more), none or best, not {text!r}"
        )
    return value


def _level(text: str, option: str, allow: str) -> float | None:
    """A calibrated false-positive level given on the command line, or None for ``allow``.

    Raises:
        InputError: neither a level of the table nor ``allow``.
    """
    from ..training.loop import FPR_LEVELS

    if text == allow:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value not in FPR_LEVELS:
        levels = ", ".join(str(f) for f in FPR_LEVELS)
        raise InputError(f"{option} must be one of {levels} or {allow}, not {text!r}")
    return value
