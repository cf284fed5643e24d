"""Regenerate the screenshots of docs/plugin.md (needs an X server: ``xvfb-run -a``).

xvfb-run -a .venv/bin/python docs/images/make_screenshots.py [--model t2-brain] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="t2-brain", help="bundled model name or model folder")
    ap.add_argument("--out", type=Path, default=HERE, help="folder of the PNGs (default: here)")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_vaeloc.io import load_volume
    from napari_vaeloc.models.store import bundled_models
    from napari_vaeloc.samples import sample_path

    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1400, 900)
    viewer.open_sample("napari-vaeloc", "t2-lesion")
    _, widget = viewer.window.add_plugin_dock_widget("napari-vaeloc", "Localize anomalies")
    if args.model in bundled_models():
        widget.model.value = args.model
    else:
        widget.add_model_folder(args.model)
    widget.device.value = "cpu"
    widget.run_button.clicked()
    while widget.running:
        app.processEvents()
        time.sleep(0.01)
    truth = load_volume(sample_path("t2-lesion-truth")).data > 0
    scan = viewer.layers["t2-lesion"]
    z = int(np.argmax(truth.sum(axis=(0, 1))))
    viewer.dims.order = (2, 1, 0)  # axial view: slider along Z
    # the layer's transform is the file's affine: voxel z as a world position (mm)
    viewer.dims.set_point(2, scan.data_to_world((0, 0, z))[2])
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    viewer.screenshot(str(out / "widget_result_2d.png"), canvas_only=False, flash=False)
    widget.native.grab().save(str(out / "widget_panel.png"))
    viewer.layers["t2-lesion anomaly mask"].visible = False
    viewer.layers["t2-lesion reconstruction error"].visible = False
    viewer.screenshot(str(out / "anomaly_map_2d.png"), canvas_only=True, flash=False)
    viewer.layers["t2-lesion anomaly mask"].visible = True
    viewer.layers["t2-lesion anomaly map"].visible = False
    viewer.dims.ndisplay = 3
    viewer.layers["t2-lesion"].opacity = 0.4
    viewer.scene.camera.angles = (0, -60, 110)
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    viewer.screenshot(str(out / "mask_3d.png"), canvas_only=True, flash=False)
    viewer.close()


if __name__ == "__main__":
    main()
