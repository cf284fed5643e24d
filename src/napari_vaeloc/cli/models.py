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
    header = ("name", "modality", "input", "z", "axis", "MB", "provenance")
    rows = []
    for name, path in models.items():
        c = read_card(path)
        size = (path / WEIGHTS_FILE).stat().st_size / 1e6
        rows.append(
            (
                name,
                str(c.modality),
                str(c.image_size),
                str(c.architecture.z_dim),
                str(c.axis),
                f"{size:.1f}",
                str(c.provenance.sources),
            )
        )
    for line in format_table(header, rows):
        print(line)
    return 0


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]], gap: int = 2) -> list[str]:
    """Left-aligned columns as wide as their longest entry plus ``gap`` spaces, so every column
    starts at the same offset in every row (the last column is not padded)."""
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) + gap for i in range(len(header) - 1)]
    return ["".join(v.ljust(w) for v, w in zip(r, widths, strict=False)) + r[-1] for r in table]
