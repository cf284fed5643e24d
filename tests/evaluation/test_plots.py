"""The example panel of an evaluation: a map below its threshold must not look hot."""

from __future__ import annotations

import matplotlib.image
import numpy as np

from napari_vaeloc.evaluation.plots import DPI, PANEL_INCH, plot_examples
from napari_vaeloc.evaluation.runner import ExampleSlice


def _healthy_slice() -> ExampleSlice:
    rng = np.random.default_rng(0)
    image = rng.uniform(0.2, 1.0, (40, 40)).astype(np.float32)
    below = rng.uniform(0.0, 2.0, (40, 40)).astype(np.float32)  # peaks at 2, threshold 4
    return ExampleSlice(
        "healthy 0 (a head)", "healthy", 2, 20, (1.0, 1.0), image,
        np.zeros((40, 40), bool), {"default": below}, plane="axial",
    )  # fmt: skip


def _map_panel(path) -> np.ndarray:
    """The map's panel (third column) of a one-row figure, as RGB in [0, 1]."""
    img = matplotlib.image.imread(path)[..., :3]
    px = round(PANEL_INCH * DPI)
    return img[px // 4 : -px // 8, 2 * px + px // 8 : 3 * px - px // 8]


def test_a_map_below_its_threshold_is_shown_dark(tmp_path):
    e = _healthy_slice()
    plain = plot_examples([e], tmp_path / "plain.png")
    scaled = plot_examples([e], tmp_path / "scaled.png", thresholds={"default": 4.0})
    # on its own percentile scale the healthy map fills the colour range; up to the threshold
    # it stays in the lower half of it (inferno: dark)
    assert _map_panel(plain).mean() > 1.5 * _map_panel(scaled).mean()
    assert _map_panel(scaled).mean() < 0.3
    # a map reaching above the threshold: the threshold's contour (cyan) is drawn
    hot = dict(e.maps)
    hot["default"] = e.maps["default"].copy()
    hot["default"][15:25, 15:25] = 8.0
    e2 = ExampleSlice(**{**e.__dict__, "maps": hot})
    drawn = _map_panel(plot_examples([e2], tmp_path / "hot.png", thresholds={"default": 4.0}))
    cyan = (drawn[..., 0] < 0.3) & (drawn[..., 1] > 0.7) & (drawn[..., 2] > 0.7)
    assert cyan.sum() > 20
    assert not ((_map_panel(scaled)[..., 0] < 0.3) & (_map_panel(scaled)[..., 1] > 0.7)).any()
