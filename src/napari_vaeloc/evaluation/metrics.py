"""Pixel- and sample-level detection metrics (scikit-learn's), with bounded memory for voxels.

Pixel metrics pool many volumes. Instead of keeping every voxel, :class:`PixelAccumulator`
quantises each score to float16 and counts positive and negative voxels per float16 value (two
int64 arrays of 65536 bins, 1 MiB, whatever the number of voxels). AUROC, average precision and
the precision-recall curve are then scikit-learn's, computed on the distinct occupied values
weighted by their counts, so ties are handled exactly as scikit-learn handles them. The only
approximation is the float16 rounding: scores within about 1e-3 relative of each other (float16
has an 11-bit significand) become ties, values below about 6e-8 become 0 and values beyond
+-65504 saturate to +-inf (still ranked, as the extremes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

N_BINS = 1 << 16
#: voxels turned into bin indices at a time (bounds the temporary arrays, ~8 bytes per voxel)
CHUNK = 1 << 22
_BITS = np.arange(N_BINS, dtype=np.uint32).astype(np.uint16)
#: every float16 bit pattern as its value (NaN patterns included)
BIN_VALUES = _BITS.view(np.float16).astype(np.float64)
_NAN_BINS = np.isnan(BIN_VALUES)


@dataclass
class PixelMetrics:
    """Pooled pixel metrics; NaN where undefined, with the reason.

    best_threshold: the score at which the best Dice is reached (voxels with score >= it are
    called anomalous), float16-rounded.
    """

    auroc: float
    ap: float
    best_dice: float
    best_threshold: float
    positives: int
    negatives: int
    reason: str = ""


def _undefined_reason(positives: int, negatives: int) -> str:
    if positives == 0 and negatives == 0:
        return "no voxels"
    if positives == 0:
        return "no anomalous voxels"
    if negatives == 0:
        return "no normal voxels"
    return ""


class PixelAccumulator:
    """Counts of anomalous (``pos``) and normal (``neg``) voxels per float16 score value.

    ``pos[b]`` / ``neg[b]``: int64 counts of voxels whose score rounds to the float16 with bit
    pattern ``b``. Accumulators with the same meaning can be added (``a + b``, ``a += b``).
    """

    def __init__(self) -> None:
        self.pos = np.zeros(N_BINS, np.int64)
        self.neg = np.zeros(N_BINS, np.int64)

    @property
    def positives(self) -> int:
        return int(self.pos.sum())

    @property
    def negatives(self) -> int:
        return int(self.neg.sum())

    @property
    def voxels(self) -> int:
        return self.positives + self.negatives

    def add(self, scores: np.ndarray, truth: np.ndarray, where: np.ndarray | None = None) -> None:
        """Count the voxels of ``scores`` (any float shape) against boolean ``truth`` (same
        shape), only where ``where`` (bool, same shape) is true when given.

        Raises:
            ValueError: shapes differ, or a counted score is NaN (nothing is added then).
        """
        s = np.asarray(scores)
        t = np.asarray(truth)
        if s.shape != t.shape or (where is not None and np.shape(where) != s.shape):
            raise ValueError(f"scores {s.shape}, truth {t.shape} and where must have one shape")
        s, t = s.reshape(-1), t.reshape(-1)
        w = None if where is None else np.asarray(where, bool).reshape(-1)
        counts = np.zeros(2 * N_BINS, np.int64)
        for i in range(0, s.size, CHUNK):
            sc, tc = s[i : i + CHUNK], t[i : i + CHUNK].astype(bool)
            if w is not None:
                sc, tc = sc[w[i : i + CHUNK]], tc[w[i : i + CHUNK]]
            with np.errstate(over="ignore"):  # beyond +-65504: +-inf
                code = sc.astype(np.float16).view(np.uint16).astype(np.intp)
            code[tc] += N_BINS
            counts += np.bincount(code, minlength=2 * N_BINS)
        neg, pos = counts[:N_BINS], counts[N_BINS:]
        if neg[_NAN_BINS].any() or pos[_NAN_BINS].any():
            n = int(neg[_NAN_BINS].sum() + pos[_NAN_BINS].sum())
            raise ValueError(f"{n} scores are NaN; anomaly scores must be numbers")
        self.neg += neg
        self.pos += pos

    def __iadd__(self, other: PixelAccumulator) -> PixelAccumulator:
        self.pos += other.pos
        self.neg += other.neg
        return self

    def __add__(self, other: PixelAccumulator) -> PixelAccumulator:
        out = PixelAccumulator()
        out += self
        out += other
        return out

    def distinct(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(values, positives, negatives): the distinct occupied score values, ascending
        (float64, -0 and +0 merged), with float64 counts of each."""
        occ = np.flatnonzero((self.pos + self.neg) > 0)
        values, inv = np.unique(BIN_VALUES[occ], return_inverse=True)
        pos = np.bincount(inv, weights=self.pos[occ], minlength=values.size)
        neg = np.bincount(inv, weights=self.neg[occ], minlength=values.size)
        return values, pos, neg

    def weighted_samples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(y_true, y_score, sample_weight, values) for scikit-learn: one positive and one
        negative entry per occupied value, scored by the value's rank (so +-inf is fine);
        ``values[rank]`` maps a rank back to the score."""
        values, pos, neg = self.distinct()
        rank = np.arange(values.size, dtype=np.float64)
        hp, hn = pos > 0, neg > 0
        y = np.concatenate([np.ones(hp.sum(), np.int8), np.zeros(hn.sum(), np.int8)])
        score = np.concatenate([rank[hp], rank[hn]])
        weight = np.concatenate([pos[hp], neg[hn]])
        return y, score, weight, values

    def metrics(self) -> PixelMetrics:
        """AUROC, average precision and the best Dice over the whole precision-recall curve."""
        from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

        p, n = self.positives, self.negatives
        reason = _undefined_reason(p, n)
        if reason:
            nan = float("nan")
            return PixelMetrics(nan, nan, nan, nan, p, n, reason)
        y, score, weight, values = self.weighted_samples()
        prec, rec, thr = precision_recall_curve(y, score, sample_weight=weight)
        dice = 2 * prec * rec / np.maximum(prec + rec, 1e-300)
        best = int(np.argmax(dice[:-1]))
        return PixelMetrics(
            auroc=float(roc_auc_score(y, score, sample_weight=weight)),
            ap=float(average_precision_score(y, score, sample_weight=weight)),
            best_dice=float(dice[best]),
            best_threshold=float(values[int(thr[best])]),
            positives=p,
            negatives=n,
        )

    def roc_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(false-positive rate, true-positive rate) of the pooled voxels."""
        from sklearn.metrics import roc_curve

        y, score, weight, _ = self.weighted_samples()
        fpr, tpr, _ = roc_curve(y, score, sample_weight=weight)
        return fpr, tpr

    def pr_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(recall, precision) of the pooled voxels."""
        from sklearn.metrics import precision_recall_curve

        y, score, weight, _ = self.weighted_samples()
        prec, rec, _ = precision_recall_curve(y, score, sample_weight=weight)
        return rec, prec


@dataclass
class Overlap:
    """Voxel counts of a binary mask against the truth: true/false positives, false negatives."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, mask: np.ndarray, truth: np.ndarray, where: np.ndarray | None = None) -> None:
        """Count ``mask`` (bool) against ``truth`` (bool, same shape), inside ``where``."""
        m, t = np.asarray(mask, bool), np.asarray(truth, bool)
        if where is not None:
            m, t = m[where], t[where]
        self.tp += int(np.count_nonzero(m & t))
        self.fp += int(np.count_nonzero(m & ~t))
        self.fn += int(np.count_nonzero(~m & t))

    def __iadd__(self, other: Overlap) -> Overlap:
        self.tp, self.fp, self.fn = self.tp + other.tp, self.fp + other.fp, self.fn + other.fn
        return self

    def __add__(self, other: Overlap) -> Overlap:
        return Overlap(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    @property
    def dice(self) -> float:
        """2 TP / (2 TP + FP + FN); NaN without anomalous voxels."""
        if self.tp + self.fn == 0:
            return float("nan")
        return 2 * self.tp / (2 * self.tp + self.fp + self.fn)


def sample_metrics(scores: np.ndarray, labels: np.ndarray) -> dict:
    """AUROC and average precision of per-sample ``scores`` (n,) against boolean ``labels``
    (n,): {auroc, ap, n, anomalous, reason}; NaN with a reason when one class is missing.

    Raises:
        ValueError: a score is NaN, or the lengths differ.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    s = np.asarray(scores, np.float64).reshape(-1)
    y = np.asarray(labels, bool).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    if np.isnan(s).any():
        raise ValueError(f"{int(np.isnan(s).sum())} scores are NaN; sample scores must be numbers")
    n, k = int(s.size), int(y.sum())
    reason = "no samples" if n == 0 else "no anomalous samples" if k == 0 else ""
    reason = reason or ("no normal samples" if k == n else "")
    if reason:
        return {"auroc": math.nan, "ap": math.nan, "n": n, "anomalous": k, "reason": reason}
    return {
        "auroc": float(roc_auc_score(y, s)),
        "ap": float(average_precision_score(y, s)),
        "n": n,
        "anomalous": k,
        "reason": "",
    }


def pixel_metrics(score: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Exact AUROC, average precision and best Dice of in-memory ``score`` against boolean
    ``truth`` (any shape, flattened); NaN when one class is missing. For one volume; pool many
    with :class:`PixelAccumulator`."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    t = np.asarray(truth, bool).ravel()
    s = np.asarray(score, np.float64).ravel()
    if np.isnan(s).any():
        raise ValueError("scores contain NaN; anomaly scores must be numbers")
    if t.all() or not t.any():
        return {"auroc": float("nan"), "ap": float("nan"), "best_dice": float("nan")}
    prec, rec, _ = precision_recall_curve(t, s)
    dice = 2 * prec * rec / np.maximum(prec + rec, 1e-300)
    return {
        "auroc": float(roc_auc_score(t, s)),
        "ap": float(average_precision_score(t, s)),
        "best_dice": float(dice.max()),
    }
