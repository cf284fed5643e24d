"""What a screen (:mod:`napari_vaeloc.cohort`) shows of its rows: a thumbnail of each scan's
most anomalous slice, the ranking, the summary table (Parquet and CSV) and the HTML report.

A row is a dict with the keys :data:`COLUMNS` (docs/cohort.md says what each means); this
module only reads rows and writes files, through the project's atomic writer
(:mod:`napari_vaeloc.io`), so a reader sees the previous file or the new one, never a part.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .io import scan_stem, write_atomic, write_text_atomic

TABLE_PARQUET = "summary.parquet"
TABLE_CSV = "summary.csv"
REPORT_HTML = "report.html"

#: the summary table's columns, in order (see docs/cohort.md for what each means)
COLUMNS: tuple[str, ...] = (
    "rank",
    "scan",
    "model",
    "fit",
    "fit_checks",
    "volume_score",
    "worst_slice_score",
    "anomalous_ml",
    "components",
    "threshold",
    "status",
    "error",
    "seconds",
    "reused",
    "device",
    "output",
)
#: status of a row: outputs written (now or by an earlier run), failed, not a NIfTI file, or
#: not run yet (an interrupted run's table)
STATUSES = ("done", "failed", "skipped", "pending")
_FLOAT_COLUMNS = (
    "volume_score",
    "worst_slice_score",
    "anomalous_ml",
    "threshold",
    "seconds",
)
_TEXT_COLUMNS = ("scan", "model", "fit", "fit_checks", "status", "error", "device", "output")


# --------------------------------------------------------------------------------------------
# thumbnails
# --------------------------------------------------------------------------------------------


def thumbnail_name(scan: str | Path) -> str:
    """The file name of a scan's thumbnail in its folder: ``NAME_thumbnail.png``, NAME the
    scan's file name without .nii/.nii.gz."""
    return f"{scan_stem(scan)}_thumbnail.png"


def most_anomalous_slice(mask: np.ndarray, combined: np.ndarray, affine: np.ndarray) -> int:
    """Index of the axial slice (in the scan reoriented to RAS+) with the most mask voxels, or,
    for an empty mask, with the highest combined-map value."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    m = nib.orientations.apply_orientation(np.asarray(mask) > 0, ornt)
    per_slice = m.reshape(-1, m.shape[2]).sum(axis=0)
    if per_slice.max() > 0:
        return int(per_slice.argmax())
    c = nib.orientations.apply_orientation(np.asarray(combined, dtype=np.float32), ornt)
    return int(c.reshape(-1, c.shape[2]).max(axis=0).argmax())


def slice_height_mm(affine: np.ndarray, shape: tuple[int, ...], k: int) -> float:
    """The world z (mm, the scan's RAS+ frame) at the centre of axial slice ``k`` of a scan of
    ``shape`` (X, Y, Z) with ``affine``, its voxels reordered to RAS as the thumbnail shows
    them: the height a viewer gives that slice, whatever the order the file stores it in."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    to_voxel = nib.orientations.inv_ornt_aff(ornt, shape[:3])
    ras_shape = np.empty(3)
    ras_shape[ornt[:, 0].astype(int)] = shape[:3]  # input axis i becomes axis ornt[i, 0]
    centre = [(ras_shape[0] - 1) / 2, (ras_shape[1] - 1) / 2, k, 1.0]
    return float((np.asarray(affine, dtype=float) @ to_voxel @ centre)[2])


def write_thumbnail(
    data: np.ndarray,
    affine: np.ndarray,
    combined: np.ndarray,
    mask: np.ndarray,
    path: Path,
    title: str = "",
    size_in: float = 2.6,
) -> Path:
    """A PNG of the scan's most anomalous axial slice (:func:`most_anomalous_slice`; anterior
    up, the patient's right on the right) with the mask in red, ``size_in`` inches at 80 dpi
    (matplotlib's Agg canvas; no GUI). Arrays: (X, Y, Z) on the scan's grid.

    Raises:
        OutputError: the file cannot be written.
    """
    import nibabel as nib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ornt = nib.orientations.io_orientation(affine)
    k = most_anomalous_slice(mask, combined, affine)
    image = nib.orientations.apply_orientation(np.asarray(data, dtype=np.float32), ornt)[:, :, k]
    m = nib.orientations.apply_orientation(np.asarray(mask) > 0, ornt)[:, :, k]
    zooms = np.empty(3)
    zooms[ornt[:, 0].astype(int)] = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    lo, hi = np.percentile(image, [1, 99.5]) if image.size else (0.0, 1.0)
    fig = Figure(figsize=(size_in, size_in), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 0.88 if title else 1))
    aspect = float(zooms[1] / zooms[0]) if zooms[0] > 0 else 1.0
    ax.imshow(
        image.T,
        cmap="gray",
        origin="lower",
        vmin=lo,
        vmax=max(hi, lo + 1e-6),
        aspect=aspect,
        interpolation="nearest",
    )
    if m.any():
        overlay = np.zeros((*m.T.shape, 4), np.float32)
        overlay[m.T] = (1.0, 0.0, 0.0, 0.55)  # the mask in red, the scan showing through
        ax.imshow(overlay, origin="lower", aspect=aspect, interpolation="nearest")
    ax.set_axis_off()
    if title:
        z_mm = slice_height_mm(affine, np.shape(data), k)
        fig.text(0.5, 0.94, f"{title[:28]} z = {z_mm:.0f} mm", ha="center", va="center", fontsize=7)

    def save(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=80)

    return write_atomic(path, save, overwrite=True)


# --------------------------------------------------------------------------------------------
# the ranking, the table and the report
# --------------------------------------------------------------------------------------------


def rank_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows in report order: done scans, most anomalous first (largest anomalous volume, then
    highest worst-slice score), ranked 1..n; then failed, pending and skipped ones (no rank)."""

    def num(v: Any) -> float:
        try:
            f = float(v)
        except (TypeError, ValueError):
            return -math.inf
        return f if math.isfinite(f) else -math.inf

    done = [r for r in rows if r.get("status") == "done"]
    rest = [r for r in rows if r.get("status") != "done"]
    done.sort(
        key=lambda r: (
            -num(r.get("anomalous_ml")),
            -num(r.get("worst_slice_score")),
            str(r.get("scan")),
        )
    )
    order = {s: i for i, s in enumerate(STATUSES)}
    rest.sort(key=lambda r: (order.get(str(r.get("status")), 9), str(r.get("scan"))))
    out = []
    for i, r in enumerate(done, start=1):
        out.append({**r, "rank": i})
    out.extend({**r, "rank": None} for r in rest)
    return out


def table_frame(rows: Iterable[dict[str, Any]]) -> Any:
    """The ranked rows as a pandas DataFrame with :data:`COLUMNS` and fixed types (nullable
    integers for rank and components, floats, strings, a boolean ``reused``)."""
    import pandas as pd

    ranked = rank_rows(rows)
    df = pd.DataFrame([{k: r.get(k) for k in COLUMNS} for r in ranked], columns=list(COLUMNS))
    for col in ("rank", "components"):
        df[col] = pd.array(
            [
                None if v is None or (isinstance(v, float) and math.isnan(v)) else int(v)
                for v in df[col]
            ],
            dtype="Int64",
        )
    for col in _FLOAT_COLUMNS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    df["reused"] = df["reused"].fillna(False).astype(bool)
    for col in _TEXT_COLUMNS:
        df[col] = df[col].map(_text).astype(str)
    return df


def _text(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return str(v)


def write_table(rows: Iterable[dict[str, Any]], out: Path) -> tuple[Path, Path]:
    """Write the summary table as Parquet and CSV into ``out``, each atomically (a reader
    sees the previous table or the new one, never a part). Returns (parquet, csv).

    Raises:
        OutputError: a file cannot be written.
    """
    df = table_frame(rows)
    pq = write_atomic(
        out / TABLE_PARQUET, lambda tmp: df.to_parquet(tmp, index=False), overwrite=True
    )
    text = df.to_csv(index=False)
    return pq, write_text_atomic(text, out / TABLE_CSV, overwrite=True)


def write_report(rows: Iterable[dict[str, Any]], out: Path, top: int = 25) -> Path:
    """Write ``out/report.html``: counts, the ``top`` most anomalous scans with their
    thumbnails (links into ``scans/``), then every failed scan with its reason.

    Raises:
        OutputError: the file cannot be written.
    """
    ranked = rank_rows(rows)
    counts = {s: sum(r.get("status") == s for r in ranked) for s in STATUSES}
    reused = sum(bool(r.get("reused")) for r in ranked if r.get("status") == "done")
    esc = html.escape

    def cell(v: Any, fmt: str = "{}") -> str:
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return ""
        return esc(fmt.format(v))

    head = (
        "<tr><th>rank</th><th>slice</th><th>scan</th><th>model</th><th>anomalous ml</th>"
        "<th>parts</th><th>worst-slice score</th><th>volume score</th><th>fit</th></tr>"
    )
    lines = []
    for r in [r for r in ranked if r.get("status") == "done"][:top]:
        thumb = _thumbnail_of(out, r)
        img = f'<img src="{esc(thumb)}" alt="most anomalous slice">' if thumb else ""
        lines.append(
            f"<tr><td>{cell(r.get('rank'))}</td><td>{img}</td>"
            f'<td><a href="{esc(str(r.get("output") or ""))}/">{esc(Path(str(r["scan"])).name)}'
            f"</a><br><small>{esc(str(r['scan']))}</small></td>"
            f"<td>{cell(r.get('model'))}</td><td>{cell(r.get('anomalous_ml'), '{:.1f}')}</td>"
            f"<td>{cell(r.get('components'))}</td>"
            f"<td>{cell(r.get('worst_slice_score'), '{:.1f}')}</td>"
            f"<td>{cell(r.get('volume_score'), '{:.1f}')}</td>"
            f'<td title="{esc(str(r.get("fit_checks") or ""))}">{cell(r.get("fit"))}</td></tr>'
        )
    failed = [
        f"<tr><td>{esc(str(r['scan']))}</td><td>{esc(str(r.get('error') or ''))}</td></tr>"
        for r in ranked
        if r.get("status") in ("failed", "pending", "skipped")
    ]
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    body = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>vaeloc screen</title>',
        "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
        "img{display:block}</style></head><body>",
        "<h1>Anomaly screen</h1>",
        f"<p>{esc(summary)} ({reused} taken from an earlier run); napari-vaeloc "
        f"{esc(__version__)}. Ranked by anomalous volume (ml) above each model's own "
        "calibrated threshold, comparable across models, then by the worst slice's score; the "
        "scores are on each model's own scale, not comparable across models. Full table: "
        f'<a href="{TABLE_CSV}">{TABLE_CSV}</a>, <a href="{TABLE_PARQUET}">{TABLE_PARQUET}</a>.'
        "</p>",
        f"<h2>The {min(top, counts['done'])} most anomalous scans</h2>",
        f"<table>{head}{''.join(lines)}</table>",
    ]
    if failed:
        body += [
            "<h2>Not screened</h2>",
            f"<table><tr><th>scan</th><th>reason</th></tr>{''.join(failed)}</table>",
        ]
    body.append("</body></html>\n")
    return write_text_atomic("\n".join(body), out / REPORT_HTML, overwrite=True)


def _thumbnail_of(out: Path, row: dict[str, Any]) -> str | None:
    rel = f"{row.get('output')}/{thumbnail_name(str(row.get('scan')))}"
    return rel if (out / rel).is_file() else None
