"""The "Localize anomalies" widget end to end: real viewer, real model, real NIfTI, real torch."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from napari.utils.notifications import notification_manager

from napari_vaeloc import engine
from napari_vaeloc.errors import OutputExistsError
from napari_vaeloc.io import load_volume
from napari_vaeloc.models.store import bundled_models
from napari_vaeloc.samples import sample_path

SUFFIXES = ("reconstruction", "reconstruction error", "KL gradient", "anomaly map", "anomaly mask")
TIMEOUT_MS = 240_000


@pytest.fixture
def counted(monkeypatch):
    """Counts real calls of engine.localize (the real function runs); calls the engine makes
    from inside one (scoring a prepared scan) belong to the outer call."""
    calls = []
    real = engine.localize
    depth = threading.local()

    def spy(*args, **kwargs):
        outer = not getattr(depth, "n", 0)
        if outer:
            calls.append(1)
        depth.n = getattr(depth, "n", 0) + 1
        try:
            return real(*args, **kwargs)
        finally:
            depth.n -= 1

    monkeypatch.setattr(engine, "localize", spy)
    return calls


def _open(make_napari_viewer, qtbot, show=False):
    viewer = make_napari_viewer(show=show)
    viewer.open_sample("napari-vaeloc", "t2-lesion")
    _, widget = viewer.window.add_plugin_dock_widget("napari-vaeloc", "Localize anomalies")
    if "t2-brain" not in bundled_models():
        pytest.skip("the bundled t2-brain model is not installed")
    widget.model.value = "t2-brain"
    qtbot.waitUntil(lambda: widget._devices is not None, timeout=60_000)  # torch imported
    assert "cpu" in widget.device.choices and widget._devices[-1] == "cpu"
    widget.device.value = "cpu"
    return viewer, widget


def _run(qtbot, widget):
    widget.run_button.clicked()
    assert widget.running and not widget.run_button.enabled
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)


def _results(viewer):
    return {
        s: viewer.layers[f"t2-lesion {s}"] for s in SUFFIXES if f"t2-lesion {s}" in viewer.layers
    }


def test_localize_creates_overlaid_layers(make_napari_viewer, qtbot, counted):
    from qtpy.QtCore import QTimer

    viewer, widget = _open(make_napari_viewer, qtbot)
    scan = viewer.layers["t2-lesion"]
    ticks: list[float] = []
    timer = QTimer()
    # ticks until the result arrives (adding the layers afterwards is GUI work by nature)
    timer.timeout.connect(lambda: widget.session is None and ticks.append(time.perf_counter()))
    timer.start(20)
    _run(qtbot, widget)
    timer.stop()
    # the GUI thread kept serving events during model loading and scoring: 20 ms ticks kept
    # coming until the result arrived (a blocked thread gives at most one, then a long gap; the
    # model may already be in the shared cache, so the run itself can be short)
    assert len(ticks) >= 3 and np.diff(ticks).max() < 0.25, np.diff(ticks)
    assert counted == [1]
    layers = _results(viewer)
    assert set(layers) == set(SUFFIXES)
    for layer in layers.values():
        assert layer.data.shape == scan.data.shape
        np.testing.assert_allclose(layer.scale, scan.scale)
        np.testing.assert_allclose(layer.translate, scan.translate)
        np.testing.assert_allclose(layer.metadata["affine"], scan.metadata["affine"])
    combined = layers["anomaly map"]
    assert combined.blending == "additive" and combined.colormap.name == "inferno"
    assert combined.contrast_limits == list(widget.session.display_range())
    assert layers["anomaly mask"].data.dtype == np.uint8 and layers["anomaly mask"].data.any()
    assert widget.run_button.enabled and widget.export_button.enabled
    # a re-run updates the same layers in place
    ids = {k: id(v) for k, v in layers.items()}
    _run(qtbot, widget)
    assert {k: id(v) for k, v in _results(viewer).items()} == ids
    assert len(viewer.layers) == 1 + len(SUFFIXES)


def test_mask_overlaps_known_lesion(make_napari_viewer, qtbot):
    viewer, widget = _open(make_napari_viewer, qtbot)
    _run(qtbot, widget)
    mask = viewer.layers["t2-lesion anomaly mask"].data.astype(bool)
    truth = load_volume(sample_path("t2-lesion-truth")).data > 0
    inside = (mask & truth).sum()
    # default threshold (healthy false-positive rate 1 %): mostly correct voxels
    assert inside >= 20 and inside > 0.5 * mask.sum(), (inside, truth.sum(), mask.sum())
    # the default outlines each part down to a fraction of its peak: its edge moves, and it fits
    # the lesion as well as the threshold alone (Dice 0.874 both at t2-brain's 5.22)
    assert widget.outline.value and widget.outline.enabled
    comb = viewer.layers["t2-lesion anomaly map"].data.astype(np.float32)
    st = widget.session.settings

    def dice(m):
        return 2 * (m & truth).sum() / (m.sum() + truth.sum())

    widget.outline.value = False
    widget.apply_settings()
    plain = viewer.layers["t2-lesion anomaly mask"].data.astype(bool)
    np.testing.assert_array_equal(plain, comb > st.threshold)
    assert widget.session.settings.grow_level() is None
    assert dice(mask) >= dice(plain) - 0.01 and dice(plain) > 0.8, (dice(mask), dice(plain))
    assert mask.sum() != plain.sum()
    # a lower threshold finds more of the lesion
    widget.threshold.value = 0.8 * widget.threshold.value
    widget.apply_settings()
    mask2 = viewer.layers["t2-lesion anomaly mask"].data.astype(bool)
    assert (mask2 & truth).sum() > (plain & truth).sum()
    # turned on again: the model's outline at the new threshold
    widget.outline.value = True
    widget.apply_settings()
    again = widget.session.settings
    assert (again.grow_threshold, again.outline_fraction) == (
        st.grow_threshold,
        st.outline_fraction,
    )


def test_sliders_recompute_without_running_the_model(make_napari_viewer, qtbot, counted):
    viewer, widget = _open(make_napari_viewer, qtbot)
    _run(qtbot, widget)
    mask_layer = viewer.layers["t2-lesion anomaly mask"]
    comb_layer = viewer.layers["t2-lesion anomaly map"]
    mask0, comb0 = mask_layer.data.copy(), comb_layer.data.copy()
    info0 = widget.threshold_info.value
    assert "false-positive" in info0 or "uncalibrated" in info0
    voxel_ml = float(np.prod(widget.session.spacing)) / 1000.0  # the mask's volume, counted
    assert f"mask: {mask0.astype(bool).sum() * voxel_ml:.1f} ml" in info0, info0
    # the model's default map has its own slider, set to its weight; every computed map has one
    assert widget.weights["restoration"].value == 1.0 and widget.weights["restoration"].enabled
    assert all(w.enabled for w in widget.weights.values())

    widget.threshold.value = widget.threshold.value * 0.6
    qtbot.waitUntil(lambda: mask_layer.data.sum() > mask0.sum(), timeout=2000)
    assert widget.threshold_info.value != info0
    np.testing.assert_array_equal(comb_layer.data, comb0)  # threshold alone: same map
    # typed back as the slider shows it (two decimals): the default, with its measured rates
    widget.threshold.value = round(widget.session.default_settings().threshold, 2)
    qtbot.waitUntil(lambda: widget.threshold_info.value == info0, timeout=2000)
    assert "the outlined mask marks" in info0, info0
    np.testing.assert_array_equal(mask_layer.data, mask0)
    assert "smoothing slider" not in info0  # a mask: no pointer to the finer smoothing
    # an empty mask points to the finer smoothing, which keeps the healthy rate
    # (the lesion's peak lies above the slider's range: the settings are set directly)
    widget.session.settings = widget.session.settings.replace(threshold=100.0)
    widget.apply_settings()
    assert not mask_layer.data.any()
    assert "\nmask: empty (" in widget.threshold_info.value  # as the command line says it
    assert "the smoothing slider at 3 mm looks at a finer scale" in widget.threshold_info.value
    widget.restore_defaults()
    qtbot.waitUntil(lambda: widget.threshold_info.value == info0, timeout=5000)

    # another smoothing keeps the threshold's healthy rate: the slider moves to that level at
    # the new smoothing, and the panel says where the levels come from; back at the default,
    # everything is as it was
    cal = widget.session.calibration
    widget.smoothing.value = 3.0
    level = cal.smoothing_fpr["3"]["0.001"]
    assert widget.session.settings.threshold == pytest.approx(level)
    assert widget.threshold.value == pytest.approx(level, abs=0.01)
    assert widget.session.settings.grow_threshold == pytest.approx(cal.smoothing_fpr["3"]["0.01"])
    qtbot.waitUntil(lambda: "(calibrated at 3 mm)" in widget.threshold_info.value, timeout=5000)
    assert "healthy false-positive rate ≈ 0.001 " in widget.threshold_info.value
    widget.outline.value = False  # off and on again: the outline's level at this smoothing
    assert widget.session.settings.grow_threshold is None
    widget.outline.value = True
    assert widget.session.settings.grow_threshold == pytest.approx(cal.smoothing_fpr["3"]["0.01"])
    widget.smoothing.value = widget.session.default_settings().smoothing_mm
    qtbot.waitUntil(lambda: widget.threshold_info.value == info0, timeout=5000)
    qtbot.waitUntil(lambda: not widget.updating, timeout=TIMEOUT_MS)
    np.testing.assert_array_equal(mask_layer.data, mask0)

    widget.weights["kl_grad"].value = 1.0
    qtbot.waitUntil(lambda: not np.array_equal(comb_layer.data, comb0), timeout=2000)
    info = widget.threshold_info.value
    assert "no FPR calibration" in info or "uncalibrated" in info  # custom weights
    widget.smoothing.value = 4.0
    widget.min_size.value = 400.0
    qtbot.wait(200)
    assert widget.session.settings.min_size_mm3 == 400.0
    before = comb_layer.data.copy()
    widget.scan_normalise.value = not widget.scan_normalise.value
    qtbot.waitUntil(lambda: not np.array_equal(comb_layer.data, before), timeout=2000)
    assert widget.session.settings.scan_normalise == widget.scan_normalise.value

    widget.paper_button.clicked()  # the published method: Combi alone at its 99th percentile
    qtbot.waitUntil(lambda: not np.array_equal(comb_layer.data, comb0), timeout=2000)
    st = widget.session.settings
    assert st.used_weights() == {"combi": 1.0} and widget.weights["combi"].value == 1.0
    assert (st.smoothing_mm, st.scan_normalise, st.threshold) == (0.0, False, 1.0)
    assert not widget.scan_normalise.value and widget.threshold.value == 1.0
    qtbot.waitUntil(lambda: not widget.updating, timeout=TIMEOUT_MS)
    assert "the paper's threshold" in widget.threshold_info.value
    assert f"mask: {mask_layer.data.astype(bool).sum() * voxel_ml:.1f} ml" in (
        widget.threshold_info.value
    )

    widget.defaults_button.clicked()  # the shown slice at once, the whole volume in a worker
    qtbot.waitUntil(lambda: not widget.updating, timeout=TIMEOUT_MS)
    np.testing.assert_array_equal(comb_layer.data, comb0)
    np.testing.assert_array_equal(mask_layer.data, mask0)
    assert widget.threshold_info.value == info0
    assert counted == [1]

    # the image box moves on to another scan: the sliders still tune this result, and the
    # panel's mask line names whose mask it is; back on the scan, the line is as it was
    viewer.open_sample("napari-vaeloc", "t2-healthy")
    widget.image.value = viewer.layers["t2-healthy"]
    assert "\nmask of t2-lesion: " in widget.threshold_info.value, widget.threshold_info.value
    widget.image.value = viewer.layers["t2-lesion"]
    assert widget.threshold_info.value == info0
    # the model box moves on: the line names the result's model too; back, as it was
    widget.model.value = "t1-brain"
    assert "\nmask of t2-lesion (t2-brain): " in widget.threshold_info.value
    widget.model.value = "t2-brain"
    assert widget.threshold_info.value == info0


def test_cancel_leaves_no_partial_layers(make_napari_viewer, qtbot):
    viewer, widget = _open(make_napari_viewer, qtbot)
    widget.batch_size = 4
    before = len(notification_manager.records)
    widget.run_button.clicked()
    qtbot.waitUntil(lambda: widget.progress.value > 0, timeout=TIMEOUT_MS)
    assert widget.cancel_button.enabled
    widget.cancel_button.clicked()
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)
    assert [layer.name for layer in viewer.layers] == ["t2-lesion"]
    assert widget.session is None and widget.run_button.enabled and not widget.cancel_button.enabled
    msgs = [str(n.message) for n in notification_manager.records[before:]]
    assert any("cancelled" in m for m in msgs), msgs
    widget.batch_size = 64
    _run(qtbot, widget)  # ready again
    assert set(_results(viewer)) == set(SUFFIXES)


def test_export_then_reload_mask(make_napari_viewer, qtbot, tmp_path):
    viewer, widget = _open(make_napari_viewer, qtbot)
    _run(qtbot, widget)
    out = tmp_path / "t2-lesion_mask.nii.gz"
    [written] = widget.export(out)
    back = nib.load(written)
    src = nib.load(sample_path("t2-lesion"))
    np.testing.assert_array_equal(
        np.asarray(back.dataobj), viewer.layers["t2-lesion anomaly mask"].data
    )
    np.testing.assert_array_equal(back.affine, src.affine)
    with pytest.raises(OutputExistsError):
        widget.export(out)
    files = widget.export(out, overwrite=True, maps=True)
    assert len(files) >= 10 and all(Path(f).exists() for f in files)
    # the writer route (File > Save Selected Layers) gives the same file
    via_writer = tmp_path / "via_writer.nii.gz"
    viewer.layers.selection = {viewer.layers["t2-lesion anomaly mask"]}
    viewer.layers.save(str(via_writer), selected=True, plugin="napari-vaeloc")
    again = nib.load(via_writer)
    np.testing.assert_array_equal(np.asarray(again.dataobj), np.asarray(back.dataobj))
    np.testing.assert_array_equal(again.affine, back.affine)


def test_two_d_slice_layer(make_napari_viewer, qtbot):
    viewer, widget = _open(make_napari_viewer, qtbot)
    scan = viewer.layers["t2-lesion"]
    z = scan.data.shape[2] // 2
    sl = viewer.add_image(
        scan.data[:, :, z].copy(), name="slice", scale=scan.scale[:2], units=("mm", "mm")
    )
    widget.image.value = sl
    _run(qtbot, widget)
    for s in SUFFIXES:
        layer = viewer.layers[f"slice {s}"]
        assert layer.data.shape == sl.data.shape
        np.testing.assert_allclose(layer.scale, sl.scale)


def test_error_is_a_notification(make_napari_viewer, qtbot):
    viewer, widget = _open(make_napari_viewer, qtbot)
    viewer.add_image(np.ones((20, 20, 20), dtype=np.float32), name="flat", units=("mm",) * 3)
    widget.image.value = viewer.layers["flat"]
    before, runs = len(notification_manager.records), widget.runs
    widget.run_button.clicked()  # refused at the click: no run starts
    assert not widget.running and widget.runs == runs
    msgs = [str(n.message) for n in notification_manager.records[before:]]
    assert msgs == [
        "localization failed: the image is constant (every voxel is 1): nothing to localize"
    ], msgs
    assert widget.run_button.enabled and widget.session is None
    assert widget.progress.label == "not localized"


def test_screenshot_shows_overlay(make_napari_viewer, qtbot):
    viewer, widget = _open(make_napari_viewer, qtbot, show=True)
    scan = viewer.layers["t2-lesion"]
    _run(qtbot, widget)
    # the slice through the lesion's centre, in whatever view the reader chose
    mask = viewer.layers["t2-lesion anomaly mask"].data
    centre = np.argwhere(mask > 0).mean(axis=0)
    world = scan.data_to_world(centre)
    for axis in range(3):
        viewer.dims.set_point(axis, world[axis])
    results = list(_results(viewer).values())
    shown = [layer for layer in results if layer.visible]
    assert shown, "the combined map and the mask are shown after a run"
    for layer in shown:
        layer.visible = False
    qtbot.wait(50)
    plain = viewer.screenshot(canvas_only=True, flash=False, size=(400, 400))
    assert plain[..., :3].std() > 5  # the scan itself is rendered, not a blank canvas
    for layer in shown:
        layer.visible = True
    qtbot.wait(50)
    overlay = viewer.screenshot(canvas_only=True, flash=False, size=(400, 400))
    assert overlay.shape == plain.shape
    changed = np.abs(overlay[..., :3].astype(int) - plain[..., :3].astype(int)).sum(-1) > 30
    assert changed.mean() > 0.001, changed.mean()


def test_export_button_asks_before_overwriting(make_napari_viewer, qtbot, tmp_path, monkeypatch):
    from qtpy.QtWidgets import QFileDialog

    viewer, widget = _open(make_napari_viewer, qtbot)
    _run(qtbot, widget)
    out = tmp_path / "button_mask.nii.gz"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(out), ""))
    asked: list[str] = []
    widget.confirm = lambda msg: asked.append(msg) or False

    def click():
        widget.export_button.clicked()
        qtbot.waitUntil(lambda: not widget.exporting, timeout=TIMEOUT_MS)  # writes in a worker

    click()
    assert out.exists() and not asked
    out.write_bytes(b"keep me")
    click()
    assert len(asked) == 1 and out.read_bytes() == b"keep me"  # answered no: file kept
    assert str(out) in asked[0] and "--overwrite" not in asked[0]  # GUI words, not CLI flags
    widget.confirm = lambda msg: True
    click()
    np.testing.assert_array_equal(
        np.asarray(nib.load(out).dataobj), viewer.layers["t2-lesion anomaly mask"].data
    )


def test_prepare_choice_stages_and_fit_line(make_napari_viewer, qtbot):
    viewer, widget = _open(make_napari_viewer, qtbot)
    assert widget.prepare.value == "auto"
    assert [c for c in widget.prepare.choices] == ["auto", "full", "none"]
    for word in ("auto:", "full:", "none:"):
        assert word in widget.prepare.tooltip
    seen: list[str] = []
    widget._relay.stage.connect(seen.append)
    _run(qtbot, widget)
    assert "scoring slices" in seen and seen[-1] == "mapping back to the scan", seen
    assert widget.progress.label.startswith("done in")
    fit = widget.fit_info.value
    assert fit.startswith("scan fits the model: looks like T2 (r = "), fit
    assert "registration Dice" in fit and "coverage" in fit
    # a skull-stripped brain on the template's grid: no brain extraction, no registration, so
    # no brain-mask layer (it would be the scan's own non-zero voxels)
    assert set(_results(viewer)) == set(SUFFIXES) and len(viewer.layers) == 1 + len(SUFFIXES)

    widget.prepare.value = "none"
    seen.clear()
    _run(qtbot, widget)
    assert seen == ["scoring slices"], seen
    assert widget.fit_info.value.startswith("scored as given (prepare scan: none)")
    widget._relay.stage.disconnect(seen.append)


def test_preparation_off_for_a_raw_head_warns_in_the_fit_line(make_napari_viewer, qtbot):
    """ "prepare scan: none" on the raw T1 head (not on the template's grid) still scores it,
    and the fit line says in orange that the head was taken for a brain in the model's space."""
    from napari_vaeloc._widget_run import FIT_STYLE

    viewer = make_napari_viewer(show=False)
    viewer.open_sample("napari-vaeloc", "t1-head-lesion")
    _, widget = viewer.window.add_plugin_dock_widget("napari-vaeloc", "Localize anomalies")
    qtbot.waitUntil(lambda: widget._devices is not None, timeout=60_000)
    widget.model.value = "t1-brain"
    widget.device.value = "cpu"
    widget.prepare.value = "none"
    clicked = time.perf_counter()
    _run(qtbot, widget)
    wall = time.perf_counter() - clicked
    # the bar's time runs from the click to the layers: at least the engine's, at most the wall
    took = float(widget.progress.label.split()[2])
    assert widget.session.result.seconds <= took <= wall + 0.05, (took, wall)
    fit = widget.fit_info.value
    assert fit.startswith("preparation is off and the scan (128x128x128) is not on the grid"), fit
    assert fit.endswith("it was scored as given"), fit
    assert widget.fit_info.native.styleSheet() == FIT_STYLE["warn"]
    assert "t1-head-lesion anomaly mask" in viewer.layers


def test_single_slice_is_scored_as_given(make_napari_viewer, qtbot):
    viewer, widget = _open(make_napari_viewer, qtbot)
    scan = viewer.layers["t2-lesion"]
    z = scan.data.shape[2] // 2
    sl = viewer.add_image(scan.data[:, :, z].copy(), name="slice", scale=scan.scale[:2])
    widget.image.value = sl
    assert not widget.guessing  # no modality guess for a single slice
    widget.prepare.value = "full"
    before, runs = len(notification_manager.records), widget.runs
    widget.run_button.clicked()
    assert not widget.running and widget.runs == runs  # refused before any work
    assert widget.fit_info.value.startswith("not localized: a single slice cannot be prepared")
    msgs = [str(n.message) for n in notification_manager.records[before:]]
    assert any("single slice" in m for m in msgs), msgs
    widget.prepare.value = "auto"
    _run(qtbot, widget)
    assert widget.fit_info.value.startswith("single slice: scored as given")
    assert "slice anomaly mask" in viewer.layers


def test_voxels_without_data_in_the_file_are_left_out(make_napari_viewer, qtbot, tmp_path):
    """A file's NaN voxels, read as background for the view, stay known to the panel: the run
    leaves them out of the anomaly map and the mask, as the command line does."""
    if "t2-brain" not in bundled_models():
        pytest.skip("the bundled t2-brain model is not installed")
    img = nib.load(sample_path("t2-lesion"))
    data = np.asarray(img.dataobj, np.float32)
    gap = (slice(40, 56), slice(50, 66), slice(40, 56))
    data[gap] = np.nan
    path = tmp_path / "holed.nii.gz"
    nib.save(nib.Nifti1Image(data, img.affine), path)
    viewer = make_napari_viewer(show=False)
    [layer] = viewer.open(str(path), plugin="napari-vaeloc")
    assert np.isfinite(layer.data).all()  # shown as background
    assert np.all(layer.data[gap] == layer.data.min())
    _, widget = viewer.window.add_plugin_dock_widget("napari-vaeloc", "Localize anomalies")
    widget.model.value = "t2-brain"
    qtbot.waitUntil(lambda: widget._devices is not None, timeout=60_000)
    widget.device.value = "cpu"
    widget.threshold.value = 0.0  # everything scored is marked
    _run(qtbot, widget)
    widget.threshold.value = 0.0
    widget.apply_settings()
    mask = viewer.layers["holed anomaly mask"].data.astype(bool)
    assert mask.any() and not mask[gap].any()
    assert not viewer.layers["holed anomaly map"].data[gap].any()
    assert not widget.session.result.foreground[gap].any()
    assert any("has no data in the file" in n for n in widget.session.result.notes)
    # scored with the gap filled from the tissue around it, as the command line scores it
    scored = widget.session.result.volume
    np.testing.assert_allclose(scored.data, load_volume(path).data)
    assert scored.data[gap].min() > layer.data.min()
    assert any("enclosed by the scan's data filled" in n for n in scored.notes), scored.notes
    # no invented tissue shown: every map, the brain mask and the corrected brain are 0 there
    result = widget.session.result
    assert not result.prepared.brain_mask[gap].any()
    assert not result.prepared.corrected[gap].any()
    for name in result.maps:
        assert not result.maps[name][gap].any(), name
    # and the fit line names the gap (a notification alone passes)
    assert "without data in the file" in widget.fit_info.value, widget.fit_info.value
