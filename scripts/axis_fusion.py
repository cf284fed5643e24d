"""Fuse the reconstruction error of three orthogonal slicing axes into one 3D map, and compare it
with the axial model alone on tuning cases of the T1 brain benchmark.

    python scripts/axis_fusion.py --coronal MODEL_DIR --sagittal MODEL_DIR [--cases 10] [--seed 1]

The axial model is the bundled ``t1-brain``; the other two are conv VAEs trained the same way on
coronal and sagittal slices of the same template (``scripts/brain_sweep.py --only
t1-coronal,t1-sagittal``). Each model's ``rec_error_smooth`` is divided by its own calibrated
scale, the three are averaged, and the default post-processing of ``t1-brain`` (3D smoothing,
per-scan normalisation) follows. T1 only: for T2 the coronal and sagittal slices of the one
template cross the axial slabs the benchmark holds out.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np

from napari_vaeloc.combine import CombineSettings, combine, threshold_mask
from napari_vaeloc.engine import localize
from napari_vaeloc.evaluation.brain_benchmark import benchmark_cases, test_anatomies
from napari_vaeloc.evaluation.metrics import Overlap, PixelAccumulator
from napari_vaeloc.models.store import load_model

MAP = "rec_error_smooth"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--coronal", required=True)
    p.add_argument("--sagittal", required=True)
    p.add_argument("--cases", type=int, default=10, help="cases per anomaly kind")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    axial = load_model("t1-brain")
    models = [axial, load_model(args.coronal), load_model(args.sagittal)]
    settings = CombineSettings.from_card(axial.card)
    variants = {"axial": models[:1], "three axes": models}
    acc = {v: PixelAccumulator() for v in variants}
    overlap = {v: Overlap() for v in variants}
    anatomies = test_anatomies("T1", axial.card, n=5, seed=args.seed)
    for case in benchmark_cases(anatomies, args.cases, seed=args.seed, healthy=5):
        scaled, fg = [], None
        for m in models:
            res = localize(case.volume, m, maps=(MAP,), axis=m.card.axis, fuse=False)
            scaled.append(res.maps[MAP] / np.float32(m.card.calibration["scales"][MAP]))
            fg = res.foreground if fg is None else fg
        truth = case.truth.astype(bool)
        region = fg | truth
        for name, used in variants.items():
            mean = np.mean(scaled[: len(used)], axis=0)
            s = dataclasses.replace(settings, weights={MAP: 1.0})
            c = combine(
                {MAP: mean}, s.weights, {MAP: 1.0}, fg, s.smoothing_mm, case.volume.spacing,
                s.scan_normalise,
            )  # fmt: skip
            acc[name].add(c, truth, region)
            mask = threshold_mask(c, s.threshold, s.min_size_mm3, case.volume.spacing)
            overlap[name].add(mask.astype(bool), truth, region)
    print("| maps | pixel AUROC | AP | best Dice | Dice at the axial default threshold |")
    print("|---|---|---|---|---|")
    for name in variants:
        m, dice = acc[name].metrics(), overlap[name].dice
        print(f"| {name} | {m.auroc:.3f} | {m.ap:.3f} | {m.best_dice:.3f} | {dice:.3f} |")


if __name__ == "__main__":
    main()
