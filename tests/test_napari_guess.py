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
