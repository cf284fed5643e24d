"""``vaeloc models``: list the bundled models."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``models`` subcommand."""
    mo = subparsers.add_parser(
        "models",
        help="list the bundled models",
        description="List the models bundled with the package.",
    )
    mo.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print a table of the bundled models; returns the exit status."""
    from ..models.store import WEIGHTS_FILE, bundled_models, read_card

    models = bundled_models()
    if not models:
        print("No pretrained models are bundled with this installation.")
        print("Train one with `vaeloc train` and pass its folder with --model PATH.")
        return 0
    print(f"{'name':<12}{'modality':<10}{'input':<8}{'z':<6}{'axis':<8}{'MB':<6}provenance")
    for name, path in models.items():
        c = read_card(path)
        size = (path / WEIGHTS_FILE).stat().st_size / 1e6
        z = c.architecture.z_dim
        print(
            f"{name:<12}{c.modality:<10}{c.image_size:<8}{z:<6}{c.axis:<8}{size:<6.1f}"
            f"{c.provenance.sources}"
        )
    return 0
