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
from .errors import InputError, MisfitError, OutputError, VaelocError, os_reason
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
                raise InputError(f"the output folder {exclude} cannot hold the input folder {p}")
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
        InputError: the file cannot be read, has no scan column, or a listed scan does not
            exist (the message names the line).
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
        out.append((scan.resolve(), model or None))
    return out


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
        return "stale", "screened with other settings or another version of napari-vaeloc"
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
        row.update(error=_one_line(exc))
    except VaelocError as exc:  # corrupt, wrong dimensionality, too large, unwritable ...
        row.update(error=_one_line(exc))
    except MemoryError:
        row.update(error="ran out of memory while screening it")
    except Exception as exc:  # a failure of a library or of the code: recorded, run goes on
        row.update(error=f"{type(exc).__name__}: {_one_line(exc)}")
    row["seconds"] = time.perf_counter() - t0
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


def _row(job: ScanJob, model: str, status: str = "failed", error: str = "") -> dict[str, Any]:
    """A table row of ``job`` with nothing measured yet; its output folder is
    ``scans/NAME`` (none for a job without a name: a skipped file)."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(
        scan=str(job.path),
        model=model,
        fit="",
        fit_checks="",
        status=status,
        error=error,
        reused=False,
        output=f"{SCANS_DIR}/{job.name}" if job.name else "",
        components=None,
    )
    return row


def _fit_columns(report: Any) -> dict[str, str]:
    checks = list(getattr(report, "checks", []) or [])
    order = {"ok": 0, "warn": 1, "fail": 2}
    worst = max((c.level for c in checks), key=lambda lv: order.get(lv, 1), default="none")
    return {"fit": worst, "fit_checks": "; ".join(f"{c.name}: {c.level}" for c in checks)}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


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
    write the table and the report: every ``table_every_s`` seconds while it runs (scans not
    finished yet listed as "pending"), at the end, and when interrupted (then the
    KeyboardInterrupt is raised again after the table is written). A scan whose worker died
    (Dask gives up after its allowed failures) gets status "failed" with that reason; the run
    goes on. ``on_row`` is called with each finished row (for progress displays).

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
                pending.append(_row(job, model, "pending", why))
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
                    why = f"its task failed: {name}: {_one_line(exc)}"
                row = _row(job, model, "failed", why)
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
            raise VaelocError(f"cannot start a local Dask cluster: {_one_line(exc)}") from None


def connect(address: str, timeout_s: float = 10.0) -> Any:
    """A Dask client of the scheduler at ``address`` (e.g. tcp://host:8786).

    Raises:
        VaelocError: it cannot be reached within ``timeout_s`` seconds, or the address is
            malformed; one line.
    """
    from distributed import Client

    try:
        return Client(address, timeout=f"{timeout_s}s", set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise VaelocError(
            f"cannot reach the Dask scheduler at {address} within {timeout_s:g} s: {_one_line(exc)}"
        ) from None
