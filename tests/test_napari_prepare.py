"""The widget's scan preparation end to end: a raw individual head (skull, LIA voxel order, not
registered) in a real napari viewer, with the real bundled models, deepbet and SimpleITK.

A fresh preparation costs about 15 s on a 2-core CPU; preparations are cached per scan content,
settings and template (``prepare._CACHE``, process-wide), so the modality guess made when the
head is selected also serves the t1-brain run. Fresh ones here: the head against the T1
template (guess), against the T2 template (refusal), the T2 sample (guess, no skull: quick) and
three cancelled ones.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from napari.utils.notifications import notification_manager

from napari_vaeloc import prepare
from napari_vaeloc._widget_layers import to_layer_order
from napari_vaeloc.io import load_volume
from napari_vaeloc.models.store import bundled_models
from napari_vaeloc.samples import sample_path

HEAD = "t1-head-lesion"
TIMEOUT_MS = 240_000
VOXEL_ML = 0.008  # 2 mm voxels
PREPARATION_STAGES = ("bias-field correction", "brain extraction", "registration")


@pytest.fixture(autouse=True)
def _models():
    if not {"t1-brain", "t2-brain"} <= set(bundled_models()):
        pytest.skip("the bundled t1-brain and t2-brain models are not installed")


def _open(make_napari_viewer, qtbot, *samples):
    viewer = make_napari_viewer()
    for key in samples:
        viewer.open_sample("napari-vaeloc", key)
    _, widget = viewer.window.add_plugin_dock_widget("napari-vaeloc", "Localize anomalies")
    qtbot.waitUntil(lambda: widget._devices is not None, timeout=60_000)  # torch imported
    widget.device.value = "cpu"
    _settle(qtbot, widget)
    return viewer, widget


def _settle(qtbot, widget):
    """Wait until the modality guess of the selected image is over."""
    qtbot.waitUntil(lambda: not widget.guessing, timeout=TIMEOUT_MS)


def _run(qtbot, widget):
    widget.run_button.clicked()
    assert widget.running
    qtbot.waitUntil(lambda: not widget.running, timeout=TIMEOUT_MS)


def _messages(since):
    return [str(n.message) for n in notification_manager.records[since:]]


def _snapshot(viewer):
    return [(layer.name, id(layer), layer.data.copy()) for layer in viewer.layers]


def _assert_unchanged(viewer, snapshot):
    assert [layer.name for layer in viewer.layers] == [name for name, _, _ in snapshot]
    for layer, (_, ident, data) in zip(viewer.layers, snapshot, strict=True):
        assert id(layer) == ident
        np.testing.assert_array_equal(layer.data, data)


def test_raw_head_is_prepared_and_localized(make_napari_viewer, qtbot):
    viewer, widget = _open(make_napari_viewer, qtbot, HEAD)
    scan = viewer.layers[HEAD]
    assert widget.model.value == "t1-brain"
    assert "T1 model chosen: the scan looks like T1 (r = " in widget.model_info.value
    assert "T1, axial + coronal + sagittal fused; calibrated" in widget.model_info.value
    assert widget.prepare.value == "auto"
    token = widget._guess_token
    t0 = time.perf_counter()
    _run(qtbot, widget)  # the guess's preparation is cached: only scoring runs
    assert time.perf_counter() - t0 < 60
    # new result layers do not change the selection, so no new guess started
    assert widget._guess_token == token and not widget.guessing
    assert widget.session is not None, widget.fit_info.value

    fit = widget.fit_info.value
    assert fit.startswith("scan fits the model: looks like T1"), fit
    assert "registration Dice 0.9" in fit and "coverage 100%" in fit, fit
    assert "registration" in widget.fit_info.tooltip  # every step and check

    brain = viewer.layers[f"{HEAD} brain mask"]
    prepared = viewer.layers[f"{HEAD} corrected brain"]
    mask = viewer.layers[f"{HEAD} anomaly mask"]
    assert brain.__class__.__name__ == "Labels" and prepared.__class__.__name__ == "Image"
    assert brain.visible and not prepared.visible
    for layer in (brain, prepared, mask):
        assert layer.data.shape == scan.data.shape
        np.testing.assert_allclose(layer.scale, scan.scale)
        np.testing.assert_allclose(layer.translate, scan.translate)
        np.testing.assert_allclose(layer.affine.affine_matrix, scan.affine.affine_matrix)
        np.testing.assert_allclose(layer.metadata["affine"], scan.metadata["affine"])
    assert widget.image.choices == (scan,)  # result layers are not offered as input

    # the reference in the layer's axis order (the reader shows the LIA head in RAS order)
    reference = to_layer_order(scan, load_volume(sample_path("t1-head-brain-mask")).data > 0)
    extracted = brain.data > 0
    dice = 2 * (extracted & reference).sum() / (extracted.sum() + reference.sum())
    assert dice > 0.95, dice
    assert prepared.data[~extracted].max() == 0 and prepared.data[extracted].max() > 0
    # the anomaly mask lies in the brain: under 1 ml outside the reference brain mask, at the
    # default threshold and at a low one that marks thousands of voxels
    outside = (mask.data.astype(bool) & ~reference).sum() * VOXEL_ML
    assert outside < 1.0, outside
    widget.threshold.value = 1.0
    widget.apply_settings()
    low = mask.data.astype(bool)
    assert low.sum() > 1000
    assert (low & ~reference).sum() * VOXEL_ML < 1.0


def test_a_run_clicked_during_the_guess_reuses_its_preparation(
    make_napari_viewer, qtbot, monkeypatch
):
    """Localize clicked while the modality guess still prepares the scan: the run waits for
    that preparation instead of repeating it side by side (one preparation in all), the guess
    still reports the modality, and the model picked for the run stays."""
    cached = dict(prepare._CACHE)
    prepare._CACHE.clear()
    calls: list[str] = []
    real = prepare.prepare

    def counted(volume, template, *args, **kwargs):
        calls.append(template.name)
        return real(volume, template, *args, **kwargs)

    monkeypatch.setattr(prepare, "prepare", counted)
    try:
        viewer = make_napari_viewer()
        viewer.open_sample("napari-vaeloc", HEAD)
        _, widget = viewer.window.add_plugin_dock_widget("napari-vaeloc", "Localize anomalies")
        qtbot.waitUntil(lambda: widget._devices is not None, timeout=60_000)
        widget.device.value = "cpu"
        widget.model.value = "t1-brain"
        assert widget.guessing  # the guess's preparation is under way
        _run(qtbot, widget)
        assert widget.session is not None, widget.fit_info.value
        assert widget.fit_info.value.startswith("scan fits the model"), widget.fit_info.value
        _settle(qtbot, widget)
        assert len(calls) == 1, calls  # prepared once, for the guess and the run
        assert widget.model.value == "t1-brain"
        assert "the scan looks like T1" in widget.model_info.value, widget.model_info.value
    finally:
        prepare._CACHE.clear()
        prepare._CACHE.update(cached)


def test_selected_image_preselects_its_model(make_napari_viewer, qtbot):
    viewer, widget = _open(make_napari_viewer, qtbot, "t2-lesion", HEAD)
    t2, head = viewer.layers["t2-lesion"], viewer.layers[HEAD]
    assert widget.image.value is t2  # the first image is selected when the widget opens
    assert widget.model.value == "t2-brain"
    assert "T2 model chosen: the scan looks like T2 (r = " in widget.model_info.value

    widget.image.value = head
    assert widget.guessing and "checking which modality" in widget.model_info.value
    _settle(qtbot, widget)
    assert widget.model.value == "t1-brain"  # the one with a template, not a companion
    assert "T1 model chosen: the scan looks like T1 (r = 0.6" in widget.model_info.value

    # a guess for an image no longer selected is dropped
    widget.image.value = t2
    widget.image.value = head
    _settle(qtbot, widget)
    qtbot.wait(200)  # let any stale result arrive
    assert widget.model.value == "t1-brain"

    # a model picked by hand after the guess started is kept, and the label says why it may
    # not fit
    widget.image.value = t2
    widget.model.value = "t1-brain-coronal"
    _settle(qtbot, widget)
    qtbot.wait(200)
    assert widget.model.value == "t1-brain-coronal"
    assert "the scan looks like T2" in widget.model_info.value
    assert "this model learned T1 scans" in widget.model_info.value

    # a scan that cannot be prepared leaves the model as it is, and the label says so
    flat = viewer.add_image(np.ones((24, 24, 24), np.float32), name="flat", scale=(2, 2, 2))
    widget.image.value = flat
    _settle(qtbot, widget)
    assert widget.model.value == "t1-brain-coronal"
    assert "could not tell the scan's modality (the image is constant" in widget.model_info.value
    assert "model left as it is" in widget.model_info.value


def test_wrong_modality_is_refused(make_napari_viewer, qtbot):
    viewer, widget = _open(make_napari_viewer, qtbot, HEAD)
    widget.model.value = "t2-brain"
    before = _snapshot(viewer)
    since = len(notification_manager.records)
    _run(qtbot, widget)
    fit = widget.fit_info.value
    assert fit.startswith("not localized:") and "choose a T1 model" in fit, fit
    found = widget.fit_info.tooltip  # what the preparation found, on the refusal's tooltip
    assert "registration: done" in found and "modality" in found, found
    assert any("choose a T1 model" in m for m in _messages(since)), _messages(since)
    assert widget.session is None and widget.run_button.enabled
    _assert_unchanged(viewer, before)
    # the refusal is t2-brain's: with the T1 model picked the line is hidden (it says nothing
    # about that model), and back on t2-brain it shows again
    widget.model.value = "t1-brain"
    assert widget.fit_info.value == ""
    widget.model.value = "t2-brain"
    assert widget.fit_info.value == fit


def test_cancel_inside_each_preparation_stage(make_napari_viewer, qtbot):
    viewer, widget = _open(make_napari_viewer, qtbot, HEAD)
    _run(qtbot, widget)  # result layers to keep (the preparation is cached)
    assert f"{HEAD} brain mask" in viewer.layers
    before = _snapshot(viewer)
    cached = dict(prepare._CACHE)
    seen: list[str] = []
    state = {"target": ""}

    def on_stage(name):
        seen.append(name)
        if name == state["target"]:
            widget.cancel_button.clicked()

    widget._relay.stage.connect(on_stage)
    try:
        for target in PREPARATION_STAGES:
            prepare._CACHE.clear()  # only finished preparations are cached
            seen.clear()
            state["target"] = target
            since = len(notification_manager.records)
            _run(qtbot, widget)
            assert seen[-1] == target, seen  # stopped inside it: no later stage began
            assert widget.progress.label == f"cancelled during {target}"
            assert "cancelled" in widget.fit_info.value
            assert any("cancelled" in m for m in _messages(since)), _messages(since)
            _assert_unchanged(viewer, before)
            assert widget.run_button.enabled and not widget.cancel_button.enabled
    finally:
        widget._relay.stage.disconnect(on_stage)
        prepare._CACHE.update(cached)


def test_sample_menu_offers_the_raw_head(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-vaeloc", HEAD)
    viewer.open_sample("napari-vaeloc", "t1-head-lesion-truth")
    head, truth = viewer.layers[HEAD], viewer.layers["t1-head-lesion truth"]
    assert truth.__class__.__name__ == "Labels" and truth.data.dtype == np.uint8
    on_disk = load_volume(sample_path("t1-head-lesion-truth")).data > 0
    np.testing.assert_array_equal(truth.data > 0, to_layer_order(truth, on_disk))
    affine = load_volume(sample_path(HEAD)).affine
    # the lesion's centre lies at its world position in the file, within half a voxel (1 mm)
    want = (affine @ [*np.argwhere(on_disk).mean(axis=0), 1.0])[:3]
    centre = np.argwhere(truth.data > 0).mean(axis=0)
    for layer in (head, truth):
        np.testing.assert_allclose(layer.metadata["affine"], affine)
        np.testing.assert_allclose(layer.scale, (2.0, 2.0, 2.0))
        np.testing.assert_allclose(layer.data_to_world(centre), want, atol=1.0)
