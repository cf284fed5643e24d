"""Screening a cohort on Dask: one task per scan through the same pipeline as ``vaeloc
localize``, resumable after any interruption; the table and the report are
:mod:`napari_vaeloc.cohort_report`'s.

A thin front over the core (it never imports napari, Qt or the command line): every scan goes
through :func:`napari_vaeloc.pipeline.localize_scan`, the very function ``vaeloc localize``
runs, on a Dask worker, which writes the scan's maps, mask and scores into its own folder
``OUT/scans/NAME/`` (so ``OUT`` must be a folder every worker can write: the local disk for a
local cluster, a shared file system on a cluster), then a thumbnail of its most anomalous
slice, then, last, a *done-record* (``screen-record.json``) that says with which model and
settings the outputs were made and from which input file. A rerun skips a scan whose record
matches (:func:`plan`), so an interrupted run loses nothing that was finished.

Layout of ``OUT``::

    screen.json                 marks the folder as a screen's (settings, package version)
    summary.parquet, .csv       one row per scan, most anomalous first (cohort_report.COLUMNS)
    report.html                 the top scans with their thumbnails, and the failures
    scans/NAME/                 NAME_<map>.nii.gz ..., NAME_mask.nii.gz, NAME_scores.json,
                                NAME_thumbnail.png, screen-record.json

Every file goes through the project's atomic writer (:mod:`napari_vaeloc.io`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .cohort_report import (
    COLUMNS,
    rank_rows,
    thumbnail_name,
    write_report,
    write_table,
    write_thumbnail,
)
from .errors import InputError, MisfitError, OutputError, VaelocError, one_line, os_reason
from .io import is_nifti_path, scan_stem, write_json_atomic
from .pipeline import AUTO_MODEL, ScanSettings, localize_scan

#: the file that marks a folder as a screen's output folder
MANIFEST = "screen.json"
#: a scan's done-record, written last into its folder
RECORD = "screen-record.json"
#: the per-scan folders' parent inside the output folder
SCANS_DIR = "scans"
#: version of the done-record's layout; a record of another version is redone
RECORD_VERSION = 1
#: why a file that an input folder or CSV holds is not screened
_NOT_NIFTI = "not a NIfTI file (.nii or .nii.gz)"


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScanJob:
    """One scan to screen.

    Attributes:
        path: the NIfTI file, absolute.
        name: its folder's name under ``OUT/scans`` (unique in the run).
        model: the model its CSV row names (None: the run's ``--model``).
    """

    path: Path
    name: str
    model: str | None = None


@dataclass(frozen=True)
class Skipped:
    """A file an input folder or CSV held that is not a NIfTI scan, and why it was left out."""

    path: Path
    reason: str


def find_scans(
    inputs: Sequence[str | os.PathLike], exclude: str | os.PathLike | None = None
) -> tuple[list[ScanJob], list[Skipped]]:
    """The scans that ``inputs`` name: NIfTI files; folders, searched recursively (files and
    folders whose names start with "." are passed over; any other file that is not NIfTI is
    listed as skipped); and CSV files of scan paths (:func:`read_scan_list`). A scan named
    twice is screened once. ``exclude``: a folder never searched (the output folder, when it
    lies inside an input folder).

    Each scan's folder name is its file name without .nii/.nii.gz; for a scan found in a
    folder, its path below that folder with "__" between the parts; names that would still
    collide get a short hash of the scan's path.

    Returns:
        (scans in input order, skipped files).

    Raises:
        InputError: an input does not exist, a CSV file is malformed, or an input folder is
            ``exclude`` or lies inside it; one line naming it.
    """
    found: list[tuple[Path, str, str | None]] = []  # path, base name, model
    skipped: list[Skipped] = []
    skip_root = Path(exclude).resolve() if exclude is not None else None
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise InputError(f"no such file or folder: {p}")
        if p.is_dir():
            root = p.resolve()
            if skip_root is not None and (root == skip_root or root.is_relative_to(skip_root)):
                raise InputError(_overlap_message(p, Path(exclude or ""), root == skip_root))
            for f in _walk(root, skip_root):
                if is_nifti_path(f):
                    rel = f.relative_to(root)
                    found.append((f, "__".join([*rel.parts[:-1], scan_stem(f)]), None))
                else:
                    skipped.append(Skipped(f, _NOT_NIFTI))
        elif p.suffix.lower() == ".csv":
            for f, model in read_scan_list(p):
                if is_nifti_path(f):
                    found.append((f, scan_stem(f), model))
                else:
                    skipped.append(Skipped(f, _NOT_NIFTI))
        elif is_nifti_path(p):
            found.append((p.resolve(), scan_stem(p), None))
        else:
            skipped.append(Skipped(p.resolve(), _NOT_NIFTI))
    seen: dict[Path, int] = {}
    unique: list[tuple[Path, str, str | None]] = []
    for f, name, model in found:
        if f not in seen:
            seen[f] = len(unique)
            unique.append((f, name, model))
    counts: dict[str, int] = {}
    for _, name, _ in unique:
        counts[name] = counts.get(name, 0) + 1
    jobs = []
    for f, name, model in unique:
        if counts[name] > 1 or not name or name.startswith("."):
            name = f"{name or 'scan'}-{hashlib.sha1(str(f).encode()).hexdigest()[:8]}"
        jobs.append(ScanJob(f, name, model))
    return jobs, skipped


def _overlap_message(scanned: Path, out: Path, same: bool) -> str:
    if same:
        return (
            f"the output folder must not be the scanned folder {scanned}; choose another one "
            f"(a new folder inside it, such as {scanned / 'screen'}, is fine)"
        )
    return (
        f"the scanned folder {scanned} must not lie inside the output folder {out}; choose "
        "another output folder"
    )


def _walk(root: Path, skip: Path | None) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and (skip is None or here / d != skip)
        )
        for f in sorted(filenames):
            if not f.startswith("."):
                yield here / f


def read_scan_list(path: str | os.PathLike) -> list[tuple[Path, str | None]]:
    """The scans a CSV file lists: a header row with a ``scan`` (or ``path``) column and an
    optional ``model`` column (a bundled model's name or a model folder; empty: the run's
    ``--model``). Relative paths, of scans and of model folders, are relative to the CSV
    file's folder.

    Returns:
        [(absolute scan path, model or None)], in file order.

    Raises:
        InputError: the file cannot be read, has no scan column, a listed scan does not
            exist, or a listed model is neither a bundled model nor a model folder (the
            message names the line; every distinct model is checked once).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the scan list {p}: {os_reason(exc)}") from None
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip().lower() for h in reader.fieldnames or []]
    column = next((c for c in ("scan", "path") if c in header), None)
    if column is None:
        raise InputError(
            f"{p.name} has no 'scan' (or 'path') column; its first line must name the columns, "
            "e.g. scan,model"
        )
    names = dict(zip(header, reader.fieldnames or [], strict=True))
    out: list[tuple[Path, str | None]] = []
    checked: set[str] = set()
    for line, row in enumerate(reader, start=2):
        cell = (row.get(names[column]) or "").strip()
        if not cell:
            continue
        scan = Path(cell) if Path(cell).is_absolute() else p.parent / cell
        if not scan.is_file():
            raise InputError(f"{p.name}, line {line}: no such scan file: {cell}")
        model = (row.get(names["model"]) or "").strip() if "model" in names else ""
        if model and not Path(model).is_absolute() and (p.parent / model).is_dir():
            model = str((p.parent / model).resolve())
        if model and model not in checked:
            try:
                check_model(model)
            except VaelocError as exc:
                raise InputError(f"{p.name}, line {line}: {one_line(exc)}") from None
            checked.add(model)
        out.append((scan.resolve(), model or None))
    return out


def check_model(model: str) -> None:
    """Check that ``model`` names a bundled model or a model folder with a valid card (or is
    :data:`~napari_vaeloc.pipeline.AUTO_MODEL`) without loading its weights: a mistyped
    model fails before any cluster starts or any file is written.

    Raises:
        ModelError: no such model, or a folder without a valid model card.
    """
    if model == AUTO_MODEL:
        return
    from .models.store import read_card, resolve_model_path

    read_card(resolve_model_path(model))


# --------------------------------------------------------------------------------------------
# done-records: which outputs are complete and made with the same model and settings
# --------------------------------------------------------------------------------------------


def settings_hash(settings: ScanSettings) -> str:
    """sha256 of the settings that change a scan's outputs (all but the model, which the
    record holds apart) and the package version."""
    key = {k: v for k, v in settings.result_key().items() if k != "model"}
    text = json.dumps({"settings": key, "package": __version__}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def model_fingerprint(model: str | os.PathLike) -> str:
    """sha256 over the model card (``model.json``, which holds the weights' checksum that
    loading verifies) of a model and of the companion models its card names for fusion.

    Raises:
        ModelError: no such model.
    """
    from .models.store import CARD_FILE, bundled_models, read_card, resolve_model_path

    folder = resolve_model_path(model)
    h = hashlib.sha256((folder / CARD_FILE).read_bytes())
    for name in read_card(folder).defaults.fuse_with or []:
        local = folder.parent / name
        other = local if local.is_dir() else bundled_models().get(name)
        if other is not None and (other / CARD_FILE).is_file():
            h.update((other / CARD_FILE).read_bytes())
    return h.hexdigest()


def input_stamp(path: Path) -> dict[str, int]:
    """The scan file's size (bytes) and modification time (ns): a changed file is redone."""
    st = path.stat()
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def read_record(scan_dir: Path) -> dict[str, Any] | None:
    """A scan folder's done-record, or None when it has none (or an unreadable one)."""
    try:
        record = json.loads((scan_dir / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def record_problem(
    record: dict[str, Any], job: ScanJob, settings: ScanSettings, key: str, folder: Path
) -> tuple[str, str] | None:
    """Why the done-record of ``folder`` does not vouch for a scan's outputs, or None when it
    does (``key``: :func:`settings_hash` of ``settings``).

    Returns:
        None: outputs complete, made from this file with the same model and settings;
        ("incomplete", why): some outputs are missing or were changed (redone as they are
        this screen's own); ("stale", why): made from another file or with another model or
        other settings (redone only with ``--overwrite``).
    """
    if record.get("version") != RECORD_VERSION:
        return "stale", "written by another version of the screen"
    if record.get("scan") != str(job.path):
        return "stale", f"holds the outputs of another scan ({record.get('scan')})"
    if record.get("settings_hash") != key:
        return "stale", f"screened with {settings_change(record, settings)}"
    request = job.model or settings.model
    if record.get("model_request") != request:
        return "stale", f"screened with --model {record.get('model_request')}"
    try:
        current = model_fingerprint(record.get("model_path") or record.get("model") or "")
    except (VaelocError, OSError):
        return "stale", f"its model {record.get('model')!r} is gone"
    if current != record.get("model_fingerprint"):
        return "stale", f"its model {record.get('model')!r} changed since"
    try:
        if input_stamp(job.path) != record.get("input"):
            return "stale", "the scan's file changed since"
    except OSError as exc:
        return "stale", f"the scan's file cannot be read: {os_reason(exc)}"
    return _files_problem(record, folder)


#: the words for the settings of :meth:`~napari_vaeloc.pipeline.ScanSettings.result_key`
#: (the preparation's four switches apart) and what None stands for in each
_SETTING_WORDS = {
    "prepare": ("--prepare", "auto"),
    "bias_correction": ("bias correction", "auto"),
    "brain_extraction": ("brain extraction", "auto"),
    "registration": ("registration", "auto"),
    "axis": ("axis", "the model's"),
    "fuse": ("fuse", "the model's"),
    "volume_index": ("volume index", "none"),
    "preset": ("preset", "default"),
    "threshold": ("threshold", "the model's default"),
    "weights": ("weights", "the preset's"),
    "smoothing": ("smoothing", "the preset's"),
    "scan_normalise": ("scan normalise", "the preset's"),
    "maps": ("--maps", "default"),
    "outline": ("outline", "the model's"),
}


def _flat_settings(key: dict[str, Any]) -> dict[str, Any]:
    """``key`` (:meth:`~napari_vaeloc.pipeline.ScanSettings.result_key`) without the model,
    the preparation's mode and switches apart, in order."""
    steps = ("prepare", "bias_correction", "brain_extraction", "registration")
    flat: dict[str, Any] = {}
    for k, v in key.items():
        if k == "prepare" and isinstance(v, list | tuple) and len(v) == len(steps):
            flat.update(zip(steps, v, strict=True))
        elif k != "model":
            flat[k] = v
    return flat


def settings_change(record: dict[str, Any], settings: ScanSettings) -> str:
    """What differs between the settings a done-record was made with and ``settings``, in
    words for a message: "other settings (threshold: 3.34 -> 2.5)" (a threshold left to the
    model is shown with the value the record's row says it took), or, when the settings are
    the same or the record does not hold them, "another version of napari-vaeloc (0.3.0,
    now 0.4.0)"."""
    old, new = record.get("settings"), _flat_settings(settings.result_key())
    if isinstance(old, dict):
        old = _flat_settings(old)
        taken = record.get("row") or {}
        changes = []
        # keys a record holds only when set (``maps``) may be in either one
        for k in [*new, *(k for k in old if k not in new)]:
            v = new.get(k)
            if _same(old.get(k), v):
                continue
            word, default = _SETTING_WORDS.get(k, (k, "default"))
            if old.get(k) is None and k == "threshold" and taken.get("threshold") is not None:
                was = _show(taken["threshold"], default)
            else:
                was = _show(old.get(k), default)
            changes.append(f"{word}: {was} -> {_show(v, default)}")
        if changes:
            return "other settings (" + "; ".join(changes) + ")"
    package = record.get("package")
    if package != __version__:
        return f"another version of napari-vaeloc ({package or 'unknown'}, now {__version__})"
    return "other settings"


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _show(value: Any, none: str) -> str:
    if value is None:
        return none
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ",".join(f"{k}={_show(v, none)}" for k, v in value.items())
    return str(value)


def _files_problem(record: dict[str, Any], folder: Path) -> tuple[str, str] | None:
    for name, size in (record.get("files") or {}).items():
        f = folder / name
        try:
            if f.stat().st_size != size:
                return "incomplete", f"{name} changed since"
        except OSError:
            return "incomplete", f"{name} is missing"
    if not record.get("files"):
        return "incomplete", "no outputs listed"
    return None


@dataclass
class Plan:
    """What a run will do: the scans to screen, the rows of those already done, and the scans
    whose outputs were made otherwise (which only ``--overwrite`` redoes).

    Attributes:
        todo: scans to screen now.
        reused: rows of scans whose outputs are complete and current (``reused`` True).
        stale: (scan, why) of scans screened with another model, other settings, or from a
            file that changed since; they are in ``todo`` only when ``overwrite`` was given.
    """

    todo: list[ScanJob] = field(default_factory=list)
    reused: list[dict[str, Any]] = field(default_factory=list)
    stale: list[tuple[ScanJob, str]] = field(default_factory=list)


def plan(jobs: Iterable[ScanJob], settings: ScanSettings, out: Path, overwrite: bool) -> Plan:
    """Sort ``jobs`` by what their folders under ``out/scans`` hold (:func:`record_problem`):
    complete and current (their rows are reused, nothing is recomputed), missing or
    incomplete (screened), stale (screened when ``overwrite``, else listed in ``stale``)."""
    key = settings_hash(settings)
    result = Plan()
    for job in jobs:
        folder = out / SCANS_DIR / job.name
        record = read_record(folder)
        if record is None:
            result.todo.append(job)
            continue
        problem = record_problem(record, job, settings, key, folder)
        if problem is None:
            row = {**record.get("row", {}), "reused": True, "status": "done", "error": ""}
            result.reused.append(row)
        elif problem[0] == "incomplete":
            result.todo.append(job)
        else:
            result.stale.append((job, problem[1]))
            if overwrite:
                result.todo.append(job)
    return result


def check_screen_folder(out: Path, overwrite: bool) -> bool:
    """Whether ``out`` already holds a screen (its :data:`MANIFEST`); refuses a folder that
    holds other files, unless ``overwrite``. Resuming into a screen's folder needs no
    ``overwrite``.

    Raises:
        OutputError: ``out`` is not empty and holds no screen, and ``overwrite`` is false.
    """
    if (out / MANIFEST).is_file():
        return True
    try:
        names = [n for n in os.listdir(out) if not n.startswith(".vaeloc-")] if out.is_dir() else []
    except OSError as exc:
        raise OutputError.from_os(out, exc, "read the output folder") from None
    if names and not overwrite:
        raise OutputError(
            out,
            f"{out} is not empty and holds no screen ({MANIFEST}); choose a new or empty "
            "folder, or pass --overwrite to screen into it",
        )
    return False


def write_manifest(out: Path, settings: ScanSettings) -> Path:
    """Write (or replace) ``out/screen.json``: the run's settings and the package version."""
    manifest = {
        "kind": "vaeloc screen",
        "package": __version__,
        "settings": settings.result_key(),
        "settings_hash": settings_hash(settings),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return write_json_atomic(manifest, out / MANIFEST, overwrite=True)


# --------------------------------------------------------------------------------------------
# the task that runs on a worker
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScanTask:
    """Everything a worker needs to screen one scan (picklable).

    Attributes:
        job: the scan and its folder name.
        settings: the run's settings (the model already the job's).
        out: the output folder (every worker must be able to write it).
        settings_hash: :func:`settings_hash` of ``settings``.
        torch_threads: CPU threads for torch in this worker (None: leave torch's choice).
        max_bytes: memory a task may use for the scan and its maps (None: from the worker's
            memory limit).
    """

    job: ScanJob
    settings: ScanSettings
    out: Path
    settings_hash: str
    torch_threads: int | None = None
    max_bytes: int | None = None


def screen_scan(task: ScanTask) -> dict[str, Any]:
    """Screen one scan (on a Dask worker, or anywhere): the pipeline of ``vaeloc localize``
    (:func:`napari_vaeloc.pipeline.localize_scan`) into ``OUT/scans/NAME/``, then the
    thumbnail, then the done-record, last. Never raises for a scan that cannot be screened:
    its row then has status "failed" and the reason.

    Returns:
        the scan's row of the summary table (:data:`~napari_vaeloc.cohort_report.COLUMNS`);
        the numbers in their units: scores in nats, ``anomalous_ml`` in ml, ``seconds``
        wall-clock.
    """
    t0 = time.perf_counter()
    job = task.job
    folder = task.out / SCANS_DIR / job.name
    row = _row(job, task.settings.model)
    written: _Written | None = None
    try:
        _configure_worker(task.torch_threads)
        columns, written = _run_scan(task, folder)
        row.update(columns)
    except MisfitError as exc:  # refused by the preparation's fit checks
        report = getattr(exc, "report", None)
        if report is not None:
            row.update(_fit_columns(report))
        row.update(error=one_line(exc))
    except VaelocError as exc:  # corrupt, wrong dimensionality, too large, unwritable ...
        row.update(error=one_line(exc))
    except MemoryError:
        row.update(error="ran out of memory while screening it")
    except Exception as exc:  # a failure of a library or of the code: recorded, run goes on
        row.update(error=f"{type(exc).__name__}: {one_line(exc)}")
    row["seconds"] = time.perf_counter() - t0
    row["output"] = _output_of(task.out, job)
    if written is not None:
        _write_record(task, folder, row, written)
    return row


@dataclass(frozen=True)
class _Written:
    """What a screened scan's done-record says besides its row: the files written (name ->
    size in bytes), the lines its pipeline logged and its notes, and the input file's stamp
    (:func:`input_stamp`) when its screening began."""

    files: dict[str, int]
    notes: list[str]
    stamp: dict[str, int]


def _run_scan(task: ScanTask, folder: Path) -> tuple[dict[str, Any], _Written]:
    job = task.job
    try:
        stamp = input_stamp(job.path)  # the file as it was when its screening began
    except OSError as exc:
        raise InputError(f"cannot read {job.path}: {os_reason(exc)}") from None
    old = read_record(folder)
    if old is not None:  # stale (the client asked for it to be redone): never vouch for it
        try:
            (folder / RECORD).unlink()
        except OSError as exc:
            raise OutputError.from_os(folder / RECORD, exc, "remove") from None
    said: list[str] = []  # --model auto says which model it chose
    done = localize_scan(
        job.path,
        task.settings,
        folder,
        overwrite=True,  # the folder is this screen's own: replace what a run left
        log=said.append,
        max_bytes=_task_budget(task.max_bytes),
    )
    result, post = done.result, done.post
    thumb = folder / thumbnail_name(job.path)
    volume = result.volume
    write_thumbnail(volume.data, volume.affine, post.combined(), post.mask(), thumb, job.name)
    files = [*done.paths.values(), thumb]
    if old is not None:  # files of an earlier, other run that this one did not write again
        for name in set(old.get("files") or {}) - {p.name for p in files}:
            try:
                (folder / name).unlink()
            except OSError:
                pass
    scores = result.volume_scores
    row = {
        "model": result.model_name,
        "volume_score": scores.get("elbo_mean", math.nan),
        "worst_slice_score": scores.get("elbo_max", math.nan),
        "anomalous_ml": done.mask_volume_ml(),
        "components": done.mask_components(),
        "threshold": float(post.settings.threshold),
        "status": "done",
        "error": "",
        "device": result.device,
    }
    if result.preparation is not None:
        row.update(_fit_columns(result.preparation))
    else:
        row.update(fit="not prepared", fit_checks="")
    written = _Written(
        files={p.name: p.stat().st_size for p in files},
        notes=[*said, *result.notes],
        stamp=stamp,
    )
    return row, written


def _write_record(task: ScanTask, folder: Path, row: dict[str, Any], written: _Written) -> None:
    """Write the done-record of a screened scan, last; a record that cannot be written fails
    the row (its outputs are then redone by the next run)."""
    from .models.store import resolve_model_path

    request = task.settings.model
    used = request if request != AUTO_MODEL else row["model"]
    try:
        model_path = str(resolve_model_path(used).resolve())
        fingerprint = model_fingerprint(model_path)
        record = {
            "version": RECORD_VERSION,
            "scan": str(task.job.path),
            "input": written.stamp,
            "settings_hash": task.settings_hash,
            "settings": task.settings.result_key(),
            "package": __version__,
            "model_request": request,
            "model": row["model"],
            "model_path": model_path,
            "model_fingerprint": fingerprint,
            "files": written.files,
            "notes": written.notes,
            "row": {k: row.get(k) for k in COLUMNS if k not in ("rank", "reused")},
        }
        write_json_atomic(record, folder / RECORD, overwrite=True)
    except (VaelocError, OSError) as exc:
        row.update(status="failed", error=f"outputs written, but not their record: {exc}")


def _output_of(out: Path, job: ScanJob) -> str:
    """The ``output`` column of ``job``: its folder ``scans/NAME``, relative to ``out``, when
    that folder holds a file; empty when nothing was written for it."""
    folder = out / SCANS_DIR / job.name
    try:
        wrote = bool(job.name) and any(p.is_file() for p in folder.iterdir())
    except OSError:
        wrote = False
    return f"{SCANS_DIR}/{job.name}" if wrote else ""


def _row(
    job: ScanJob, model: str, status: str = "failed", error: str = "", output: str = ""
) -> dict[str, Any]:
    """A table row of ``job`` with nothing measured yet; ``output``: its folder, relative to
    the output folder, when something was written for it (:func:`_output_of`)."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(
        scan=str(job.path),
        model=model,
        fit="",
        fit_checks="",
        status=status,
        error=error,
        reused=False,
        output=output,
        components=None,
    )
    return row


def _fit_columns(report: Any) -> dict[str, str]:
    checks = list(getattr(report, "checks", []) or [])
    return {"fit": report.worst, "fit_checks": "; ".join(f"{c.name}: {c.level}" for c in checks)}


def _task_budget(explicit: int | None) -> int | None:
    """Bytes the scan's float32 copy, and its maps, may take in this task: half of what the
    Dask worker's memory limit leaves each of its threads (None outside a worker, or for a
    worker without a limit: the engine's own check, half of the free memory)."""
    if explicit is not None:
        return explicit
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    limit = getattr(getattr(worker, "memory_manager", None), "memory_limit", None)
    if not limit:
        return None
    threads = max(1, int(getattr(worker.state, "nthreads", 1) or 1))
    return int(limit) // threads // 2


_configured: list[int | None] = []
_configure_lock = threading.Lock()


def _configure_worker(torch_threads: int | None) -> None:
    """Once per process: the CPU threads torch and SimpleITK may use."""
    with _configure_lock:
        if _configured or torch_threads is None:
            return
        _configured.append(torch_threads)
        import torch

        torch.set_num_threads(max(1, torch_threads))
        try:
            import SimpleITK as sitk

            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, torch_threads))
        except ImportError:
            pass


def worker_models_loaded() -> int:
    """How many times this process has read a model folder (the per-process model cache's
    misses, :func:`napari_vaeloc.models.store.cached_model`): one per model a worker used,
    however many scans it screened."""
    from .models import store

    return int(store._load_cached.cache_info().misses)


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


@dataclass
class ScreenResult:
    """A run's rows (ranked), and its counts."""

    rows: list[dict[str, Any]]
    computed: int
    reused: int
    failed: int
    skipped: int
    seconds: float


def skipped_rows(skipped: Iterable[Skipped]) -> list[dict[str, Any]]:
    """Table rows (status "skipped", no model, no output folder) of files that are not NIfTI
    scans."""
    return [_row(ScanJob(s.path, ""), "", "skipped", s.reason) for s in skipped]


def run_screen(
    client: Any,
    jobs_plan: Plan,
    skipped: Sequence[Skipped],
    settings: ScanSettings,
    out: Path,
    *,
    torch_threads: int | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    table_every_s: float = 30.0,
    report_top: int = 25,
) -> ScreenResult:
    """Screen ``jobs_plan.todo`` on the Dask ``client``'s cluster, one task per scan, and
    write the folder's manifest first (:func:`write_manifest`: it marks ``out`` as a screen's,
    which a rerun from the command line then resumes), then the table and the report: every
    ``table_every_s`` seconds while it runs (scans not finished yet listed as "pending"), at
    the end, and when interrupted (then the KeyboardInterrupt is raised again after the table
    is written). A scan whose worker died (Dask gives up after its allowed failures) gets
    status "failed" with that reason; the run goes on. ``on_row`` is called with each
    finished row (for progress displays).

    Raises:
        OutputError: the table or the report cannot be written.
        KeyboardInterrupt: interrupted (after writing the table of what was finished).
    """
    from distributed import as_completed

    t0 = time.perf_counter()
    key = settings_hash(settings)
    base = list(jobs_plan.reused) + skipped_rows(skipped)
    finished: dict[str, dict[str, Any]] = {}
    by_key: dict[str, ScanJob] = {}
    futures = []
    run_id = uuid.uuid4().hex[:12]
    if jobs_plan.todo and client is None:
        raise ValueError("run_screen needs a Dask client to screen scans")
    write_manifest(out, settings)
    for job in jobs_plan.todo:
        task = ScanTask(
            job,
            dataclasses.replace(settings, model=job.model or settings.model),
            out,
            key,
            torch_threads,
        )
        # a key of this run's own: never the result of another run on a shared scheduler
        name = f"vaeloc-screen-{job.name}-{run_id}"
        fut = client.submit(screen_scan, task, key=name, pure=False)
        by_key[fut.key] = job
        futures.append(fut)

    def rows_now(final: bool) -> list[dict[str, Any]]:
        pending = []
        for f in futures:
            job = by_key[f.key]
            if str(job.path) not in finished:
                model = job.model or settings.model
                why = "not screened: the run was interrupted" if final else ""
                pending.append(_row(job, model, "pending", why, _output_of(out, job)))
        return [*base, *finished.values(), *pending]

    def write_all(final: bool) -> None:
        rows = rows_now(final)
        write_table(rows, out)
        write_report(rows, out, report_top)

    last = time.monotonic()
    write_all(False)
    try:
        for fut in as_completed(futures, loop=client.loop) if futures else []:
            job = by_key[fut.key]
            model = job.model or settings.model
            try:
                row = fut.result()
            except Exception as exc:  # KilledWorker, a lost task, an unpicklable result
                name = type(exc).__name__
                if name == "KilledWorker":
                    why = (
                        "its worker died while screening it, each time it was tried (out of "
                        "memory, or a crash in a library)"
                    )
                else:
                    why = f"its task failed: {name}: {one_line(exc)}"
                row = _row(job, model, "failed", why, _output_of(out, job))
            finally:
                fut.release()
            finished[str(job.path)] = row
            if on_row is not None:
                on_row(row)
            if time.monotonic() - last > table_every_s:
                write_all(False)
                last = time.monotonic()
    except BaseException:
        for f in futures:
            f.cancel()
        write_all(True)
        raise
    write_all(True)
    rows = rank_rows(rows_now(True))
    done = list(finished.values())
    return ScreenResult(
        rows=rows,
        computed=sum(r["status"] == "done" for r in done),
        reused=len(jobs_plan.reused),
        failed=sum(r["status"] == "failed" for r in done),
        skipped=len(skipped),
        seconds=time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------------------------
# clusters
# --------------------------------------------------------------------------------------------

#: memory a local worker is planned with (a 1 mm head prepared and scored needs about 2.5 GB)
WORKER_MEMORY_PLAN = 3 << 30


def cpu_count() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def total_memory_bytes() -> int:
    """The machine's memory in bytes (8 GiB when it cannot be read)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def local_cluster_size(
    workers: int | None = None, threads_per_worker: int = 1
) -> tuple[int, int, int]:
    """(workers, threads per worker, torch threads per task) of a local cluster sized to this
    machine: by default as many workers as cores, but no more than the memory holds at
    :data:`WORKER_MEMORY_PLAN` each; torch then shares the cores among them.

    Raises:
        InputError: ``workers`` or ``threads_per_worker`` below 1.
    """
    cores = cpu_count()
    if workers is not None and workers < 1:
        raise InputError(f"--workers must be at least 1, not {workers}")
    if threads_per_worker < 1:
        raise InputError(f"--threads-per-worker must be at least 1, not {threads_per_worker}")
    if workers is None:
        workers = max(1, min(cores, total_memory_bytes() // WORKER_MEMORY_PLAN))
    torch_threads = max(1, cores // (workers * threads_per_worker))
    return workers, threads_per_worker, torch_threads


def start_local_cluster(
    workers: int, threads_per_worker: int, memory_limit: str | int = "auto"
) -> Any:
    """A Dask LocalCluster of ``workers`` processes (each with a nanny that restarts a worker
    that died) and no dashboard; a task whose worker dies is given one more try.

    Raises:
        VaelocError: the cluster cannot be started.
    """
    import logging

    import dask
    from distributed import LocalCluster

    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        try:
            return LocalCluster(
                n_workers=workers,
                threads_per_worker=threads_per_worker,
                processes=True,
                memory_limit=memory_limit,
                dashboard_address=None,
                # its small HTTP server (health checks) on a free port: no clash, no warning
                scheduler_kwargs={"dashboard_address": ":0"},
                silence_logs=logging.ERROR,
            )
        except (OSError, ValueError, RuntimeError) as exc:
            raise VaelocError(f"cannot start a local Dask cluster: {one_line(exc)}") from None


_ADDRESS_HINT = "give it as tcp://HOST:PORT, e.g. tcp://sched-host:8786"


def check_scheduler_address(address: str) -> str:
    """Check the form of a Dask scheduler address without contacting it: a known protocol
    (tcp://, tls://, ws://, wss://, ucx://; none means tcp://), a host and a port.

    Returns:
        the address, stripped of surrounding spaces.

    Raises:
        InputError: malformed; one line that says what is wrong.
    """
    from distributed.comm.addressing import parse_address, parse_host_port
    from distributed.comm.registry import backends

    text = address.strip()
    if not text:
        raise InputError(f"the scheduler address is empty; {_ADDRESS_HINT}")
    scheme, loc = parse_address(text)  # no "scheme://": Dask's default, tcp
    if scheme not in backends:
        known = ", ".join(f"{b}://" for b in backends if b != "inproc")
        raise InputError(
            f"the scheduler address {text!r} has an unknown protocol {scheme}:// "
            f"(known: {known}); {_ADDRESS_HINT}"
        )
    if scheme == "inproc":
        raise InputError(
            f"the scheduler address {text!r} is inside another process and cannot be joined; "
            f"{_ADDRESS_HINT}"
        )
    if ":" not in loc.rsplit("]", 1)[-1]:
        raise InputError(f"the scheduler address {text!r} has no port; {_ADDRESS_HINT}")
    try:
        host, port = parse_host_port(loc)
    except ValueError:
        raise InputError(
            f"the scheduler address {text!r} has no valid port; {_ADDRESS_HINT}"
        ) from None
    if not host:
        raise InputError(f"the scheduler address {text!r} has no host; {_ADDRESS_HINT}")
    if not 0 < int(port) < 65536:
        raise InputError(
            f"the scheduler address {text!r} has port {port}, not 1-65535; {_ADDRESS_HINT}"
        )
    return text


def connect(address: str, timeout_s: float = 10.0) -> Any:
    """A Dask client of the scheduler at ``address`` (e.g. tcp://host:8786); a client that
    could not connect is closed at once (no noise from it later).

    Raises:
        InputError: the address is malformed (:func:`check_scheduler_address`), at once.
        VaelocError: it cannot be reached within ``timeout_s`` seconds; one line.
    """
    address = check_scheduler_address(address)
    from distributed import Client

    class _ClosingClient(Client):
        """A client that closes itself when it cannot start: Dask's own would be closed
        later by the garbage collector, waiting for the scheduler once more and printing a
        traceback of that."""

        def start(self, **kwargs: Any) -> None:
            try:
                super().start(**kwargs)
            except BaseException:
                try:
                    self.close(timeout=1)
                except Exception:  # closing after a failed start: the first error counts
                    pass
                raise

    try:
        return _ClosingClient(address, timeout=f"{timeout_s}s", set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise VaelocError(
            f"cannot reach the Dask scheduler at {address} within {timeout_s:g} s: {one_line(exc)}"
        ) from None
