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
    header = ("name", "modality", "slice px", "latent dims", "axis", "MB", "trained on")
    rows = []
    cards = {name: read_card(path) for name, path in models.items()}
    for name, path in models.items():
        c = cards[name]
        size = (path / WEIGHTS_FILE).stat().st_size / 1e6
        rows.append(
            (
                name,
                str(c.modality),
                str(c.image_size),
                str(c.architecture.z_dim),
                axes(name, cards),
                f"{size:.1f}",
                trained_on(c),
            )
        )
    for line in format_table(header, rows):
        print(line)
    return 0


def axes(name: str, cards: dict) -> str:
    """The slicing axis column (one word, as every column but the last): "axial+coronal+sagittal"
    for a model that fuses its companions by default, "coronal(fused)" for a companion."""
    card = cards[name]
    if card.defaults.fuses:
        return "+".join(card.defaults.fused_axes(str(card.axis), cards.get))
    into = any(name in (c.defaults.fuse_with or []) for c in cards.values())
    return f"{card.axis}(fused)" if into else str(card.axis)


def trained_on(card) -> str:
    """The training sources of a card in a few words: the names of the sources the weights
    learned from (not those held out for validation), the synthetic individuals per source, and
    which sources of another modality lent only their anatomy (their individuals are made in
    the card's contrast); the card's free-text provenance for cards without per-source
    records."""
    records = card.provenance.training.get("source_records") or []
    if not records:
        return str(card.provenance.sources)
    used = [r for r in records if not r.get("role")]
    text = ", ".join(r["name"] for r in used)
    made = max((int(r.get("individuals", 0)) for r in records), default=0)
    if made:
        text += f" (+{made} synthetic individuals each)"
    modality = str(card.modality)
    other = [
        r["name"] for r in used if str(r.get("modality", modality)).lower() != modality.lower()
    ]
    if other:
        text += f"; {', '.join(other)}: anatomy only, in {modality} contrast"
    held = [r["name"] for r in records if r.get("role")]
    if held:
        text += f"; held out: {', '.join(held)}"
    return text


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]], gap: int = 2) -> list[str]:
    """Left-aligned columns as wide as their longest entry plus ``gap`` spaces, so every column
    starts at the same offset in every row (the last column is not padded)."""
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) + gap for i in range(len(header) - 1)]
    return ["".join(v.ljust(w) for v, w in zip(r, widths, strict=False)) + r[-1] for r in table]
