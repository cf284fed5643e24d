"""``vaeloc demo``: localize the lesion of the bundled sample scan and score the maps."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import options


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand."""
    de = subparsers.add_parser(
        "demo",
        help="localize the lesion of the bundled sample scan with a bundled model",
        description="Run a bundled model on the bundled T2 sample scan with a synthetic "
        "tumour-like lesion, write every map and the mask, and print how well each map finds "
        "the known lesion (pixel AUROC, average precision, Dice).",
    )
    options.add_out(de, default="vaeloc-demo", help="output folder (default: %(default)s)")
    options.add_model(de)
    options.add_device(de)
    options.add_overwrite(de)
    options.add_quiet(de)
    de.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo and print its metrics; returns the exit status."""
    from ..demo import run_demo

    with options.progress_bar("scoring slices", "slice", args) as bar:
        res = run_demo(
            args.out,
            model=args.model,
            device=args.device,
            overwrite=args.overwrite,
            progress=options.fraction_progress(bar),
        )
    r = res["result"]
    print(
        f"{r.model_name} on {r.device}: sample T2 scan with a synthetic lesion, {r.seconds:.1f} s"
    )
    print("pixel metrics inside the brain against the known lesion:")
    print(f"  {'map':<20}{'AUROC':>8}{'AP':>8}{'best Dice':>11}")
    for k, m in res["metrics"].items():
        print(f"  {k:<20}{m['auroc']:>8.3f}{m['ap']:>8.3f}{m['best_dice']:>11.3f}")
    s = res["settings"]
    print(f"mask at the model's default threshold ({s.threshold:.3g}): Dice {res['mask_dice']:.3f}")
    print(f"outputs in {Path(args.out).resolve()}")
    return 0
