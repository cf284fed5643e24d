"""The widget's Qt-free controller: calibrated threshold text, caches, uncalibrated models."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from napari_vaeloc._widget_controller import Session, fpr_for_threshold, threshold_for_fpr
from napari_vaeloc.engine import LocalizationResult
from napari_vaeloc.io import Volume

CAL = {
    "scales": {"combi": 2.0, "rec_error": 3.0, "kl_grad": 0.5, "elbo_grad": 1.0},
    "combined_fpr": {"0.1": 0.6, "0.01": 1.0, "0.001": 1.3, "0.0001": 1.5},
    "combined_weights": {"combi": 1.0},
}
DEFAULTS = {"weights": {"combi": 1.0}, "threshold": 1.3, "smoothing_mm": 0.0, "min_size_mm3": 0}


def _session(calibration=CAL) -> Session:
    rng = np.random.default_rng(0)
    shape = (12, 10, 8)
    maps = {k: rng.random(shape, dtype=np.float32) for k in ("combi", "rec_error", "kl_grad")}
    maps["elbo_grad"] = rng.random(shape, dtype=np.float32)
    fg = np.ones(shape, bool)
    result = LocalizationResult(maps, fg, {}, {}, "axial", 2, "x", "cpu", 0.0)
    card = SimpleNamespace(calibration=calibration, defaults=dict(DEFAULTS))
    vol = Volume.from_array(rng.random(shape), spacing=(1.0, 1.0, 2.0))
    return Session(vol, result, card)


def test_fpr_interpolates_in_log_space():
    assert fpr_for_threshold(CAL, 1.0) == pytest.approx(0.01)
    assert fpr_for_threshold(CAL, 1.15) == pytest.approx(10**-2.5)
    assert threshold_for_fpr(CAL, 10**-2.5) == pytest.approx(1.15)
    assert fpr_for_threshold(None, 1.0) is None


def test_threshold_text_follows_weights_and_calibration():
    s = _session()
    assert "false-positive rate ≈ 0.001" in s.threshold_text()
    s.settings.threshold = 5.0
    assert "< 0.01%" in s.threshold_text()
    s.settings.weights = {"combi": 1.0, "kl_grad": 0.5}
    assert "custom weights" in s.threshold_text()
    u = _session(calibration=None)
    assert "uncalibrated" in u.threshold_text()
    assert not u.is_calibrated()


def test_caches_and_fixed_display_range():
    s = _session()
    c1, m1 = s.combined(), s.mask()
    np.testing.assert_allclose(c1, s.result.maps["combi"] / 2.0)
    assert s.combined() is c1 and s.mask() is m1
    s.settings.threshold = 0.2
    assert s.combined() is c1 and s.mask() is not m1  # re-threshold only
    assert s.mask().sum() > m1.sum()
    assert s.display_range() == (0.8, 2.0)  # in calibrated units, not the map's min-max
    s.settings.weights = {"combi": 1.0, "rec_error": 1.0}
    assert s.combined() is not c1
    assert s.display_range() == (1.6, 4.0)


def test_smoothed_components_are_cached_and_match_combine():
    from napari_vaeloc.combine import combine

    s = _session()
    fg = s.result.foreground
    fg[0] = False  # a foreground that matters for the normalisation
    for normalise in (False, True):
        s.settings.smoothing_mm = 2.0
        s.settings.scan_normalise = normalise
        s.settings.weights = {"combi": 1.0, "kl_grad": 0.5}
        got = s.combined()
        want = combine(
            s.result.maps, s.settings.weights, s.scales, fg, 2.0, s.volume.spacing, normalise
        )
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    cached = dict(s._smooth_cache)
    s.settings.weights = {"combi": 0.3, "kl_grad": 2.0}  # a weight move smooths nothing again
    s.combined()
    assert s._smooth_cache.keys() == cached.keys()
    assert all(s._smooth_cache[k] is v for k, v in cached.items())
    s.settings.smoothing_mm = 3.0  # a new smoothing replaces the cache
    s.combined()
    assert {k[1] for k in s._smooth_cache} == {3.0}
