"""Seconds and peak memory of each preparation stage, against scoring the same scan unprepared.

    python benchmarks/bench_prepare.py [--scan HEAD.nii.gz] [--model t1-brain] [--json OUT]

The scan defaults to the bundled 2 mm raw head (``t1-head``); for the 1 mm numbers in
docs/prepare.md pass the pycortex S1 head (``filestore/db/S1/anatomicals/raw.nii.gz`` in the
pycortex 1.4.0 sdist, see scripts/make_raw_head.py). The baseline, run first in the same process,
is ``localize(..., prepare="none")``: it prints each stage's seconds, the ratio of the whole
prepared run to the baseline, and the process's peak resident memory after each stage (Linux
``ru_maxrss``: a running maximum, so a stage's value includes everything before it).
"""

from __future__ import annotations

import argparse
import itertools
import resource
import sys
import time
from pathlib import Path

import torch


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    from napari_vaeloc.engine import EngineOptions, localize
    from napari_vaeloc.io import load_volume, write_json_atomic
    from napari_vaeloc.models.store import cached_model
    from napari_vaeloc.prepare import _CACHE
    from napari_vaeloc.samples import sample_path

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scan", default=None, help="a T1 head (default: the bundled 2 mm head)")
    p.add_argument("--model", default="t1-brain")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--json", default=None, help="also write the numbers as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    scan = load_volume(args.scan or sample_path("t1-head"))
    model = cached_model(args.model)
    print(f"scan {scan.shape} at {[round(s, 2) for s in scan.spacing]} mm, model {args.model}")

    localize(scan, model, EngineOptions(device="cpu"), prepare="none")  # warm-up (imports)
    t0 = time.perf_counter()
    localize(scan, model, EngineOptions(device="cpu"), prepare="none")
    baseline = time.perf_counter() - t0
    print(f"baseline (no preparation): {baseline:.1f} s, peak {peak_mib():.0f} MiB")

    marks: list[tuple[str, float, float]] = []

    def stage(name: str) -> None:
        marks.append((name, time.perf_counter(), peak_mib()))

    _CACHE.clear()
    t0 = time.perf_counter()
    res = localize(scan, model, EngineOptions(device="cpu", stage=stage), prepare="auto")
    total = time.perf_counter() - t0
    marks.append(("end", time.perf_counter(), peak_mib()))
    rows = []
    for (name, start, _), (_, end, peak) in itertools.pairwise(marks):
        rows.append({"stage": name, "seconds": end - start, "peak_mib": peak})
        print(f"  {name:<28}{end - start:7.1f} s   peak so far {peak:7.0f} MiB")
    prep = sum(
        r["seconds"]
        for r in rows
        if r["stage"] not in ("scoring slices", "mapping back to the scan")
    )
    print(f"preparation {prep:.1f} s; prepared run {total:.1f} s = {total / baseline:.1f} x the "
          f"unprepared run")  # fmt: skip
    for line in res.preparation.lines():
        print(f"  {line}")
    if args.json:
        write_json_atomic(
            {"scan": str(args.scan or "t1-head"), "shape": list(scan.shape),
             "baseline_s": baseline, "prepared_s": total, "preparation_s": prep,
             "stages": rows, "report": res.preparation.to_dict()},
            Path(args.json), overwrite=True,
        )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
