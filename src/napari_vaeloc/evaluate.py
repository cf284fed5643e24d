"""Localization metrics and seeded synthetic-lesion benchmarks (scikit-learn metrics, numpy).

Pixel metrics pool every voxel of every case inside a region (the brain foreground, or the
whole image), as in the MOOD challenge.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .combine import CombineSettings, combine, component_scales
from .engine import localize
from .io import Volume
from .models.store import LoadedModel
from .synth import synthesize_anomaly

COMPONENTS = ("rec_error", "rec_error_smooth", "kl_grad", "rec_grad", "elbo_grad", "combi")


def pixel_metrics(score: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """AUROC, average precision and best Dice (over the whole precision-recall curve) of flat
    ``score`` against boolean ``truth``."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    t = np.asarray(truth, bool).ravel()
    s = np.asarray(score, np.float64).ravel()
    if t.all() or not t.any():
        return {"auroc": float("nan"), "ap": float("nan"), "best_dice": float("nan")}
    prec, rec, _ = precision_recall_curve(t, s)
    dice = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12), 0)
    return {
        "auroc": float(roc_auc_score(t, s)),
        "ap": float(average_precision_score(t, s)),
        "best_dice": float(dice.max()),
    }


@dataclass
class Case:
    """One test volume with its ground truth and the anomaly's parameters."""

    volume: Volume
    truth: np.ndarray  # uint8 (X, Y, Z)
    info: dict


def synthetic_cases(
    healthy: Volume, n: int, seed: int, kinds: Sequence[str] = ("tumour",)
) -> Iterator[Case]:
    """``n`` copies of ``healthy`` with one seeded anomaly each (kinds cycle in order)."""
    fg = healthy.data > healthy.data.min()
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        kind = kinds[i % len(kinds)]
        a = synthesize_anomaly(healthy.data, kind, rng, foreground=fg, spacing=healthy.spacing)
        vol = Volume(a.volume, healthy.affine, healthy.header, None, healthy.source_dtype)
        yield Case(vol, a.mask, {**a.info, "case": i})


def score_cases(
    model: LoadedModel,
    cases: Sequence[Case],
    settings: Sequence[CombineSettings] = (),
    components: Sequence[str] = COMPONENTS,
    device: str = "auto",
) -> dict[str, dict[str, float]]:
    """Pooled pixel metrics inside the brain for each component and each combination setting.

    The brain is the healthy foreground plus the lesion. Combination settings are labelled
    ``"combined[i]"`` in the order given.
    """
    pooled, truth = collect_scores(model, cases, settings, components, device)
    return {k: pixel_metrics(v, truth) for k, v in pooled.items()}


def collect_scores(
    model: LoadedModel,
    cases: Sequence[Case],
    settings: Sequence[CombineSettings] = (),
    components: Sequence[str] = COMPONENTS,
    device: str = "auto",
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Scores of every brain voxel of every case (float32 arrays, one per map) and the truth."""
    pooled: dict[str, list[np.ndarray]] = {}
    truths: list[np.ndarray] = []
    calib = model.card.calibration
    for case in cases:
        res = localize(case.volume, model, device=device)
        region = res.foreground | case.truth.astype(bool)
        truths.append(case.truth[region].astype(bool))
        for k in components:
            pooled.setdefault(k, []).append(res.maps[k][region])
        for i, s in enumerate(settings):
            fg = res.foreground if s.foreground_only else None
            scales, _ = component_scales(res.maps, fg, calib, list(s.weights))
            c = combine(res.maps, s.weights, scales, None, s.smoothing_mm, case.volume.spacing)
            pooled.setdefault(f"combined[{i}]", []).append(c[region])
    return {k: np.concatenate(v) for k, v in pooled.items()}, np.concatenate(truths)


def synthetic_benchmark(
    model: LoadedModel,
    healthy: Volume,
    cases_per_kind: int,
    kinds: Sequence[str],
    seed: int = 0,
    device: str = "auto",
) -> list[dict]:
    """Pixel metrics of every component and of the model's default combination, per anomaly
    kind and over all kinds pooled. Rows: {kind, map, auroc, ap, best_dice, cases}; the same
    seed gives the same rows."""
    default = CombineSettings.from_card(model.card)
    rows: list[dict] = []
    every: dict[str, list[np.ndarray]] = {}
    truths: list[np.ndarray] = []
    for k_i, kind in enumerate(kinds):
        cases = list(synthetic_cases(healthy, cases_per_kind, seed * 1000 + k_i, (kind,)))
        pooled, truth = collect_scores(model, cases, [default], COMPONENTS, device)
        pooled["default"] = pooled.pop("combined[0]")
        truths.append(truth)
        for name, values in pooled.items():
            every.setdefault(name, []).append(values)
            rows.append(
                {"kind": kind, "map": name, "cases": cases_per_kind, **pixel_metrics(values, truth)}
            )
    truth = np.concatenate(truths)
    for name, parts in every.items():
        rows.append(
            {
                "kind": "all",
                "map": name,
                "cases": cases_per_kind * len(kinds),
                **pixel_metrics(np.concatenate(parts), truth),
            }
        )
    return rows


def rows_to_csv(rows: list[dict]) -> str:
    """CSV text of :func:`synthetic_benchmark` rows."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def rows_to_markdown(rows: list[dict]) -> str:
    """Markdown table of :func:`synthetic_benchmark` rows."""
    lines = ["| kind | map | pixel AUROC | AP | best Dice | cases |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {r['kind']} | {r['map']} | {r['auroc']:.3f} | {r['ap']:.3f} | "
        f"{r['best_dice']:.3f} | {r['cases']} |"
        for r in rows
    ]
    return "\n".join(lines)
