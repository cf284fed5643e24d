"""Benchmark: the cost of drawing the mask's edge on the unsmoothed map (t1-brain's default).

Run from the repository root::

    .venv/bin/python benchmarks/bench_outline.py                 # the bundled raw T1 head
    .venv/bin/python benchmarks/bench_outline.py --scan HEAD.nii.gz --threads 2 --repeat 5

The scan is localized once with ``t1-brain`` (preparation, the three axes fused); then, on that
one result, the default mask is made under two outlines, alternating, ``--repeat`` times each:

- **smoothed**: each part outlined on the combined (6 mm) map at 0.4 of its peak (the card
  before this outline);
- **unsmoothed**: each part found on the combined map and outlined on the unsmoothed
  combination at 0.3 of its peak (the bundled card), which reads the unsmoothed values at the
  parts' voxels alone.

Reported (as ratios against the smoothed outline of the same run, never asserted): the first
mask of a fresh post-processor whose combined map is already made (the click's last step), and
a threshold move (the threshold slider's work once the parts are known), median of the repeats;
the masks' volumes; the peak traced Python memory of each (tracemalloc: numpy's arrays); the
machine's load meanwhile (``machine_load.py``).
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc

from machine_load import LoadMeter


def _timed(post, settings) -> tuple[float, float, float]:
    """(first mask, seconds; threshold move, seconds; peak traced MiB) for ``settings``."""
    post.combined(settings)
    tracemalloc.start()
    t0 = time.perf_counter()
    mask = post.mask(settings)
    first = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    moved = settings.replace(threshold=settings.threshold * 1.05)
    t0 = time.perf_counter()
    post.mask(moved)
    move = time.perf_counter() - t0
    post.mask(settings)
    del mask
    return first, move, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scan", default=None, help="a NIfTI scan (default: the bundled raw T1 head)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()

    import torch

    from napari_vaeloc.combine import CombineSettings, PostProcessor
    from napari_vaeloc.engine import EngineOptions, localize
    from napari_vaeloc.io import load_volume
    from napari_vaeloc.models.store import load_model
    from napari_vaeloc.samples import sample_path

    torch.set_num_threads(args.threads)
    scan = args.scan or sample_path("t1-head-lesion")
    model = load_model("t1-brain")
    vol = load_volume(scan)
    res = localize(vol, model, EngineOptions(device="cpu"), maps=("restoration",))
    unsmoothed = CombineSettings.from_card(model.card)
    smoothed = unsmoothed.replace(outline_smoothing_mm=None, outline_fraction=0.4)
    runs: dict[str, list[tuple[float, float, float]]] = {"smoothed": [], "unsmoothed": []}
    volumes = {}
    with LoadMeter() as load:
        for _ in range(args.repeat):
            for name, settings in (("smoothed", smoothed), ("unsmoothed", unsmoothed)):
                post = PostProcessor(res)
                runs[name].append(_timed(post, settings))
                volumes[name] = post.mask_volume_ml(post.mask(settings))
    print(f"scan {scan}: {'x'.join(map(str, vol.shape))}, {args.threads} threads; {load.text()}")
    base = {k: statistics.median(r[k] for r in runs["smoothed"]) for k in range(3)}
    for name, rows in runs.items():
        first, move, peak = (statistics.median(r[k] for r in rows) for k in range(3))
        print(
            f"{name:>10}: first mask {first * 1000:7.1f} ms ({first / base[0]:.2f}x), threshold "
            f"move {move * 1000:6.1f} ms ({move / base[1]:.2f}x), peak traced {peak:6.1f} MiB "
            f"({peak / max(base[2], 1e-9):.2f}x), mask {volumes[name]:.1f} ml"
        )


if __name__ == "__main__":
    main()
