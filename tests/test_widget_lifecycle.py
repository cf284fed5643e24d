"""The widget's life cycle and what it explains: closing the viewer or the panel mid-run,
switching or removing the scan mid-run, failed runs, export in the background, 4D scans,
unusable and mask-like scans, plain-language labels. Real viewer, real tiny model folders,
real torch; a closing viewer runs in a subprocess so that a crash shows as a return code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from napari.utils.notifications import notification_manager

from napari_vaeloc.evaluation.synthetic import head_phantom
from napari_vaeloc.mapnames import PIXEL_MAPS
from napari_vaeloc.models.store import save_model

from .helpers import tiny_card

TIMEOUT_MS = 60_000
SHAPE = (40, 40, 6)  # 40 sagittal slices; too thin for the modality guess (no deepbet runs)
#: the paper's and the files' names of the maps: never shown in the panel or a layer name
INTERNAL = re.compile(
    r"\b(" + "|".join(PIXEL_MAPS) + r")\b|Rec-Error|KL-Grad|\bCombi\b|ELBO-Grad", re.IGNORECASE
)


def _open(make_napari_viewer, qtbot, model_dir, scans=("A",)):
    viewer = make_napari_viewer()
    for i, name in enumerate(scans):
        viewer.add_image(head_phantom(SHAPE, seed=i + 1), name=name)
    _, widget = viewer.window.add_plugin_dock_widget("napari-vaeloc", "Localize anomalies")
    qtbot.waitUntil(lambda: widget._devices is not None, timeout=TIMEOUT_MS)
    widget.add_model_folder(model_dir)
    widget.image.value = viewer.layers[scans[0]]
    widget.device.value = "cpu"
    widget.axis.value = "sagittal"
    return viewer, widget


def _at_progress(widget, action, after=2):
    """Call ``action`` in the GUI thread once ``after`` slices are scored (one slice a batch,
    so the run is still going); returns the (done, total) seen then."""
    widget.batch_size = 1
    seen: list[tuple[int, int]] = []

    def on_progress(done, total):
        if not seen and done >= after:
            seen.append((done, total))
            action()

    widget._relay.progress.connect(on_progress)
    return seen


def _run(qtbot, widget):
    widget.run_button.clicked()
    job = widget.job
    assert widget.running and job is not None
    qtbot.waitUntil(lambda: job.finished, timeout=TIMEOUT_MS)
    qtbot.waitUntil(lambda: not widget.running or widget.job is not job, timeout=TIMEOUT_MS)
    qtbot.wait(50)  # signals queued behind the end
    return job


def _messages(since):
    return [str(n.message) for n in notification_manager.records[since:]]


def _names(viewer):
    return [layer.name for layer in viewer.layers]


@pytest.fixture
def second_model(tmp_path, tiny_network):
    return save_model(tiny_network, tiny_card(tiny_network, "tiny-b"), tmp_path / "b")


CLOSE_SCRIPT = textwrap.dedent(
    """
    import sys
    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication
    from napari_vaeloc.evaluation.synthetic import head_phantom

    app = QApplication.instance() or QApplication([])

    def viewer_with_run(model_dir, then):
        viewer = napari.Viewer(show=False)
        viewer.add_image(head_phantom((40, 40, 6), seed=1), name="A")
        _, w = viewer.window.add_plugin_dock_widget("napari-vaeloc", "Localize anomalies")
        w.add_model_folder(model_dir)
        w.device.value, w.axis.value, w.batch_size = "cpu", "sagittal", 1
        seen = []
        def on_progress(done, total):
            if not seen and done >= 2:
                seen.append(done)
                viewer.close()  # the signals of the run now reach a deleted panel
                then()
        w._relay.progress.connect(on_progress)
        w.run_button.clicked()
        return w

    # 1: the viewer closes, the application goes on until the run has stopped
    first = viewer_with_run(sys.argv[1], lambda: None)
    job = first.job
    while not job.finished:
        app.processEvents()
    for _ in range(50):
        app.processEvents()
    print("first", first.closed, job.cancel.is_set(), first.session is None, flush=True)
    # 2: the viewer closes and the application quits at once (napari's window closed)
    second = viewer_with_run(sys.argv[1], lambda: QTimer.singleShot(0, app.quit))
    app.exec()
    print("second", second.closed, second.job.cancel.is_set(), flush=True)
    """
)


def test_closing_the_viewer_mid_run_does_not_crash(tiny_model_dir):
    proc = subprocess.run(
        [sys.executable, "-c", CLOSE_SCRIPT, str(tiny_model_dir)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    lines = proc.stdout.split("\n")
    # closed down, the run cancelled, its result never shown
    assert "first True True True" in lines, proc.stdout
    assert "second True True" in lines, proc.stdout


def test_closing_the_panel_mid_run_cancels_it(make_napari_viewer, qtbot, tiny_model_dir):
    viewer, widget = _open(make_napari_viewer, qtbot, tiny_model_dir)
    seen = _at_progress(widget, lambda: viewer.window.remove_dock_widget(widget.native))
    job = _run(qtbot, widget)
    assert seen and seen[0][0] < seen[0][1]  # closed while slices were left
    assert widget.closed and job.cancel.is_set()
    qtbot.wait(300)  # the dock is deleted later; nothing else may arrive
    assert _names(viewer) == ["A"] and widget.session is None


def test_switching_scan_and_model_mid_run_keeps_the_result_tied(
    make_napari_viewer, qtbot, tiny_model_dir, second_model
):
    viewer, widget = _open(make_napari_viewer, qtbot, tiny_model_dir, scans=("A", "B"))
    widget.add_model_folder(second_model)
    widget.model.value = "tiny"
    widget.axis.value = "model"  # 6 axial slices: a short run

    def switch():
        widget.image.value = viewer.layers["B"]
        widget.model.value = "tiny-b"

    _at_progress(widget, switch)
    _run(qtbot, widget)
    # the result belongs to the scan and model the run started with, and says so
    assert widget.session is not None and widget.session.result.model_name == "tiny"
    assert widget.result_info.value.startswith("A, model tiny (axial slices")
    added = [n for n in _names(viewer) if n not in ("A", "B")]
    assert added and all(n.startswith("A ") for n in added), added
    assert widget.image.value is viewer.layers["B"] and widget.model.value == "tiny-b"
    # the result line stays with the result when the selection changes again
    widget.image.value = viewer.layers["A"]
    assert widget.result_info.value.startswith("A, model tiny ")


def test_removing_the_scan_mid_run_cancels_it(make_napari_viewer, qtbot, tiny_model_dir):
    viewer, widget = _open(make_napari_viewer, qtbot, tiny_model_dir, scans=("A", "B"))
    since = len(notification_manager.records)
    _at_progress(widget, lambda: viewer.layers.remove("A"))
    job = _run(qtbot, widget)
    assert job.cancel.is_set()
    assert _names(viewer) == ["B"] and widget.session is None
    msgs = _messages(since)
    assert any("the scan layer 'A' was removed" in m for m in msgs), msgs
    assert widget.progress.label in ("cancelled during scoring slices", "result dropped")
    assert widget.run_button.enabled and not widget.cancel_button.enabled


def test_failed_run_after_a_result(make_napari_viewer, qtbot, tiny_model_dir, tmp_path):
    viewer, widget = _open(make_napari_viewer, qtbot, tiny_model_dir)
    _run(qtbot, widget)
    mask = viewer.layers["A anomaly mask"].data.copy()
    zeros = viewer.add_image(np.zeros(SHAPE, np.float32), name="zeros")
    widget.image.value = zeros
    since, runs = len(notification_manager.records), widget.runs
    widget.run_button.clicked()
    # refused at the click, in one line; no run started
    assert not widget.running and widget.runs == runs
    msgs = _messages(since)
    assert msgs == ["localization failed: the image is constant (every voxel is 0): nothing "
                    "to localize"], msgs  # fmt: skip
    assert widget.progress.label == "not localized"
    assert widget.fit_info.value.startswith("not localized: the image is constant")
    # the shown result stays, with its export: the result line names it
    assert widget.result_info.value.startswith("A, model tiny ")
    assert widget.export_button.enabled
    out = tmp_path / "a_mask.nii.gz"
    assert widget.export_in_background(out)
    qtbot.waitUntil(lambda: not widget.exporting, timeout=TIMEOUT_MS)
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), mask)


def test_export_runs_in_a_worker(make_napari_viewer, qtbot, tiny_model_dir, tmp_path):
    from qtpy.QtCore import QTimer

    viewer, widget = _open(make_napari_viewer, qtbot, tiny_model_dir)
    big = head_phantom((160, 160, 96), seed=3)
    widget.image.value = viewer.add_image(big, name="big")
    widget.axis.value = "model"
    _run(qtbot, widget)
    ticks: list[float] = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(20)
    t0 = time.perf_counter()
    assert widget.export_in_background(tmp_path / "big_mask.nii.gz", maps=True)
    assert time.perf_counter() - t0 < 0.25  # the click returns at once
    assert widget.exporting and widget.progress.max == 0  # busy bar
    assert widget.progress.label.startswith("exporting to ")
    assert not widget.run_button.enabled and not widget.export_button.enabled
    assert not widget.threshold.enabled
    qtbot.waitUntil(lambda: not widget.exporting, timeout=TIMEOUT_MS)
    took = time.perf_counter() - t0
    timer.stop()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "big_mask.nii.gz" in files and "big_scores.json" in files and len(files) >= 9
    assert widget.progress.label == f"exported {len(files)} file(s)"
    assert took > 0.3 and np.diff(ticks).max() < 0.25, (took, np.diff(ticks).max())
    assert widget.run_button.enabled and widget.export_button.enabled and widget.threshold.enabled
    # a failed export is one line
    since = len(notification_manager.records)
    (tmp_path / "file").write_text("x")
    assert not widget.export_in_background(tmp_path / "file" / "m.nii.gz")
    msgs = _messages(since)
    assert len(msgs) == 1 and msgs[0].startswith("export failed: ") and "\n" not in msgs[0]


def test_suggested_export_folder_is_never_the_package(tmp_path, monkeypatch):
    import napari_vaeloc
    from napari_vaeloc._widget_export import suggested_path
    from napari_vaeloc.samples import sample_path

    package = Path(napari_vaeloc.__file__).resolve().parent
    sample = sample_path("t2-lesion")
    monkeypatch.chdir(tmp_path)
    assert suggested_path(sample, "s") == tmp_path / "s_mask.nii.gz"
    monkeypatch.chdir(package)  # the current folder is inside the package: the home folder
    assert suggested_path(sample, "s") == Path.home() / "s_mask.nii.gz"
    own = tmp_path / "scan.nii.gz"
    assert suggested_path(own, "scan") == tmp_path / "scan_mask.nii.gz"


def test_four_d_scan_offers_a_volume(make_napari_viewer, qtbot, tiny_model_dir, tmp_path):
    data = np.stack([head_phantom(SHAPE, seed=s) for s in (1, 2, 3)], axis=-1)
    path = tmp_path / "four.nii.gz"
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([2.0, 2.0, 3.0, 1.0])), path)
    viewer, widget = _open(make_napari_viewer, qtbot, tiny_model_dir)
    assert widget.volume.native.isHidden()  # a 3D scan
    [four] = viewer.open(str(path), plugin="napari-vaeloc")
    assert four.ndim == 4
    viewer.dims.set_current_step(0, 2)  # the viewer shows volume 2
    widget.image.value = four
    assert (
        not widget.volume.native.isHidden() and widget.volume.max == 2 and widget.volume.value == 2
    )
    widget.volume.value = 1
    viewer.dims.set_current_step(0, 0)
    assert widget.volume.value == 1  # picked by hand: kept
    _run(qtbot, widget)
    assert widget.session is not None, widget.fit_info.value
    np.testing.assert_allclose(widget.session.volume.data, data[..., 1], rtol=1e-6)
    mask = viewer.layers["four volume 1 anomaly mask"]
    assert mask.data.shape == SHAPE
    assert widget.result_info.value.startswith("four volume 1, model tiny")


def test_mask_like_scan_is_warned_at_the_click(make_napari_viewer, qtbot, tiny_model_dir):
    viewer, widget = _open(make_napari_viewer, qtbot, tiny_model_dir)
    binary = (head_phantom(SHAPE, seed=1) > 0.5).astype(np.uint8)
    widget.image.value = viewer.add_image(binary, name="binary")
    since = len(notification_manager.records)
    widget.run_button.clicked()
    assert widget.running
    warned = [n for n in notification_manager.records[since:] if "looks like a mask" in str(n)]
    assert len(warned) == 1 and warned[0].severity == "warning"
    qtbot.waitUntil(lambda: widget.job.finished, timeout=TIMEOUT_MS)


def test_every_control_explains_itself_in_plain_words(make_napari_viewer, qtbot, tiny_model_dir):
    viewer, widget = _open(make_napari_viewer, qtbot, tiny_model_dir)
    _run(qtbot, widget)
    widget.image.value = viewer.add_image(np.zeros((8, 8, 8, 2), np.float32), name="t")
    for w in widget:
        assert w.tooltip and w.tooltip.strip(), f"{type(w).__name__} {w.label!r} has no tooltip"
        shown = [w.label, getattr(w, "text", ""), str(getattr(w, "value", ""))]
        if type(w).__name__ == "ComboBox":
            shown += [w.native.itemText(i) for i in range(w.native.count())]
        for text in shown:
            assert not INTERNAL.search(str(text)), (w.label, text)
    layers = [layer.name for layer in viewer.layers]
    assert "A reconstruction error" in layers and "A KL gradient" in layers
    for name in layers:
        assert not INTERNAL.search(name), name
    assert widget.weights["combi"].label == "weight: error × KL gradient"
    assert "healthy 99th percentile" in widget.weights["kl_grad"].tooltip
