"""Put a trained model folder in the package as a bundled model.

    python scripts/bundle_model.py MODEL_FOLDER --name t1-brain [--overwrite]

Copies ``weights.safetensors`` and ``model.json`` (renamed ``--name``) into
``src/napari_vaeloc/models/weights/NAME``. From the bundled model it replaces it keeps the
registration template of its space (``template.nii.gz``, ``template_brain_mask.nii.gz``, named in
the card) and its companion models (``defaults.fuse_with``, with ``fuse`` as it was). Beside the
weights it writes ``NOTICE``: every training source with its origin and terms, from the card's
own records, and copies the MNI notice. The card must carry training provenance
(``training.builder.check_provenance``); the weights are checked against the card's checksum on
the way in.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import tempfile
from pathlib import Path

from napari_vaeloc.models.card import ModelCard
from napari_vaeloc.models.store import (
    CARD_FILE,
    MNI_NOTICE_FILE,
    TEMPLATE_FILE,
    TEMPLATE_MASK_FILE,
    WEIGHTS_FILE,
    load_model,
)
from napari_vaeloc.training.builder import card_provenance, check_provenance, mark_validation

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "napari_vaeloc"
WEIGHTS = PACKAGE / "models" / "weights"
KEPT = (TEMPLATE_FILE, TEMPLATE_MASK_FILE, MNI_NOTICE_FILE)


def notice_text(card: ModelCard) -> str:
    """The NOTICE of a bundled model: its training sources and their terms."""
    lines = [
        f"Model {card.name}: weights trained on the following healthy sources (images read,",
        "never shipped). Each source's terms, as its package states them:",
        "",
    ]
    for r in card.provenance.training.get("source_records", []):
        role = f" ({r['role']})" if r.get("role") else ""
        lines.append(f"- {r['name']}{role}: {r.get('description', '')}")
        if r.get("origin"):
            lines.append(f"  from: {r['origin']}")
        lines.append(f"  terms: {r['licence']}")
    lines += ["", "The MNI notice for the ICBM templates is in MNI-COPYING beside this file.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", type=Path)
    p.add_argument("--name", required=True)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args()
    model = load_model(args.model)  # checks the weights against the card's checksum
    card = model.card
    check_provenance(card)
    target = WEIGHTS / args.name
    old = ModelCard.load(target / CARD_FILE) if (target / CARD_FILE).exists() else None
    if old is not None and not args.overwrite:
        raise SystemExit(f"{target} exists; pass --overwrite to replace it")
    card = dataclasses.replace(card, name=args.name)
    training = card.provenance.training
    if training.get("split", {}).get("by") == "source":  # runs from before roles were recorded
        held = {n.split("#")[0] for n in training["split"].get("val_names", [])}
        mark_validation(training["source_records"], held)
        sources, _ = card_provenance(training["source_records"])
        card.provenance = dataclasses.replace(card.provenance, sources=sources)
    if old is not None:
        card.defaults = dataclasses.replace(
            card.defaults, fuse_with=old.defaults.fuse_with, fuse=old.defaults.fuse
        )
        card.preprocessing = dataclasses.replace(
            card.preprocessing,
            template=old.preprocessing.template,
            template_brain_mask=old.preprocessing.template_brain_mask,
        )
    with tempfile.TemporaryDirectory(dir=WEIGHTS) as tmp:
        staged = Path(tmp) / args.name
        staged.mkdir()
        shutil.copy2(args.model / WEIGHTS_FILE, staged / WEIGHTS_FILE)
        for name in KEPT:
            if (target / name).exists():
                shutil.copy2(target / name, staged / name)
        if not (staged / "MNI-COPYING").exists():
            shutil.copy2(PACKAGE / "data" / "MNI-COPYING", staged / "MNI-COPYING")
        card.save(staged / CARD_FILE)
        (staged / "NOTICE").write_text(notice_text(card), encoding="utf-8")
        load_model(staged)  # the staged folder loads before it replaces anything
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    print(f"bundled {args.model} as {target}")


if __name__ == "__main__":
    main()
