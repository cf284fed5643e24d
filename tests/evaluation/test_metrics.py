"""Pixel and sample metrics against hand-checked values and against scikit-learn on raw scores."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_vaeloc.evaluation.metrics import (
    Overlap,
    PixelAccumulator,
    pixel_metrics,
    sample_metrics,
)


def acc_of(scores, truth, where=None) -> PixelAccumulator:
    a = PixelAccumulator()
    a.add(np.asarray(scores, np.float32), np.asarray(truth, bool), where)
    return a


def test_hand_checked_ranking():
    # every score is a float16 value; truth 0 0 1 1
    a = acc_of([0.125, 0.5, 0.375, 1.0], [0, 0, 1, 1])
    m = a.metrics()
    # pairs (pos, neg): (.375,.125) ok, (.375,.5) wrong, (1,.125) ok, (1,.5) ok -> 3/4
    assert m.auroc == 0.75
    # ranking 1(+) .5(-) .375(+) .125(-): precision 1 at recall 1/2, 2/3 at recall 1
    assert m.ap == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # score >= .375: TP 2, FP 1, FN 0 -> Dice 4/5 (>= 1 alone: 2/3)
    assert m.best_dice == pytest.approx(0.8)
    assert m.best_threshold == 0.375
    assert (m.positives, m.negatives, m.reason) == (2, 2, "")
    # the exact in-memory version agrees
    exact = pixel_metrics(np.array([0.125, 0.5, 0.375, 1.0]), np.array([0, 0, 1, 1]))
    assert exact == pytest.approx({"auroc": 0.75, "ap": 5 / 6, "best_dice": 0.8})


def test_ties_between_classes_count_half():
    # positives 1, .5; negatives 1, .25. Pairs: (1,1) tie 1/2, (1,.25) 1, (.5,1) 0, (.5,.25) 1
    m = acc_of([1.0, 1.0, 0.5, 0.25], [1, 0, 1, 0]).metrics()
    assert m.auroc == pytest.approx(2.5 / 4)
    # thresholds: >= 1 -> TP 1, FP 1 (P 1/2, R 1/2); >= .5 -> TP 2, FP 1 (P 2/3, R 1)
    assert m.ap == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    # Dice 2 TP / (TP + FP + 2): at 1 -> 2/4, at .5 -> 4/5, at .25 -> 4/6
    assert m.best_dice == pytest.approx(0.8)
    # all scores tied: AUROC 1/2, AP = prevalence
    tied = acc_of([2.0] * 4, [0, 1, 0, 0]).metrics()
    assert tied.auroc == 0.5
    assert tied.ap == pytest.approx(0.25)


def test_one_class_gives_nan_with_a_reason():
    m = acc_of([0.2, 0.3], [0, 0]).metrics()
    assert math.isnan(m.auroc) and math.isnan(m.ap) and math.isnan(m.best_dice)
    assert m.reason == "no anomalous voxels"
    assert acc_of([0.2, 0.3], [1, 1]).metrics().reason == "no normal voxels"
    assert PixelAccumulator().metrics().reason == "no voxels"


def test_nan_scores_are_refused_and_nothing_is_added():
    a = acc_of([0.5, 1.0], [0, 1])
    with pytest.raises(ValueError, match="1 scores are NaN"):
        a.add(np.array([0.5, np.nan, 2.0]), np.array([0, 1, 0], bool))
    assert (a.positives, a.negatives) == (1, 1)
    # NaN outside the counted voxels is fine
    a.add(np.array([0.5, np.nan]), np.array([0, 1], bool), where=np.array([True, False]))
    assert (a.positives, a.negatives) == (1, 2)


def test_where_and_merging_equal_counting_everything_at_once():
    rng = np.random.default_rng(3)
    s = rng.normal(size=(30, 20, 10)).astype(np.float32)
    t = rng.random(s.shape) < 0.2
    w = rng.random(s.shape) < 0.7
    whole = acc_of(s[w], t[w])
    assert np.array_equal(acc_of(s, t, w).pos, whole.pos)
    first, second = acc_of(s[:12], t[:12], w[:12]), acc_of(s[12:], t[12:], w[12:])
    merged = first + second
    assert np.array_equal(merged.pos, whole.pos) and np.array_equal(merged.neg, whole.neg)
    assert merged.metrics() == whole.metrics()
    first += second
    assert np.array_equal(first.neg, whole.neg)


def test_agrees_with_sklearn_on_raw_float_scores():
    rng = np.random.default_rng(0)
    n = 100_000
    truth = rng.random(n) < 0.05
    # scores over several orders of magnitude, positives shifted up
    scores = np.exp(rng.normal(size=n) * 2 + truth * 1.5).astype(np.float32)
    got = acc_of(scores, truth).metrics()
    want = pixel_metrics(scores, truth)
    assert got.auroc == pytest.approx(want["auroc"], abs=2e-3)
    assert got.ap == pytest.approx(want["ap"], abs=2e-3)
    assert got.best_dice == pytest.approx(want["best_dice"], abs=2e-3)
    # curves for plots run from one corner to the other
    fpr, tpr = acc_of(scores, truth).roc_curve()
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    rec, prec = acc_of(scores, truth).pr_curve()
    assert rec[0] == 1 and rec[-1] == 0 and prec[-1] == 1


def test_scores_beyond_float16_saturate_but_rank_as_extremes():
    m = acc_of([1e6, 0.5, -1e6], [1, 0, 0]).metrics()
    assert m.auroc == 1.0 and m.best_threshold == math.inf


def test_sample_metrics_and_overlap():
    m = sample_metrics(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    assert m == pytest.approx({"auroc": 0.75, "ap": 5 / 6, "n": 4, "anomalous": 2, "reason": ""})
    one = sample_metrics(np.array([1.0, 2.0]), np.array([1, 1]))
    assert math.isnan(one["auroc"]) and one["reason"] == "no normal samples"
    with pytest.raises(ValueError, match="NaN"):
        sample_metrics(np.array([1.0, np.nan]), np.array([0, 1]))
    ov = Overlap()
    ov.add(np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool))
    ov += Overlap(tp=1)
    assert (ov.tp, ov.fp, ov.fn) == (2, 1, 1)
    assert ov.dice == pytest.approx(4 / 6)
    assert math.isnan(Overlap(fp=3).dice)
