"""The widget never waits for the whole volume: a slider move shows the displayed slice first and
recombines the rest in a worker, with the same result as the one post-processing pipeline;
export writes in a worker, the same files as the command line's writer. Real viewer, real tiny
model folder, real torch, real NIfTI."""

from __future__ import annotations

import contextlib
import dataclasses
import threading

import nibabel as nib
import numpy as np
import pytest

from napari_vaeloc import _widget
from napari_vaeloc.combine import PostProcessor
from napari_vaeloc.evaluation.synthetic import head_phantom
from napari_vaeloc.export import write_result

TIMEOUT_MS = 120_000
SHAPE = (120, 120, 80)  # above the size whose whole-volume work the panel leaves to a worker


def _open_and_run(make_napari_viewer, qtbot, model_dir):
    viewer = make_napari_viewer()
    scan = viewer.add_image(head_phantom(SHAPE, seed=4), name="big")
    _, widget = viewer.window.add_plugin_dock_widget("napari-vaeloc", "Localize anomalies")
    qtbot.waitUntil(lambda: widget._devices is not None, timeout=TIMEOUT_MS)
    widget.add_model_folder(model_dir)
    widget.image.value = scan
    widget.device.value = "cpu"
    widget.prepare.value = "none"
    steps: list[str] = []
    widget._relay.step.connect(steps.append)
    widget.run_button.clicked()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)
    widget._relay.step.disconnect(steps.append)
    assert widget.session is not None, widget.fit_info.value
    assert widget._large()
    return viewer, widget, steps


def test_run_keeps_only_the_maps_the_panel_uses(make_napari_viewer, qtbot, tiny_model_dir):
    from napari_vaeloc._widget_controller import MAP_LAYERS, panel_maps
    from napari_vaeloc.engine import maps_for
    from napari_vaeloc.mapnames import SLIDER_MAPS

    viewer, widget, _ = _open_and_run(make_napari_viewer, qtbot, tiny_model_dir)
    card = widget.session.result.card
    kept = set(widget.session.result.maps)
    assert kept == set(panel_maps(card))
    assert {"sq_error", "rec_grad"} <= set(maps_for(card)) - kept  # computed by the CLI only
    assert kept <= {*SLIDER_MAPS, *MAP_LAYERS.values(), *(card.defaults.weights or {})}
    enabled = {k: w.enabled for k, w in widget.weights.items()}
    assert enabled == {k: k in kept for k in widget.weights}  # no slider for a missing map
    # at full size: only the maps of the weights in use; the hidden map layers' maps are made
    # when a layer is shown
    maps = widget.session.result.maps
    used = set(widget.session.settings.used_weights())
    assert set(maps.held()) == used & kept and "elbo_grad" in kept - used
    layer = viewer.layers["big KL gradient"]
    assert not layer.visible and maps.is_deferred("kl_grad")
    assert not np.asarray(layer.data[40]).any()  # nothing read, nothing made
    assert maps.is_deferred("kl_grad")
    layer.visible = True
    qtbot.waitUntil(lambda: isinstance(layer.data, np.ndarray), timeout=TIMEOUT_MS)
    assert not maps.is_deferred("kl_grad")
    np.testing.assert_array_equal(layer.data, maps["kl_grad"])
    assert np.asarray(layer.data).any()


def test_large_scans_keep_float16_maps_and_components(
    make_napari_viewer, qtbot, tiny_model_dir, monkeypatch
):
    from napari_vaeloc import _widget_controller

    monkeypatch.setattr(_widget_controller, "PANEL_FLOAT16_VOXELS", 1000)  # SHAPE is above
    viewer, widget, _ = _open_and_run(make_napari_viewer, qtbot, tiny_model_dir)
    s = widget.session
    assert {m.dtype for m in s.result.maps.values()} == {np.dtype(np.float16)}
    widget.smoothing.value = 2.0
    qtbot.waitUntil(lambda: not widget.updating, timeout=TIMEOUT_MS)
    assert s._smooth_cache and all(v.dtype == np.float16 for v in s._smooth_cache.values())
    exp = _expected(widget)  # the command line's post-processing of the same float16 maps
    np.testing.assert_array_equal(viewer.layers["big anomaly map"].data, exp.combined)
    np.testing.assert_array_equal(viewer.layers["big anomaly mask"].data, exp.mask)
    f32 = {k: v.astype(np.float32) for k, v in s.result.maps.items()}
    ref = PostProcessor(dataclasses.replace(s.result, maps=f32), s.settings).combined()
    np.testing.assert_allclose(exp.combined, ref, rtol=5e-3, atol=5e-3 * float(ref.max()))


def test_the_panel_warm_up_builds_the_line_patterns_off_the_gui_thread(tiny_model_dir):
    """napari's first Labels layer would otherwise build vispy's dash patterns on the GUI
    thread during the click."""
    from vispy.visuals.line import dash_atlas

    dash_atlas._make_pattern.cache_clear()
    worker = threading.Thread(target=_widget._warm_up, args=(str(tiny_model_dir), "cpu", 8))
    worker.start()
    worker.join(timeout=60)
    assert dash_atlas._make_pattern.cache_info().currsize >= 13  # all of DashAtlas's patterns


def _expected(widget):
    """The whole volume under the panel's settings, by a fresh post-processor (as the command
    line computes it)."""
    s = widget.session
    return PostProcessor(s.result, s.settings).combination()


def _slice(a, axis, index):
    return np.take(a, index, axis)


def test_run_steps_and_the_first_layers(make_napari_viewer, qtbot, tiny_model_dir):
    viewer, widget, steps = _open_and_run(make_napari_viewer, qtbot, tiny_model_dir)
    # after the last slice the bar names each step: the worker's, then the layers
    assert steps == ["computing the scales", "combining the maps"], steps
    assert widget.progress.label.startswith("done in")
    c = _expected(widget)
    np.testing.assert_array_equal(viewer.layers["big anomaly map"].data, c.combined)
    np.testing.assert_array_equal(viewer.layers["big anomaly mask"].data, c.mask)


def test_slider_shows_the_displayed_slice_before_the_whole_volume(
    make_napari_viewer, qtbot, tiny_model_dir
):
    viewer, widget, _ = _open_and_run(make_napari_viewer, qtbot, tiny_model_dir)
    comb_layer, mask_layer = viewer.layers["big anomaly map"], viewer.layers["big anomaly mask"]
    viewer.dims.set_current_step(0, 40)  # slice 40 of the first axis shown
    where = widget.displayed_slice()
    assert where == (0, 40), where
    old = comb_layer.data.copy()
    widget._timer.setInterval(60_000)  # the whole-volume work waits: only the slice changes
    used = next(k for k in widget.session.settings.used_weights() if k in widget.weights)
    widget.weights[used].value = 1.5  # a map in use: its component is cached
    exp = _expected(widget)
    assert widget.updating
    shown = _slice(comb_layer.data, 0, 40)
    np.testing.assert_array_equal(shown, _slice(exp.combined, 0, 40))
    np.testing.assert_array_equal(_slice(mask_layer.data, 0, 40), _slice(exp.mask, 0, 40))
    assert not np.array_equal(shown, _slice(old, 0, 40))  # the move changed this slice
    np.testing.assert_array_equal(_slice(comb_layer.data, 0, 10), _slice(old, 0, 10))  # not yet
    widget._timer.setInterval(50)
    widget._timer.start()
    qtbot.waitUntil(lambda: not widget.updating, timeout=TIMEOUT_MS)
    np.testing.assert_array_equal(comb_layer.data, exp.combined)
    np.testing.assert_array_equal(mask_layer.data, exp.mask)


@contextlib.contextmanager
def _whole_volume_held(session):
    """The session's whole-volume recombination waits until the block ends (only the shown
    slice can change meanwhile)."""
    gate = threading.Event()
    real = session.combined

    def held(*args, **kwargs):
        gate.wait(60)
        return real(*args, **kwargs)

    session.combined = held
    try:
        yield
    finally:
        gate.set()
        del session.combined  # the instance's own method again


def test_new_smoothing_slice_first_from_the_worker(make_napari_viewer, qtbot, tiny_model_dir):
    viewer, widget, _ = _open_and_run(make_napari_viewer, qtbot, tiny_model_dir)
    comb_layer = viewer.layers["big anomaly map"]
    viewer.dims.set_current_step(0, 30)
    old = comb_layer.data.copy()
    session = widget.session
    with _whole_volume_held(session):
        widget.smoothing.value = 3.0  # not cached: the worker smooths the slab of slice 30 first
        expected = PostProcessor(session.result, session.settings).combined()
        qtbot.waitUntil(
            lambda: np.allclose(  # the slab's smoothing: equal to float32 rounding
                _slice(comb_layer.data, 0, 30), _slice(expected, 0, 30), rtol=1e-5, atol=1e-6
            ),
            timeout=TIMEOUT_MS,
        )
        assert widget.updating
        np.testing.assert_array_equal(_slice(comb_layer.data, 0, 5), _slice(old, 0, 5))
    qtbot.waitUntil(lambda: not widget.updating, timeout=TIMEOUT_MS)
    np.testing.assert_array_equal(comb_layer.data, expected)


def test_a_weight_whose_map_is_not_made_yet_shows_its_slice_first_from_the_worker(
    make_napari_viewer, qtbot, tiny_model_dir
):
    viewer, widget, _ = _open_and_run(make_napari_viewer, qtbot, tiny_model_dir)
    comb_layer = viewer.layers["big anomaly map"]
    viewer.dims.set_current_step(0, 30)
    old = comb_layer.data.copy()
    session = widget.session
    maps = session.result.maps
    assert maps.is_deferred("elbo_grad")
    with _whole_volume_held(session):
        widget.weights["elbo_grad"].value = 1.0
        assert maps.is_deferred("elbo_grad")  # the GUI thread did not make it
        made = dataclasses.replace(session.result, maps={k: maps.peek(k) for k in maps})
        expected = PostProcessor(made, session.settings).combined()
        qtbot.waitUntil(
            lambda: np.allclose(
                _slice(comb_layer.data, 0, 30), _slice(expected, 0, 30), rtol=1e-5, atol=1e-6
            ),
            timeout=TIMEOUT_MS,
        )
        assert widget.updating
        np.testing.assert_array_equal(_slice(comb_layer.data, 0, 5), _slice(old, 0, 5))
    qtbot.waitUntil(lambda: not widget.updating, timeout=TIMEOUT_MS)
    assert not maps.is_deferred("elbo_grad")  # made by the worker, kept for the next moves
    np.testing.assert_allclose(comb_layer.data, expected, rtol=1e-5, atol=1e-6)


def test_recombination_in_a_worker_equals_combine(make_napari_viewer, qtbot, tiny_model_dir):
    viewer, widget, _ = _open_and_run(make_napari_viewer, qtbot, tiny_model_dir)
    comb_layer, mask_layer = viewer.layers["big anomaly map"], viewer.layers["big anomaly mask"]
    viewer.dims.set_current_step(0, 50)
    moves = [
        (widget.weights["rec_error"], 0.5),
        (widget.smoothing, 2.0),
        (widget.threshold, 0.7),
        (widget.min_size, 40.0),
        (widget.min_size, 80.0),
        (widget.threshold, 0.9),
        (widget.scan_normalise, True),
        (widget.threshold, 2.0),
    ]
    for slider, value in moves:  # each faster than the worker: stale work is dropped
        slider.value = value
        qtbot.wait(5)
    qtbot.waitUntil(lambda: not widget.updating, timeout=TIMEOUT_MS)
    st = widget.session.settings
    assert (st.smoothing_mm, st.min_size_mm3, st.threshold, st.scan_normalise) == (
        2.0, 80.0, 2.0, True,
    )  # fmt: skip
    exp = _expected(widget)
    np.testing.assert_array_equal(comb_layer.data, exp.combined)
    np.testing.assert_array_equal(mask_layer.data, exp.mask)
    # a minimum-size move at the same threshold: its slice exact at once (cached components)
    widget._timer.setInterval(60_000)
    widget.min_size.value = 160.0
    exp = _expected(widget)
    np.testing.assert_array_equal(_slice(mask_layer.data, 0, 50), _slice(exp.mask, 0, 50))
    widget._timer.setInterval(50)
    widget._timer.start()
    qtbot.waitUntil(lambda: not widget.updating, timeout=TIMEOUT_MS)
    np.testing.assert_array_equal(mask_layer.data, exp.mask)


def test_export_writes_the_same_files_in_a_worker(
    make_napari_viewer, qtbot, tiny_model_dir, tmp_path, monkeypatch
):
    viewer, widget, _ = _open_and_run(make_napari_viewer, qtbot, tiny_model_dir)
    widget.threshold.value = 0.8
    widget.min_size.value = 24.0
    threads: list[bool] = []
    real = _widget.export_session

    def spy(*args, **kwargs):
        threads.append(threading.current_thread() is threading.main_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(_widget, "export_session", spy)
    (tmp_path / "gui").mkdir()
    (tmp_path / "cli").mkdir()
    assert widget.export_in_background(tmp_path / "gui" / "big_mask.nii.gz", maps=True)
    qtbot.waitUntil(lambda: not widget.exporting, timeout=TIMEOUT_MS)
    assert threads == [False]  # written in a worker thread
    s = widget.session
    write_result(s.result, PostProcessor(s.result, s.settings), tmp_path / "cli", "big")
    gui = sorted(p.name for p in (tmp_path / "gui").iterdir())
    assert gui == sorted(p.name for p in (tmp_path / "cli").iterdir()) and len(gui) >= 9
    for name in gui:
        a, b = tmp_path / "gui" / name, tmp_path / "cli" / name
        if name.endswith(".nii.gz"):
            np.testing.assert_array_equal(np.asarray(nib.load(a).dataobj),
                                          np.asarray(nib.load(b).dataobj))  # fmt: skip
    # the layer takes the whole volume of the last slider move from its own worker, which may
    # finish after the export's
    qtbot.waitUntil(lambda: not widget.updating, timeout=TIMEOUT_MS)
    np.testing.assert_array_equal(
        np.asarray(nib.load(tmp_path / "gui" / "big_mask.nii.gz").dataobj),
        viewer.layers["big anomaly mask"].data,
    )


@pytest.mark.parametrize("min_size", [0.0, 30.0])
def test_preview_slice_is_the_whole_volumes_slice(tiny_model_dir, phantom, min_size):
    """slice_preview, every axis: the slice of the whole combination (cached components)."""
    from napari_vaeloc.combine import CombineSettings
    from napari_vaeloc.engine import EngineOptions, localize
    from napari_vaeloc.models.store import load_model

    result = localize(phantom, load_model(tiny_model_dir), EngineOptions(device="cpu"))
    post = PostProcessor(result)
    st = post.settings.replace(weights={"rec_error": 1.0, "kl_grad": 0.5}, smoothing_mm=2.0,
                               threshold=0.5, min_size_mm3=min_size)  # fmt: skip
    whole = PostProcessor(result, st).combination()
    for axis in range(3):
        for index in (0, phantom.shape[axis] // 2):
            pv = post.slice_preview(st, axis, index, compute=True)
            want = _slice(whole.combined, axis, index)  # equal to float32 rounding (smoothing)
            np.testing.assert_allclose(pv.combined, want, rtol=1e-5, atol=1e-6)
            if min_size == 0:
                assert pv.exact
                np.testing.assert_array_equal(pv.mask, _slice(whole.mask, axis, index))
    post.mask(st)  # cached components: the mask's slice is exact with a minimum size too
    pv = post.slice_preview(st.replace(min_size_mm3=min_size * 2), 1, 10)
    exp = PostProcessor(result, st.replace(min_size_mm3=min_size * 2)).mask()
    assert pv is not None and pv.exact and not pv.combined_changed
    np.testing.assert_array_equal(pv.mask, _slice(exp, 1, 10))
    assert isinstance(CombineSettings(), CombineSettings)


def test_a_map_that_cannot_be_made_for_its_layer_is_one_error_line(
    make_napari_viewer, qtbot, tiny_model_dir
):
    from napari.utils.notifications import notification_manager

    viewer, widget, _ = _open_and_run(make_napari_viewer, qtbot, tiny_model_dir)
    maps = widget.session.result.maps
    shape, dtype = maps.describe("kl_grad")

    def fails():
        raise MemoryError("not enough memory for the map")

    maps.defer("kl_grad", fails, shape, dtype)
    since = len(notification_manager.records)
    layer = viewer.layers["big KL gradient"]
    layer.visible = True
    qtbot.waitUntil(lambda: len(notification_manager.records) > since, timeout=TIMEOUT_MS)
    qtbot.wait(200)
    messages = [str(n.message) for n in notification_manager.records[since:]]
    assert messages == ["could not show big KL gradient: not enough memory for the map"]
    assert layer in viewer.layers and not np.asarray(layer.data[0]).any()
