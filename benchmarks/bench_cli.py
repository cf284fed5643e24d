"""Benchmark: `vaeloc localize` on a very large scan, end to end (read, score, combine, write).

Run from the repository root::

    .venv/bin/python benchmarks/bench_cli.py                # 600x600x400, several minutes
    .venv/bin/python benchmarks/bench_cli.py --shape 300 300 200 --json cli.json

The scan is the bundled model's ICBM 2009c T2 template upsampled trilinearly to ``--shape``
over the same field of view (the volume of ``bench_engine.py --large``), written once as a
float32 ``.nii.gz``. Each variant runs ``vaeloc localize --prepare none --device cpu`` in a
fresh child process (``python -m napari_vaeloc.cli``), one after the other:

- ``default``: every map the model computes by default, float32;
- ``needed``: ``--maps restoration`` (the bundled T2 model's default combination uses it alone);
- ``needed, float16``: the same with ``--map-dtype float16``;
- ``default, float16``: every default map, float16.

Printed for each: wall time, the child's peak RSS and its increase over a *baseline* child that
imports the command line and loads the same scan (``napari_vaeloc.io.load_volume``) and
nothing else, the size of what it wrote, and the ratio of each time and memory increase to
the ``default`` variant's, measured in this run. The machine's load comes with every row
(``machine_load.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine_load import LoadMeter, cpu_name

VARIANTS = {
    "default": [],
    "needed": ["--maps", "restoration"],
    "needed, float16": ["--maps", "restoration", "--map-dtype", "float16"],
    "default, float16": ["--map-dtype", "float16"],
}
BASELINE = (
    "import resource, sys\n"
    "import napari_vaeloc.cli\n"
    "from napari_vaeloc.io import load_volume\n"
    "v = load_volume(sys.argv[1])\n"
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
)


def write_scan(shape: tuple[int, int, int], path: Path) -> None:
    """The template upsampled to ``shape`` (same field of view), as float32 NIfTI."""
    import nibabel as nib
    import numpy as np
    import torch
    import torch.nn.functional as F

    from napari_vaeloc.io import load_volume
    from napari_vaeloc.samples import template

    base = load_volume(template("icbm-t2").path)
    t = torch.from_numpy(np.ascontiguousarray(base.data))[None, None]
    big = F.interpolate(t, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()
    affine = np.array(base.affine, dtype=np.float64)
    affine[:3, :3] *= (np.array(base.shape) / np.array(shape))[None, :]
    nib.save(nib.Nifti1Image(big, affine), path)


def run_child(args: list[str], threads: int) -> tuple[float, float, str]:
    """Run ``python args`` in a fresh process; (seconds, its peak RSS MiB, its output)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    # wait4 gives this child's own peak, not the largest of all children so far
    proc = subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    out = proc.stdout.read().decode() if proc.stdout else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child failed: {' '.join(args)}\n{out}")
    kib = usage.ru_maxrss
    return seconds, (kib / 1024 if sys.platform != "darwin" else kib / 2**20), out


def folder_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir()) / 2**20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=int, nargs=3, default=(600, 600, 400), help="voxels")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads (default 2)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = tuple(args.shape)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} CPUs; {args.threads} threads; shape {shape}")
    work = Path(tempfile.mkdtemp(prefix="vaeloc-bench-cli-"))
    rows: dict[str, dict] = {}
    try:
        scan = work / "large.nii.gz"
        t0 = time.perf_counter()
        write_scan(shape, scan)  # type: ignore[arg-type]
        size = scan.stat().st_size / 2**20
        print(f"scan written in {time.perf_counter() - t0:.0f} s ({size:.0f} MiB)")
        _, base_rss, _ = run_child(["-c", BASELINE, str(scan)], args.threads)
        print(f"baseline (imports + loaded scan): peak RSS {base_rss:.0f} MiB")
        for name in args.variants:
            out = work / name.replace(", ", "-")
            cmd = ["-m", "napari_vaeloc.cli", "localize", str(scan), "--model", "t2-brain",
                   "--prepare", "none", "--device", "cpu", "--out", str(out), "--quiet",
                   *VARIANTS[name]]  # fmt: skip
            with LoadMeter() as load:
                seconds, rss, _ = run_child(cmd, args.threads)
            rows[name] = {
                "seconds": seconds, "peak_rss_mib": rss, "increase_mib": rss - base_rss,
                "written_mib": folder_mib(out), "load": load.as_dict(),
            }  # fmt: skip
            shutil.rmtree(out)
            print(f"  {name}: {seconds:.1f} s, peak {rss:.0f} MiB (+{rss - base_rss:.0f}), "
                  f"wrote {rows[name]['written_mib']:.0f} MiB; {load.text()}")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ref = rows.get("default")
    print(f"\n== vaeloc localize, {shape[0]}x{shape[1]}x{shape[2]} (synthetic), t2-brain, cpu ==")
    print(
        "variant              time s   peak RSS MiB   increase MiB   written MiB   "
        "time / default   increase / default"
    )
    for name, r in rows.items():
        ratio_t = f"{r['seconds'] / ref['seconds']:.2f}x" if ref else "-"
        ratio_m = f"{r['increase_mib'] / ref['increase_mib']:.2f}x" if ref else "-"
        print(f"{name:<20} {r['seconds']:7.1f} {r['peak_rss_mib']:14.0f} {r['increase_mib']:14.0f} "
              f"{r['written_mib']:13.0f} {ratio_t:>16} {ratio_m:>20}")  # fmt: skip
    print(f"baseline peak RSS (imports + loaded scan): {base_rss:.0f} MiB")
    if args.json is not None:
        args.json.write_text(json.dumps({"shape": shape, "baseline_mib": base_rss, "rows": rows},
                                        indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
