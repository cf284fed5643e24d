"""Combining cached maps: weights, scales, smoothing, threshold, minimum lesion size."""

from __future__ import annotations

import numpy as np
import pytest

from napari_vaeloc.combine import (
    CombineSettings,
    combine,
    component_scales,
    robust_z,
    threshold_mask,
)
from napari_vaeloc.models.store import ModelCard


def test_weighted_sum_of_scaled_components():
    a = np.full((4, 4, 4), 2.0, np.float32)
    b = np.full((4, 4, 4), 10.0, np.float32)
    out = combine({"a": a, "b": b}, {"a": 1.0, "b": 0.5}, {"a": 2.0, "b": 5.0})
    np.testing.assert_allclose(out, 1.0 + 0.5 * 2.0)
    out = combine({"a": a, "b": b}, {"a": 1.0, "b": 0.0}, {"a": 2.0})
    np.testing.assert_allclose(out, 1.0)
    with pytest.raises(KeyError, match="unknown components"):
        combine({"a": a}, {"c": 1.0}, {})


def test_scales_from_calibration_or_fallback():
    rng = np.random.default_rng(0)
    m = rng.random((10, 10, 10)).astype(np.float32)
    fg = np.zeros(m.shape, bool)
    fg[2:8] = True
    scales, calibrated = component_scales({"x": m}, fg, {"scales": {"x": 3.0}})
    assert scales == {"x": 3.0} and calibrated
    scales, calibrated = component_scales({"x": m}, fg, None)
    assert not calibrated
    assert scales["x"] == pytest.approx(np.percentile(m[fg], 99))


def test_foreground_and_smoothing():
    m = np.zeros((9, 9, 9), np.float32)
    m[4, 4, 4] = 1
    fg = np.ones(m.shape, bool)
    fg[0] = False
    out = combine({"m": m}, {"m": 1}, {"m": 1.0}, fg, smoothing_mm=1.0, spacing=(1, 1, 2))
    assert out[4, 4, 4] < 1 and out.sum() == pytest.approx(1.0, rel=1e-3)
    assert out[4, 5, 4] > out[4, 4, 5]  # 1 mm sigma is 0.5 voxel along the 2 mm axis
    m[0, 0, 0] = 5
    assert combine({"m": m}, {"m": 1}, {"m": 1.0}, fg)[0, 0, 0] == 0


def test_threshold_and_min_size():
    c = np.zeros((20, 20, 20), np.float32)
    c[2:4, 2:4, 2:4] = 5  # 8 voxels
    c[10:15, 10:15, 10:15] = 5  # 125 voxels
    mask = threshold_mask(c, 1.0)
    assert mask.dtype == np.uint8 and mask.sum() == 133
    mask = threshold_mask(c, 1.0, min_size_mm3=10)
    assert mask.sum() == 125
    mask = threshold_mask(c, 1.0, min_size_mm3=10, spacing=(2, 2, 2))  # 8 voxels = 64 mm^3
    assert mask.sum() == 133
    assert threshold_mask(c, 6.0).sum() == 0


def test_settings_from_card():
    card = ModelCard(
        name="x",
        architecture={},
        defaults={"weights": {"elbo_grad": 1.0}, "threshold": 2.5, "unknown": 1},
    )
    s = CombineSettings.from_card(card)
    assert s.weights == {"elbo_grad": 1.0} and s.threshold == 2.5
    assert CombineSettings.from_card(ModelCard(name="y", architecture={})).weights == {"combi": 1.0}


def test_robust_z_hand_checked():
    v = np.array([1.0, 2.0, 3.0, 4.0, 100.0], np.float32).reshape(5, 1, 1)
    # median 3, |v - 3| = 2 1 0 1 97 -> MAD 1, scale 1.4826
    np.testing.assert_allclose(robust_z(v).ravel(), (v.ravel() - 3.0) / 1.4826, rtol=1e-6)
    where = np.array([1, 1, 1, 0, 0], bool).reshape(5, 1, 1)  # median 2, MAD 1
    np.testing.assert_allclose(robust_z(v, where).ravel(), (v.ravel() - 2.0) / 1.4826, rtol=1e-6)
    flat = np.full((3, 3, 3), 5.0, np.float32)  # MAD 0: only the median is removed
    np.testing.assert_array_equal(robust_z(flat), 0.0)


def test_scan_normalise_removes_a_global_offset():
    rng = np.random.default_rng(1)
    base = rng.random((12, 12, 12)).astype(np.float32)
    fg = np.zeros(base.shape, bool)
    fg[2:10, 2:10, 2:10] = True
    a = combine({"m": base}, {"m": 1.0}, {"m": 1.0}, fg, scan_normalise=True)
    b = combine({"m": 3 * base + 7}, {"m": 1.0}, {"m": 1.0}, fg, scan_normalise=True)
    np.testing.assert_allclose(a, b, atol=1e-4)  # offset and gain of the scan do not matter
    assert abs((a[fg] > 0).mean() - 0.5) < 0.01  # half the brain lies above its median
    assert (a[~fg] == 0).all() and a.min() == 0
    plain = combine({"m": 3 * base + 7}, {"m": 1.0}, {"m": 1.0}, fg)
    assert not np.allclose(plain, a)
    s = CombineSettings.from_card(
        ModelCard(name="x", architecture={}, defaults={"scan_normalise": True, "threshold": 4.0})
    )
    assert s.scan_normalise and s.threshold == 4.0
