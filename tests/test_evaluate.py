"""Metrics against hand-checked values, and the seeded synthetic benchmark end to end."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from napari_vaeloc.cli import main
from napari_vaeloc.evaluate import pixel_metrics


def test_metrics_hand_checked():
    # scores 0.1 0.4 | 0.35 0.8 for truth 0 0 | 1 1: one mis-ordered pair out of four
    m = pixel_metrics(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    assert m["auroc"] == pytest.approx(0.75)
    # ranking 0.8(+) 0.4(-) 0.35(+) 0.1(-): precision 1 at recall .5, 2/3 at recall 1
    assert m["ap"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # best Dice: threshold at 0.35 -> TP 2, FP 1, FN 0 -> 4/5; at 0.8 -> TP 1 -> 2/3
    assert m["best_dice"] == pytest.approx(0.8)
    ties = pixel_metrics(np.array([1.0, 1.0, 1.0, 1.0]), np.array([0, 1, 0, 1]))
    assert ties["auroc"] == pytest.approx(0.5)
    assert np.isnan(pixel_metrics(np.array([0.2, 0.3]), np.array([0, 0]))["auroc"])


def _run(out, seed):
    args = [
        "evaluate",
        "synthetic",
        "--model",
        "t2-brain",
        "--cases",
        "1",
        "--kinds",
        "intensity,blur",
        "--seed",
        str(seed),
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    with open(out / "synthetic_t2-brain.csv") as fh:
        return list(csv.DictReader(fh))


def test_synthetic_benchmark_is_reproducible(tmp_path, capsys):
    a = _run(tmp_path / "a", 0)
    b = _run(tmp_path / "b", 0)
    c = _run(tmp_path / "c", 1)
    assert a == b
    assert a != c
    kinds = {r["kind"] for r in a}
    assert kinds == {"intensity", "blur", "all"}
    assert {r["map"] for r in a} >= {"rec_error", "kl_grad", "combi", "default"}
    assert all(0 <= float(r["auroc"]) <= 1 for r in a)
    assert "| all | default |" in (tmp_path / "a" / "synthetic_t2-brain.md").read_text()
    assert main(["evaluate", "synthetic", "--kinds", "sparkles", "--out", str(tmp_path)]) == 2
    assert "unknown anomaly kinds" in capsys.readouterr().err
