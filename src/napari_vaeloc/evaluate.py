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
    truth = np.concatenate(truths)
    return {k: pixel_metrics(np.concatenate(v), truth) for k, v in pooled.items()}
