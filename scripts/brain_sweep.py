"""Train the paper's brain sweep (latent size, input size, likelihood log-std) and score every
model on the brain benchmark (held-out anatomy, seeded anomalies of every kind).

    python scripts/brain_sweep.py --out sweep --device cuda --steps 30000 --max-minutes 5

Each configuration trains in its own process (they share one GPU), with the bundled models'
recipe (lr 3e-4, batch 64, augmentation, validation every 500 steps, patience 10), then scores
its modality's benchmark (``brain_benchmark``) and writes ``NAME.csv``; the parent merges them
into ``sweep.csv`` and ``sweep.md``. ``--t2-source``/``--t1-source`` point at other copies of the
templates (a compressed copy, say).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from napari_vaeloc.mapnames import PIXEL_MAPS

#: name -> (modality, TrainConfig overrides); the paper's grid plus a 128x128 input
CONFIGS: dict[str, tuple[str, dict]] = {
    "t2-default": ("T2", {}),
    "t2-z64": ("T2", {"z_dim": 64}),
    "t2-z1024": ("T2", {"z_dim": 1024}),
    "t2-img32": ("T2", {"image_size": 32}),
    "t2-img128": ("T2", {"image_size": 128}),
    "t2-logstd-1.1": ("T2", {"likelihood_log_std": -1.1}),
    "t1-default": ("T1", {}),
    "t1-img128": ("T1", {"image_size": 128}),
    # the other two slicing axes: the companions t1-brain fuses with (vaeloc localize --fuse)
    "t1-coronal": ("T1", {"axis": "coronal"}),
    "t1-sagittal": ("T1", {"axis": "sagittal"}),
}
SWEEP = [n for n in CONFIGS if "coronal" not in n and "sagittal" not in n]  # the default run
TEMPLATE = {"T2": "icbm-t2", "T1": "icbm-t1"}
MAPS = tuple(m for m in PIXEL_MAPS if m != "sq_error")  # sq_error ranks like rec_error


def run_one(name: str, args: argparse.Namespace) -> None:
    import torch

    from napari_vaeloc.errors import InputError
    from napari_vaeloc.evaluation.brain_benchmark import benchmark_cases, test_anatomies
    from napari_vaeloc.evaluation.runner import evaluate_cases
    from napari_vaeloc.models.store import load_model
    from napari_vaeloc.training.builder import train_model
    from napari_vaeloc.training.loop import TrainConfig

    torch.set_num_threads(args.threads)
    modality, over = CONFIGS[name]
    cfg = TrainConfig(
        lr=3e-4,
        max_steps=args.steps,
        max_minutes=args.max_minutes,
        val_every=500,
        patience=10,
        **over,
    )
    source = getattr(args, f"{modality.lower()}_source") or TEMPLATE[modality]
    out = Path(args.out) / name
    t0 = time.perf_counter()
    folder, summary = train_model(
        [source], out, cfg, name=name, modality=modality, device=args.device, overwrite=True
    )
    train_s = time.perf_counter() - t0
    model = load_model(folder)
    summary.update(train_seconds=train_s)
    (Path(args.out) / f"{name}.json").write_text(json.dumps(summary, indent=1))
    bench_source = args.t2_bench_source if modality == "T2" else args.t1_bench_source
    try:
        anatomies = test_anatomies(modality, model.card, n=5, seed=args.seed, source=bench_source)
    except InputError as exc:
        print(f"{name}: no benchmark ({exc})", flush=True)
        return
    cases = benchmark_cases(anatomies, args.per_kind, seed=args.seed, healthy=5)
    report = evaluate_cases(model, cases, maps=MAPS, device=args.device)
    rows = [
        {"config": name, "steps": summary["steps"], "best_val": summary["best_val_loss"], **r}
        for r in report.pixel_rows
    ]
    with open(Path(args.out) / f"{name}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    summary.update(total_seconds=time.perf_counter() - t0)
    (Path(args.out) / f"{name}.json").write_text(json.dumps(summary, indent=1))
    print(f"{name}: {summary}", flush=True)


def merge(names: list[str], out: Path) -> None:
    rows = []
    for n in names:
        p = out / f"{n}.csv"
        if p.is_file():
            with open(p, newline="") as fh:
                rows += list(csv.DictReader(fh))
    if not rows:
        return
    with open(out / "sweep.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    maps = [*MAPS, "default"]
    lines = [
        "| config | steps | " + " | ".join(maps) + " |",
        "|---" * (len(maps) + 2) + "|",
    ]
    for n in names:
        sel = {
            r["map"]: r
            for r in rows
            if r["config"] == n and r["group"] == "all" and r["region"] == "foreground"
        }
        if not sel:
            continue
        steps = next(iter(sel.values()))["steps"]
        cells = [f"{float(sel[m]['auroc']):.3f}" if m in sel else "-" for m in maps]
        lines.append(f"| {n} | {steps} | " + " | ".join(cells) + " |")
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=16000)
    p.add_argument("--max-minutes", type=float, default=None)
    p.add_argument("--per-kind", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--only",
        default=",".join(SWEEP),
        help="comma-separated configurations (default: the sweep)",
    )
    p.add_argument("--t2-source", default=None)
    p.add_argument("--t1-source", default=None)
    p.add_argument("--t2-bench-source", default=None, help="T2 test anatomy (a template copy)")
    p.add_argument("--t1-bench-source", default=None, help="T1 test anatomy (a template copy)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    names = args.only.split(",")
    unknown = set(names) - set(CONFIGS)
    if unknown:
        sys.exit(f"unknown configurations {sorted(unknown)}; have {', '.join(CONFIGS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.child:
        run_one(names[0], args)
        return
    procs = []
    for n in names:
        argv = [
            f"--{k.replace('_', '-')}={v}"
            for k, v in vars(args).items()
            if k not in ("only", "child") and v is not None
        ]
        log = open(out / f"{n}.log", "w")
        child = subprocess.Popen(
            [sys.executable, __file__, *argv, f"--only={n}", "--child"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        procs.append((n, child))
    for n, pr in procs:
        rc = pr.wait()
        print(f"{n}: exit {rc}", flush=True)
    merge(names, out)


if __name__ == "__main__":
    main()
