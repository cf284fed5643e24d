"""Choose a bundled model's default combination on tuning cases of the brain benchmark.

    python scripts/tune_defaults.py --model t2-brain [--cases 10] [--seed 1] [--apply]

The tuning cases use another seed (other warps, other anomalies) than the reported benchmark
(seed 0). Candidates: the smoothed reconstruction error with 3D smoothing 0-8 mm, with and without
per-scan robust normalisation; each candidate's threshold table is calibrated on the model's
held-out healthy slabs. The candidate with the largest sum of pooled average precision (ranking)
and Dice at its threshold (the mask a user gets) wins. ``--apply``
rewrites the model's defaults and calibration (``training.builder.recalibrate``).
"""

from __future__ import annotations

import argparse
import itertools

from napari_vaeloc.combine import CombineSettings
from napari_vaeloc.evaluation.brain_benchmark import benchmark_cases, test_anatomies
from napari_vaeloc.evaluation.runner import evaluate_cases
from napari_vaeloc.models.store import load_model
from napari_vaeloc.training.builder import recalibrate, volume_fpr_table
from napari_vaeloc.training.datasets import heldout_masks, load_training_volumes

WEIGHTS = {"rec_error_smooth": 1.0}
SMOOTHING_MM = (0.0, 2.0, 4.0, 6.0, 8.0)
FPRS = ("0.01", "0.005", "0.001")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="t2-brain")
    p.add_argument("--cases", type=int, default=10, help="cases per anomaly kind")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--apply", action="store_true")
    args = p.parse_args()
    model = load_model(args.model)
    card = model.card
    record = card.provenance.training
    volumes, _ = load_training_volumes(record["sources"])
    masks = heldout_masks(volumes, card.axis, card.image_size, card.normalisation, record["split"])
    settings = {}
    for smoothing, scan in itertools.product(SMOOTHING_MM, (False, True)):
        base = CombineSettings(weights=dict(WEIGHTS), smoothing_mm=smoothing, scan_normalise=scan)
        table = volume_fpr_table(model, volumes, masks, base, card.calibration)
        for fpr in FPRS:
            name = f"s{smoothing:g}{'-scan' if scan else ''}@{fpr}"
            settings[name] = (smoothing, scan, fpr, base.replace(threshold=table[fpr]))
    anatomies = test_anatomies(card.modality, card, n=5, seed=args.seed)
    cases = benchmark_cases(anatomies, args.cases, seed=args.seed, healthy=5)
    report = evaluate_cases(
        model, cases, maps=(), settings={k: v[3] for k, v in settings.items()}, group_by=None
    )
    rows = {r["map"]: r for r in report.pixel_rows if r["region"] == "foreground"}
    print("| setting | AUROC | AP | best Dice | Dice at threshold | threshold |")
    print("|---|---|---|---|---|---|")
    for name in settings:
        r = rows[name]
        print(
            f"| {name} | {r['auroc']:.3f} | {r['ap']:.3f} | {r['best_dice']:.3f} | "
            f"{r['dice_at_threshold']:.3f} | {r['threshold']:.3f} |"
        )
    best = max(settings, key=lambda n: rows[n]["ap"] + rows[n]["dice_at_threshold"])
    smoothing, scan = settings[best][:2]
    print(f"chosen: {best}")
    if args.apply:
        recalibrate(
            model.path,
            WEIGHTS,
            fpr=float(settings[best][2]),
            smoothing_mm=smoothing,
            scan_normalise=scan,
        )
        print(f"rewrote the defaults of {model.path}")


if __name__ == "__main__":
    main()
