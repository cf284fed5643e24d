"""The panel's modality guess in a real napari viewer: a busy progress bar while it prepares the
scan, cleared when it ends or is stopped; a binary mask recognises no modality and keeps the
model. Real bundled models and sample scans (the skull-stripped T2 sample and a brain mask on the
template's grid need neither brain extraction nor registration: a few seconds each)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from napari_vaeloc._widget_controller import in_panel_words
from napari_vaeloc._widget_guess import GUESS_LABEL
from napari_vaeloc.models.store import bundled_models

TIMEOUT_MS = 120_000


@pytest.fixture(autouse=True)
def _models():
    if not {"t1-brain", "t2-brain"} <= set(bundled_models()):
        pytest.skip("the bundled t1-brain and t2-brain models are not installed")


def _dock(viewer, qtbot):
    _, widget = viewer.window.add_plugin_dock_widget("napari-vaeloc", "Localize anomalies")
    return widget


def _busy(widget) -> bool:
    return widget.progress.max == 0 and widget.progress.label == GUESS_LABEL


def test_guess_shows_a_busy_bar_until_it_ends_or_stops(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-vaeloc", "t2-lesion")
    widget = _dock(viewer, qtbot)
    assert widget.guessing and _busy(widget)  # the guess of the first image started
    qtbot.waitUntil(lambda: not widget.guessing, timeout=TIMEOUT_MS)
    assert widget.progress.max == 1 and widget.progress.label == "progress"  # as it was
    assert widget.model.value == "t2-brain"

    # a guess stopped by a new selection that needs no guess: the bar is cleared at once
    viewer.open_sample("napari-vaeloc", "t1-head-lesion")
    widget.image.value = viewer.layers["t1-head-lesion"]
    assert widget.guessing and _busy(widget)
    flat = viewer.add_image(np.zeros((40, 40), np.float32), name="slice")
    widget.image.value = flat  # a 2D image: no guess
    assert not widget.guessing and widget.progress.label == "progress" and widget.progress.max == 1

    # what the bar showed before the guess comes back after it
    widget.progress.max, widget.progress.value = 1, 1
    widget.progress.label = "done in 3.0 s on cpu"
    widget.image.value = viewer.layers["t2-lesion"]
    assert _busy(widget)
    qtbot.waitUntil(lambda: not widget.guessing, timeout=TIMEOUT_MS)
    assert widget.progress.label == "done in 3.0 s on cpu" and widget.progress.value == 1


def test_binary_mask_recognises_no_modality(make_napari_viewer, qtbot, tmp_path):
    m = nib.load(bundled_models()["t1-brain"] / "template_brain_mask.nii.gz")
    path = tmp_path / "brain_mask.nii.gz"  # float 0/1: opened as an Image layer
    nib.save(nib.Nifti1Image((np.asarray(m.dataobj) > 0).astype(np.float32), m.affine), path)
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="napari-vaeloc")
    widget = _dock(viewer, qtbot)
    widget.model.value = "t1-brain-coronal"  # as if picked earlier; the guess must not move it
    widget._start_guess()
    qtbot.waitUntil(lambda: not widget.guessing, timeout=TIMEOUT_MS)
    assert widget.model.value == "t1-brain-coronal"
    info = widget.model_info.value
    assert "no known modality recognised (best r = 0.0" in info, info
    assert "at least 0.25 needed); model left as it is" in info, info
    assert "model chosen" not in info


def test_brain_extraction_advice_names_the_panel_controls():
    advice = "registration failed; check the scan, or force brain extraction on or off if ..."
    said = in_panel_words(advice)
    assert "'prepare scan: full'" in said and "'prepare scan: none'" in said
    assert "on or off" not in said and in_panel_words(said) == said


def test_a_very_large_scan_is_guessed_from_a_block_averaged_copy(monkeypatch):
    """coarse_copy: blocks averaged, each coarse voxel at the centre of its block in world
    coordinates; the guess on a 2x upsampled T2 sample still says T2."""
    from napari_vaeloc._widget_guess import coarse_copy, guess_in_worker
    from napari_vaeloc.io import Volume, load_volume
    from napari_vaeloc.samples import sample_path

    rng = np.random.default_rng(0)
    affine = np.array([[0, 0, -0.5, 10], [0.7, 0, 0, -3], [0, 0.6, 0, 2], [0, 0, 0, 1.0]])
    fine = Volume.from_array(rng.random((13, 12, 9)).astype(np.float32), affine)
    assert coarse_copy(fine, max_voxels=13 * 12 * 9) is fine
    coarse = coarse_copy(fine, max_voxels=300)  # 1404 voxels: blocks of 2 (6x6x4 = 144)
    assert coarse.shape == (6, 6, 4)
    np.testing.assert_allclose(coarse.data[1, 2, 3], fine.data[2:4, 4:6, 6:8].mean(), rtol=1e-6)
    centre = fine.affine @ np.array([2.5, 4.5, 6.5, 1.0])  # the mean of block (1, 2, 3)
    np.testing.assert_allclose(coarse.affine @ np.array([1, 2, 3, 1.0]), centre)

    t2 = load_volume(sample_path("t2-healthy"))
    big = np.repeat(np.repeat(np.repeat(t2.data, 2, 0), 2, 1), 2, 2)
    a = np.array(t2.affine, dtype=np.float64)
    a[:3, 3] -= a[:3, :3] @ np.full(3, 0.25)
    a[:3, :3] /= 2
    inputs = {"data": big, "affine": a, "header": None, "path": None}
    import napari_vaeloc._widget_guess as guess

    monkeypatch.setattr(guess, "GUESS_MAX_VOXELS", big.size // 4)  # "very large" here
    seen = []
    monkeypatch.setattr(guess, "coarse_copy", lambda v: seen.append(coarse_copy(v)) or seen[-1])
    assert guess_in_worker(inputs, lambda: False).modality == "T2"
    assert seen[0].shape == t2.shape  # the guess saw the block-averaged copy
