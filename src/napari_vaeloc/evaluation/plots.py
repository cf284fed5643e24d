"""PNG figures of an evaluation: pooled ROC and precision-recall curves, example slices.

Figures are drawn on matplotlib's Agg canvas without pyplot (no global state, no GUI), and
written atomically: a temporary file in the target folder, then moved into place.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .metrics import PixelAccumulator
    from .runner import EvaluationReport, ExampleSlice

DPI = 100
#: size of one example panel, inches
PANEL_INCH = 1.8
CURVE_SIZE = (5.5, 5.0)


def _figure(size: tuple[float, float]) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``fig`` as PNG whole or not at all, refusing to replace a file unless
    ``overwrite``."""
    from ..io import write_atomic

    return write_atomic(
        Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=DPI), overwrite, ".png"
    )


def plot_curves(
    curves: Mapping[str, PixelAccumulator],
    path: str | os.PathLike,
    kind: str = "roc",
    *,
    title: str = "",
    overwrite: bool = False,
) -> Path:
    """One PNG with the pooled ROC (``kind="roc"``) or precision-recall (``"pr"``) curve of
    each map (legend: AUROC or AP); maps without both classes are listed as undefined."""
    if kind not in ("roc", "pr"):
        raise ValueError(f"kind must be 'roc' or 'pr', not {kind!r}")
    fig = _figure(CURVE_SIZE)
    ax = fig.add_subplot()
    prevalence = None
    for name, acc in curves.items():
        m = acc.metrics()
        if m.reason:
            ax.plot([], [], " ", label=f"{name}: undefined ({m.reason})")
            continue
        if kind == "roc":
            x, y = acc.roc_curve()
            label = f"{name} (AUROC {m.auroc:.3f})"
        else:
            x, y = acc.pr_curve()
            label = f"{name} (AP {m.ap:.3f})"
            prevalence = m.positives / (m.positives + m.negatives)
        ax.plot(x, y, lw=1.4, label=label, drawstyle="default" if kind == "roc" else "steps-post")
    if kind == "roc":
        ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.6", label="chance")
        ax.set(xlabel="false-positive rate", ylabel="true-positive rate")
    else:
        if prevalence is not None:
            ax.axhline(prevalence, ls="--", lw=0.8, color="0.6", label="chance (prevalence)")
        ax.set(xlabel="recall", ylabel="precision")
    ax.set(xlim=(0, 1), ylim=(0, 1.01))
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right" if kind == "roc" else "upper right", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path, overwrite)


def plot_examples(
    examples: Sequence[ExampleSlice],
    path: str | os.PathLike,
    *,
    thresholds: Mapping[str, float] | None = None,
    overwrite: bool = False,
) -> Path:
    """One PNG: a row per example, columns image, ground-truth outline, then each map with one
    colour scale per map (1st to 99.5th percentile over the shown slices, in the title: "colours
    LO to HI"). A map
    with a threshold (``thresholds``: map name -> threshold, e.g. the default combination's)
    is shown up to at least its threshold, with the threshold's contour in cyan, so that a
    slice below it does not look hot. Each row's case and slice are written on its image."""
    if not examples:
        raise ValueError("no example slices to plot")
    names = list(examples[0].maps)
    limits = {k: float(v) for k, v in (thresholds or {}).items() if k in names and v == v}
    rows, cols = len(examples), 2 + len(names)
    fig = _figure((cols * PANEL_INCH, rows * PANEL_INCH))
    axes = fig.subplots(rows, cols, squeeze=False)
    scale = {}
    for k in names:
        lo = min(float(np.percentile(e.maps[k], 1)) for e in examples)
        hi = max(float(np.percentile(e.maps[k], 99.5)) for e in examples)
        hi = max(hi, limits.get(k, hi))
        scale[k] = (lo, hi if hi > lo else lo + 1.0)
    for r, e in enumerate(examples):
        aspect = e.spacing[1] / e.spacing[0]
        shown = dict(origin="lower", aspect=aspect, interpolation="nearest")
        axes[r, 0].imshow(e.image.T, cmap="gray", **shown)
        axes[r, 1].imshow(e.image.T, cmap="gray", **shown)
        if e.truth.any():
            axes[r, 1].contour(e.truth.T.astype(np.float32), levels=[0.5], colors="red")
        for c, k in enumerate(names, start=2):
            lo, hi = scale[k]
            axes[r, c].imshow(e.maps[k].T, cmap="inferno", vmin=lo, vmax=hi, **shown)
            if k in limits and (e.maps[k] > limits[k]).any():
                axes[r, c].contour(e.maps[k].T, levels=[limits[k]], colors="cyan")
        where = f"{e.plane} slice {e.index}" if e.plane else f"slice {e.index}"
        axes[r, 0].text(
            0.02, 0.98, f"{e.name}\n{where}", transform=axes[r, 0].transAxes, va="top",
            ha="left", fontsize=6, color="white", clip_on=True,
            bbox={"facecolor": "black", "alpha": 0.6, "pad": 1, "edgecolor": "none"},
        )  # fmt: skip
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    titles = ["image", "ground truth"]
    for k in names:
        t = f"{k}\ncolours {scale[k][0]:.3g} to {scale[k][1]:.3g}"
        titles.append(t + (f"; threshold {limits[k]:.3g}" if k in limits else ""))
    for ax, t in zip(axes[0], titles, strict=True):
        ax.set_title(t, fontsize=7)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.35 / (rows * PANEL_INCH))
    return save_figure(fig, path, overwrite)


def plot_paths(out_dir: str | os.PathLike, stem: str, examples: bool = True) -> dict[str, Path]:
    """The PNGs :func:`write_plots` writes: STEM_roc.png, STEM_pr.png, STEM_examples.png."""
    out = Path(out_dir)
    kinds = ("roc", "pr", "examples") if examples else ("roc", "pr")
    return {k: out / f"{stem}_{k}.png" for k in kinds}


def write_plots(
    report: EvaluationReport,
    out_dir: str | os.PathLike,
    stem: str,
    *,
    title: str = "",
    overwrite: bool = False,
) -> dict[str, Path]:
    """ROC and PR curves of every map (group "all", foreground region) and, when the report
    has examples, the example panel."""
    paths = plot_paths(out_dir, stem, bool(report.examples))
    curves = report.curves()
    where = "pooled voxels inside the foreground"
    head = f"{title}: {where}" if title else where
    plot_curves(curves, paths["roc"], "roc", title=head, overwrite=overwrite)
    plot_curves(curves, paths["pr"], "pr", title=head, overwrite=overwrite)
    if report.examples:
        thresholds = {
            r["map"]: r["threshold"] for r in report.pixel_rows if r["threshold"] == r["threshold"]
        }
        plot_examples(
            report.examples, paths["examples"], thresholds=thresholds, overwrite=overwrite
        )
    return paths
