"""``vaeloc demo``: localize the lesion of a bundled sample scan and score the maps."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand."""
    from ..demo import DEFAULT_DEMO, DEMOS

    de = subparsers.add_parser(
        "demo",
        help="localize the lesion of a bundled sample scan with a bundled model",
        description="Run the whole pipeline on a bundled sample with a synthetic lesion (by "
        "default a raw T1 head with skull, in its own orientation): preparation with its fit "
        "checks, scoring, every map and the mask written on the scan's grid; then print how "
        "well each map finds the known lesion inside the brain (pixel AUROC, average "
        "precision, Dice) and how much of the mask lies outside the brain.",
    )
    de.add_argument(
        "--sample",
        choices=list(DEMOS),
        default=DEFAULT_DEMO,
        help="which sample to run on (default: %(default)s)",
    )
    options.add_out(de, default="vaeloc-demo", help="output folder (default: %(default)s)")
    options.add_model(
        de, None, "model name or folder (default: the sample's model, of the sample's modality)"
    )
    options.add_prepare(de)
    options.add_device(de)
    options.add_threads(de)
    options.add_overwrite(de)
    options.add_quiet(
        de,
        help="no progress bars or stage lines; the preparation's steps and checks, the metrics, "
        "the mask line and the output folder still print (showing them is the demo's point)",
    )
    de.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo and print its checks and metrics; returns the exit status. The output
    folder and the files it would replace are checked first, before anything is loaded."""
    from ..demo import check_demo_outputs

    options.use_threads(args)
    check_demo_outputs(args.out, args.overwrite, args.sample)

    from ..demo import run_demo
    from .localize import describe_mask

    with options.LazyBar("scoring slices", "slice", args) as bar:
        res = run_demo(
            args.out,
            model=args.model,
            device=args.device,
            overwrite=args.overwrite,
            progress=bar.progress,
            sample=args.sample,
            prepare=args.prepare,
            stage=None if args.quiet else bar.stage,
        )
    r = res["result"]
    # the order of `vaeloc localize`: the preparation, the notes, the run, then the mask; the
    # preparation's checks are printed even with --quiet (showing them is the demo's point)
    if r.preparation is not None:
        options.print_preparation(r.preparation, args, always=True)
    for note in r.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"{r.model_name} on {r.device}, {r.slices}: {res['demo'].description}, {r.seconds:.1f} s")
    print("pixel metrics inside the brain against the known lesion:")
    print(f"  {'map':<20}{'AUROC':>8}{'AP':>8}{'best Dice':>11}")
    for k, m in res["metrics"].items():
        print(f"  {k:<20}{m['auroc']:>8.3f}{m['ap']:>8.3f}{m['best_dice']:>11.3f}")
    stray = res["stray_parts"]
    print(describe_mask(res["post"], res["mask_ml"], res["parts"], r.notes))
    print(
        f"  against the known lesion: Dice {res['mask_dice']:.3f}; {stray} "
        f"part{'' if stray == 1 else 's'} ({res['stray_ml']:.1f} ml) not touching it; "
        f"{res['outside_ml']:.1f} ml outside the brain"
    )
    print(f"outputs in {Path(args.out).resolve()}")
    return 0
