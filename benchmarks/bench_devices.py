"""Benchmark: the engine and training on each accelerator against the CPU, in one process.

Run from the repository root::

    .venv/bin/python benchmarks/bench_devices.py                # every device torch sees
    .venv/bin/python benchmarks/bench_devices.py --json out.json

Volume: the bundled T2 lesion sample upsampled to 1 mm (about 193x229x193); model: the bundled
``t2-brain``. For each device other than the CPU it prints (ratios against the CPU run of this
process, never asserted):

- localize wall time (best of ``--repeat`` after a warm-up), with the device's default precision
  (bfloat16 autocast on CUDA) and in float32;
- agreement of every map with the CPU's: maximum difference relative to the map's maximum, and
  the correlation; the Dice between the default masks;
- training throughput of :func:`napari_vaeloc.training.loop.fit` (augmentation included) in steps
  per second.

``--repeat 1 --train-steps 20`` is a quick smoke run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from napari_vaeloc.combine import PostProcessor
from napari_vaeloc.engine import EngineOptions, LocalizationResult, available_devices, localize
from napari_vaeloc.io import Volume, load_volume, write_json_atomic
from napari_vaeloc.mapnames import DEFAULT_MAPS
from napari_vaeloc.models.store import cached_model
from napari_vaeloc.samples import sample_path


def upsampled_sample() -> Volume:
    from scipy.ndimage import zoom

    vol = load_volume(sample_path("t2-lesion"))
    data = zoom(vol.data, 2.0, order=1).astype(np.float32)
    affine = vol.affine.copy()
    affine[:3, :3] /= 2.0
    return Volume.from_array(data, affine)


def timed_localize(volume, model, device: str, amp: bool | None, repeat: int):
    options = EngineOptions(device=device, amp=amp)
    localize(volume, model, options, prepare=None)  # warm-up (kernels, allocator)
    best, res = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        res = localize(volume, model, options, prepare=None)
        best = min(best, time.perf_counter() - t0)
    return best, res


def agreement(a: LocalizationResult, b: LocalizationResult) -> dict:
    out = {}
    for k in DEFAULT_MAPS:
        x, y = a.maps[k], b.maps[k]
        scale = float(np.abs(x).max()) or 1.0
        out[k] = {
            "max_rel_diff": float(np.abs(x - y).max()) / scale,
            "corr": float(np.corrcoef(x.ravel(), y.ravel())[0, 1]),
        }
    ma = PostProcessor(a).mask().astype(bool)  # the model's default combination
    mb = PostProcessor(b).mask().astype(bool)
    out["default_mask_dice"] = float(2 * (ma & mb).sum() / max(ma.sum() + mb.sum(), 1))
    return out


def training_rate(device: str, steps: int) -> float:
    from napari_vaeloc.models.vae import ConvVAE
    from napari_vaeloc.training.augment import AugmentConfig, Augmenter
    from napari_vaeloc.training.loop import TrainConfig, fit

    gen = torch.Generator().manual_seed(0)
    images = torch.rand((256, 1, 64, 64), generator=gen) * 3 - 1.5
    cfg = TrainConfig(max_steps=steps, val_every=10 * steps, lr=3e-4)
    net = ConvVAE()
    fit(net, images, images[:8], TrainConfig(max_steps=3), augment=Augmenter(AugmentConfig()),
        device=device)  # fmt: skip
    t0 = time.perf_counter()
    fit(net, images, images[:8], cfg, augment=Augmenter(AugmentConfig()), device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3, help="timed localizations (best counts)")
    p.add_argument("--train-steps", type=int, default=200, help="training steps per accelerator")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args()
    volume = upsampled_sample()
    model = cached_model("t2-brain")
    devices = available_devices()
    print(f"volume {volume.shape}, devices {devices}, torch {torch.__version__}")
    cpu_s, cpu_res = timed_localize(volume, model, "cpu", None, args.repeat)
    cpu_train = training_rate("cpu", max(20, args.train_steps // 10))
    print(f"cpu: localize {cpu_s:.2f} s, training {cpu_train:.1f} steps/s")
    report: dict = {"cpu": {"localize_s": cpu_s, "train_steps_per_s": cpu_train}}
    for dev in (d for d in devices if d != "cpu"):
        entry = {}
        for label, amp in (("default precision", None), ("float32", False)):
            s, res = timed_localize(volume, model, dev, amp, args.repeat)
            agree = agreement(cpu_res, res)
            worst = max(v["max_rel_diff"] for k, v in agree.items() if k in DEFAULT_MAPS)
            print(
                f"{dev} ({label}): localize {s:.3f} s = {cpu_s / s:.1f}x the CPU; worst map "
                f"difference {worst:.2e} of the map's max; default-mask Dice vs CPU "
                f"{agree['default_mask_dice']:.4f}"
            )
            entry[label] = {"localize_s": s, "speedup": cpu_s / s, "agreement": agree}
        rate = training_rate(dev, args.train_steps)
        print(f"{dev}: training {rate:.1f} steps/s = {rate / cpu_train:.1f}x the CPU")
        entry["train_steps_per_s"] = rate
        report[dev] = entry
    if args.json:
        write_json_atomic(report, args.json, overwrite=True)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
