"""The widget's Qt-free controller: calibrated threshold text, caches, uncalibrated models."""

from __future__ import annotations

import numpy as np
import pytest

from napari_vaeloc._widget_controller import Session
from napari_vaeloc.combine import finish, smooth
from napari_vaeloc.io import Volume
from tests.helpers import card_with, make_result

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
    vol = Volume.from_array(rng.random(shape), spacing=(1.0, 1.0, 2.0))
    return Session(make_result(maps, fg, vol, card_with(calibration, DEFAULTS)))


def test_fpr_interpolates_in_log_space():
    s = _session()
    assert s.fpr_for_threshold(1.0) == pytest.approx(0.01)
    assert s.fpr_for_threshold(1.15) == pytest.approx(10**-2.5)
    assert s.threshold_for_fpr(10**-2.5) == pytest.approx(1.15)
    assert _session(calibration=None).fpr_for_threshold(1.0) is None


def test_threshold_text_follows_weights_and_calibration():
    s = _session()
    assert "false-positive rate ≈ 0.001" in s.threshold_text()
    s.settings = s.settings.replace(threshold=5.0)
    assert "< 0.01%" in s.threshold_text()
    # an outlined mask: the outline is said whatever the threshold, also beyond the table
    s.settings = s.settings.replace(grow_threshold=1.0, outline_fraction=0.4)
    assert "< 0.01%" in s.threshold_text() and "outlined" in s.threshold_text()
    s.settings = s.settings.replace(threshold=1.2)
    assert "≈" in s.threshold_text() and "outlined" in s.threshold_text()
    assert "grow level" not in s.threshold_text()
    # at or below the grow level the outline cannot act: the text says the mask is plain
    s.settings = s.settings.replace(threshold=0.9)
    assert s.settings.outline_dropped() and "outlined" not in s.threshold_text()
    assert "at or below the outline's grow level (1.00)" in s.threshold_text()
    s.settings = s.settings.replace(threshold=1.2)
    # another smoothing than the one calibrated: the text says that is why
    s = _session({**CAL, "combined_smoothing_mm": 0.0})
    s.settings = s.settings.replace(threshold=1.2, smoothing_mm=2.0)
    assert s.threshold_text() == (
        "1.20 × healthy 99th pct. (smoothing 2 mm: the model is calibrated at 0 mm: "
        "no FPR calibration here)"
    )
    s.settings = s.settings.replace(smoothing_mm=0.0)
    s.settings = s.settings.replace(weights={"combi": 1.0, "kl_grad": 0.5})
    assert "custom weights" in s.threshold_text()
    u = _session(calibration=None)
    assert "uncalibrated" in u.threshold_text()
    assert not u.is_calibrated()


def test_caches_and_fixed_display_range():
    s = _session()
    c1, m1 = s.combined(), s.mask()
    np.testing.assert_allclose(c1, s.result.maps["combi"] / 2.0)
    assert s.combined() is c1 and s.mask() is m1
    s.settings = s.settings.replace(threshold=0.2)
    assert s.combined() is c1 and s.mask() is not m1  # re-threshold only
    assert s.mask().sum() > m1.sum()
    assert s.display_range() == (0.8, 2.0)  # in calibrated units, not the map's min-max
    s.settings = s.settings.replace(weights={"combi": 1.0, "rec_error": 1.0})
    assert s.combined() is not c1
    assert s.display_range() == (1.6, 4.0)


def test_smoothed_components_are_cached_and_match_smoothing_the_sum():
    s = _session()
    fg = s.result.foreground
    fg[0] = False  # a foreground that matters for the normalisation
    maps, sp = s.result.maps, s.volume.spacing
    for normalise in (False, True):
        s.settings = s.settings.replace(
            smoothing_mm=2.0, scan_normalise=normalise, weights={"combi": 1.0, "kl_grad": 0.5}
        )
        got = s.combined()
        # smoothing is linear: the sum of smoothed components
        # equals the smoothed sum
        total = maps["combi"] / np.float32(2.0) + np.float32(0.5) * maps["kl_grad"] / 0.5
        want = finish(smooth(total.astype(np.float32), 2.0, sp), fg, normalise)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    cached = dict(s._smooth_cache)
    # a weight move smooths nothing again
    s.settings = s.settings.replace(weights={"combi": 0.3, "kl_grad": 2.0})
    s.combined()
    assert s._smooth_cache.keys() == cached.keys()
    assert all(s._smooth_cache[k] is v for k, v in cached.items())
    s.settings = s.settings.replace(smoothing_mm=3.0)  # a new smoothing replaces the cache
    s.combined()
    assert {k[1] for k in s._smooth_cache} == {3.0}


def test_the_mask_rate_survives_a_slider_s_rounding_of_the_default_threshold():
    """A slider hands the default threshold back rounded to six digits: still the default mask,
    whose measured rate is said; a real move of the slider is not."""
    calibration = {**CAL, "mask_fpr": 0.0068}
    defaults = {**DEFAULTS, "threshold": 1.2345678, "grow_threshold": 1.0, "outline_fraction": 0.4}
    rng = np.random.default_rng(0)
    shape = (12, 10, 8)
    maps = {k: rng.random(shape, dtype=np.float32) for k in ("combi", "rec_error", "kl_grad")}
    vol = Volume.from_array(rng.random(shape), spacing=(1.0, 1.0, 2.0))
    s = Session(make_result(maps, np.ones(shape, bool), vol, card_with(calibration, defaults)))
    assert "the outlined mask marks 0.68% of healthy voxels" in s.threshold_text()
    s.settings = s.settings.replace(threshold=round(1.2345678, 6))
    assert "the outlined mask marks 0.68% of healthy voxels" in s.threshold_text()
    s.settings = s.settings.replace(threshold=1.2445678)
    assert "measured at the default only" in s.threshold_text()
