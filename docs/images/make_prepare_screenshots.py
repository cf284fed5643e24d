"""Regenerate the screenshots of docs/prepare.md (needs an X server: ``xvfb-run -a``).

xvfb-run -a .venv/bin/python docs/images/make_prepare_screenshots.py [--out DIR]

A real napari viewer with the Localize anomalies widget runs t1-brain on the raw T1 head with a
synthetic lesion twice, on the same coronal slice through the lesion, with the lesion's ground
truth as a yellow outline: first with "prepare scan: none" (prepare_before.png), then with
"auto" (prepare_after.png, the brain mask as a cyan outline). It then grabs the widget panel
with its fit line (prepare_panel.png). The PNGs are reduced to 256 colours to stay small.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
SCAN = "t1-head-lesion"
MODEL = "t1-brain"


def _settle(app, seconds: float = 0.4) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.02)


def _wait(app, busy) -> None:
    while busy():
        app.processEvents()
        time.sleep(0.02)
    _settle(app)


def _shrink_png(path: Path) -> None:
    """Rewrite ``path`` as a 256-colour PNG (the screenshots are mostly grey)."""
    from PIL import Image

    img = Image.open(path).convert("RGB")
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=HERE, help="folder of the PNGs (default: here)")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    import napari
    from napari.utils.colormaps import DirectLabelColormap
    from qtpy.QtWidgets import QApplication

    from napari_vaeloc.io import load_volume
    from napari_vaeloc.samples import sample_path

    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1640, 900)  # a square canvas
    viewer.open_sample("napari-vaeloc", SCAN)
    viewer.open_sample("napari-vaeloc", f"{SCAN}-truth")  # drawn as a yellow outline
    truth_layer = viewer.layers[f"{SCAN} truth"]
    truth_layer.colormap = DirectLabelColormap(color_dict={None: "transparent", 1: "yellow"})
    truth_layer.contour = 1
    _, widget = viewer.window.add_plugin_dock_widget("napari-vaeloc", "Localize anomalies")
    _wait(app, lambda: widget.guessing)  # the modality guess preselects t1-brain
    widget.image.value = viewer.layers[SCAN]
    widget.model.value = MODEL
    widget.device.value = "cpu"

    # one coronal slice for both pictures. The reader puts the head's LIA voxel axes in world
    # order (x, y, z: RAS+ mm) with the file's affine as the layer's transform, so everything
    # below is in the layer's axis order and the slider runs along world y (posterior to
    # anterior, layer axis 1); superior is up and the subject's left on the right
    scan = viewer.layers[SCAN]
    truth = np.asarray(truth_layer.data) > 0
    brain = np.transpose(
        load_volume(sample_path("t1-head-brain-mask")).data > 0, scan.metadata["voxel_axes"]
    )
    z = int(np.argmax(truth.sum(axis=(0, 2))))
    viewer.dims.order = (1, 2, 0)

    def show_slice(k: int) -> None:
        """Move the slider to voxel ``k`` of the scan's axis 1 (a world position in mm)."""
        viewer.dims.set_point(1, scan.data_to_world((0, k, 0))[1])

    def run(mode: str) -> None:
        widget.prepare.value = mode
        widget.run_button.clicked()
        _wait(app, lambda: widget.running)
        viewer.layers[f"{SCAN} anomaly mask"].opacity = 0.8
        viewer.layers.move(viewer.layers.index(truth_layer), len(viewer.layers))  # on top
        show_slice(z)
        viewer.reset_view()
        _settle(app)

    def shot(name: str) -> None:
        path = out / name
        viewer.screenshot(str(path), canvas_only=True, flash=False)
        _shrink_png(path)
        print(path, f"{path.stat().st_size / 1024:.0f} KB")

    run("none")
    print("none:", widget.fit_info.value)
    # among the slices that cut the lesion broadly (at least 2/3 of its largest cross-section),
    # the one where the unprepared mask lies most outside the brain
    wrong = (np.asarray(viewer.layers[f"{SCAN} anomaly mask"].data) > 0) & ~brain
    area = truth.sum(axis=(0, 2))
    broad = np.flatnonzero(area >= 2 * area.max() / 3)
    z = int(broad[np.argmax(wrong[:, broad].sum(axis=(0, 2)))])
    print(f"slice y = {z}: lesion {area[z]} voxels, mask outside the brain {wrong[:, z].sum()}")
    show_slice(z)
    _settle(app)
    shot("prepare_before.png")

    run("auto")
    print("auto:", widget.fit_info.value)
    outline = viewer.layers[f"{SCAN} brain mask"]
    outline.colormap = DirectLabelColormap(color_dict={None: "transparent", 1: "cyan"})
    outline.contour = 1
    outline.opacity = 0.9
    _settle(app)
    shot("prepare_after.png")

    path = out / "prepare_panel.png"
    widget.native.grab().save(str(path))
    _shrink_png(path)
    print(path, f"{path.stat().st_size / 1024:.0f} KB")
    viewer.close()


if __name__ == "__main__":
    main()
