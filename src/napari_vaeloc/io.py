"""NIfTI input and output that keeps each scan's geometry.

A :class:`Volume` holds one 3D scan as float32 in the file's own voxel order, with the affine and
header it came with. Maps and masks are written back with that affine and header.

Every file the project writes (NIfTI, JSON, CSV, Markdown, PNG, safetensors, model cards) goes
through :func:`write_atomic`: whole or not at all, and never over an existing file unless asked.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np

from .errors import InputError, OutputError, OutputExistsError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_FLOAT_OK = (np.floating, np.integer, np.bool_)


def is_nifti_path(path: str | os.PathLike) -> bool:
    """True when the file name ends in ``.nii`` or ``.nii.gz`` (case-insensitive)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def scan_stem(path: str | os.PathLike | None) -> str:
    """File name without .nii/.nii.gz ("scan" when there is none)."""
    if path is None:
        return "scan"
    name = Path(path).name
    for suf in NIFTI_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return Path(name).stem


def make_readable(path: str | os.PathLike) -> None:
    """Give a file made by ``tempfile`` (mode 0600/0700) the mode the user's umask asks for."""
    mask = os.umask(0)
    os.umask(mask)
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~mask)


def available_memory_bytes() -> int:
    """Memory the system can still hand out, in bytes (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


@dataclass(frozen=True, eq=False)
class Volume:
    """One 3D scan.

    Attributes:
        data: float32 array, shape (X, Y, Z), the file's voxel order. A 2D image is stored with a
            trailing axis of length 1.
        affine: (4, 4) voxel-to-world matrix in mm.
        header: the NIfTI header the scan came with (None for arrays built in memory).
        path: where it was read from, if anywhere.
        source_dtype: the on-disk data type, for the record.
        notes: how the input was changed to make it scorable (e.g. "took volume 0 of 4").
    """

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | nib.Nifti2Header | None = None
    path: Path | None = None
    source_dtype: str = "float32"
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size along each array axis, in mm (column norms of the affine)."""
        zooms = np.sqrt((np.asarray(self.affine)[:3, :3] ** 2).sum(axis=0))
        zooms = np.where(zooms > 0, zooms, 1.0)
        return tuple(float(z) for z in zooms)  # type: ignore[return-value]

    @property
    def origin(self) -> tuple[float, float, float]:
        """World position of voxel (0, 0, 0), in mm."""
        return tuple(float(v) for v in np.asarray(self.affine)[:3, 3])  # type: ignore[return-value]

    @classmethod
    def from_array(
        cls,
        data: np.ndarray,
        affine: np.ndarray | None = None,
        spacing: tuple[float, ...] | None = None,
        header: nib.Nifti1Header | None = None,
        path: Path | None = None,
    ) -> Volume:
        """Build a volume from a 2D or 3D array; see :func:`as_scorable_array` for the checks."""
        arr, notes, src = as_scorable_array(np.asarray(data))
        if affine is None:
            affine = np.eye(4)
            if spacing is not None:
                sp = list(spacing)[:3] + [1.0] * (3 - len(list(spacing)[:3]))
                affine[:3, :3] = np.diag(sp)
        affine = np.asarray(affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise InputError("the affine must be a finite 4x4 matrix")
        if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise InputError("the affine is singular: the scan has no usable voxel geometry")
        return cls(arr, affine, header, path, src, tuple(notes))


def as_scorable_array(data: np.ndarray) -> tuple[np.ndarray, list[str], str]:
    """Check and convert an image array to float32 (X, Y, Z).

    Accepts 2D (becomes (X, Y, 1)) and 3D arrays of integer, boolean or float type. Non-finite
    voxels (NaN, +-Inf) are set to the smallest finite value and reported in the notes.

    Returns:
        (array, notes, source dtype name)

    Raises:
        InputError: wrong dimensionality, complex or non-numeric data, empty, all non-finite, or
            constant volumes.
    """
    notes: list[str] = []
    src = str(data.dtype)
    if data.dtype.names is not None or not issubclass(data.dtype.type, _FLOAT_OK):
        raise InputError(f"cannot score image data of type {data.dtype}; expected real numbers")
    if data.ndim == 2:
        data = data[:, :, None]
        notes.append("2D image scored as a single slice")
    if data.ndim != 3:
        raise InputError(
            f"expected a 2D or 3D image, got {data.ndim}D with shape {data.shape}; "
            "for 4D files choose one volume (volume_index / --volume-index)"
        )
    if data.size == 0:
        raise InputError(f"the image is empty (shape {data.shape})")
    arr = np.asarray(data, dtype=np.float32)
    if arr is data:
        arr = arr.copy()
    finite = np.isfinite(arr)
    n_bad = int(arr.size - np.count_nonzero(finite))
    if n_bad == arr.size:
        raise InputError("every voxel is NaN or infinite: nothing to score")
    if n_bad:
        low = float(arr[finite].min())
        arr[~finite] = low
        notes.append(f"{n_bad} non-finite voxels (NaN/Inf) set to the minimum {low:g} (background)")
    lo, hi = float(arr.min()), float(arr.max())
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        raise InputError(f"the image is constant (every voxel is {lo:g}): nothing to localize")
    return arr, notes, src


def load_volume(
    path: str | os.PathLike,
    volume_index: int | None = None,
    max_bytes: int | None = None,
) -> Volume:
    """Read a ``.nii`` / ``.nii.gz`` scan.

    Args:
        path: the file.
        volume_index: which volume of a 4D file to take. A 4D file with one volume needs none.
        max_bytes: refuse scans whose float32 copy would exceed this (default: the memory the
            system has available).

    Raises:
        InputError: missing, corrupted or non-NIfTI file; 4D without ``volume_index``; too large.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"no such file: {p}")
    if p.is_dir():
        raise InputError(f"{p} is a folder, not a NIfTI file")
    if not is_nifti_path(p):
        raise InputError(f"{p.name} is not a NIfTI file (expected .nii or .nii.gz)")
    try:
        img = nib.load(str(p))
    except Exception as exc:  # nibabel raises many types for broken files
        raise InputError(f"cannot read {p.name} as NIfTI: {exc}") from exc
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(f"{p.name} is a {type(img).__name__}, not a NIfTI image")
    shape = tuple(int(s) for s in img.shape)
    notes: list[str] = []
    # drop trailing singleton axes beyond the third (e.g. (X, Y, Z, 1))
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 4:
        raise InputError(f"{p.name} has {len(shape)} dimensions {shape}; expected 3D or 4D")
    if len(shape) == 4:
        n = shape[3]
        if volume_index is None:
            raise InputError(
                f"{p.name} is 4D with {n} volumes (shape {shape}); choose one volume, "
                f"0..{n - 1} (--volume-index on the command line)"
            )
        if not -n <= volume_index < n:
            raise InputError(f"volume index {volume_index} out of range for {n} volumes")
        volume_index %= n
        notes.append(f"took volume {volume_index} of {n}")
    voxels = int(np.prod(shape[:3]))
    limit = available_memory_bytes() // 2 if max_bytes is None else max_bytes
    if voxels * 4 > limit:
        raise InputError(
            f"{p.name} has {voxels:,} voxels ({voxels * 4 / 2**30:.1f} GiB as float32), more than "
            f"the {limit / 2**30:.1f} GiB allowed; crop or downsample it first"
        )
    try:
        if len(shape) == 4:
            raw = np.asanyarray(img.dataobj[..., volume_index])
        else:
            raw = np.asanyarray(img.dataobj).reshape(shape)
    except (EOFError, OSError, ValueError, zlib.error) as exc:
        raise InputError(f"{p.name} is truncated or corrupted: {exc}") from exc
    arr, more, _ = as_scorable_array(np.asarray(raw))
    notes.extend(more)
    header = img.header.copy()
    return Volume(
        arr,
        np.asarray(img.affine, dtype=np.float64),
        header,
        p,
        str(img.get_data_dtype()),
        tuple(notes),
    )


def _output_image(array: np.ndarray, like: Volume, kind: Literal["map", "mask"]) -> nib.Nifti1Image:
    if kind == "mask":
        data = np.asarray(array).astype(np.uint8)
        dtype = np.uint8
    elif kind == "map":
        data = np.asarray(array, dtype=np.float32)
        dtype = np.float32
    else:
        raise ValueError(f"kind must be 'map' or 'mask', not {kind!r}")
    if data.shape != like.shape:
        raise InputError(f"array shape {data.shape} differs from the scan's {like.shape}")
    header = like.header.copy() if like.header is not None else None
    if isinstance(header, nib.Nifti2Header):
        img = nib.Nifti2Image(data, like.affine, header)
    else:
        img = nib.Nifti1Image(data, like.affine, header)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"] = 0
    img.header["cal_max"] = 0
    return img


def _exists(path: Path) -> bool:
    """True when something (even a broken link) is at ``path``; False when it cannot be seen."""
    return os.path.lexists(path)


def check_output_folder(folder: str | os.PathLike) -> Path:
    """Make sure ``folder`` can take output files, before any work is done: create it when it is
    missing, then create and delete a temporary file in it. Returns it as a Path.

    Raises:
        OutputError: ``folder`` is an existing file (or lies under one), cannot be created, or
            cannot be written (read-only or immutable folder, read-only mount, /proc, /sys);
            one line naming it and the reason.
    """
    p = Path(folder)
    try:
        if _exists(p) and not p.is_dir():
            what = "a broken link" if p.is_symlink() else "a file, not a folder"
            raise OutputError(p, f"cannot use {p} as the output folder: it is {what}")
        if not _exists(p):
            for above in p.parents:
                if _exists(above):
                    if not above.is_dir():
                        raise OutputError(
                            p,
                            f"cannot use {p} as the output folder: {above} is a file, not a folder",
                        )
                    break
    except OSError as exc:
        raise OutputError.from_os(p, exc, "use the output folder") from None
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError.from_os(p, exc, "create the output folder") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".vaeloc-probe-", dir=p)
    except OSError as exc:
        raise OutputError.from_os(p, exc, "write to the output folder") from None
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError as exc:
        raise OutputError.from_os(p, exc, "write to the output folder") from None
    return p


def _refuse_folder(path: Path) -> None:
    if os.path.isdir(path):
        raise OutputError(path, f"cannot write {path}: a folder of that name is in the way")


def refuse_existing(
    paths: Iterable[str | os.PathLike], overwrite: bool, what: str = "file"
) -> None:
    """Check a set of targets before any is written, so that a refusal writes none.

    Raises:
        OutputError: one of ``paths`` is a folder (even with ``overwrite``).
        OutputExistsError: some of ``paths`` exist and ``overwrite`` is false (``.paths`` lists
            them).
    """
    targets = [Path(p) for p in paths]
    for p in targets:
        _refuse_folder(p)
    existing = [p for p in targets if _exists(p)]
    if existing and not overwrite:
        raise OutputExistsError(existing, what)


def _stage(dest: Path, write: Callable[[Path], None], suffix: str = "") -> Path:
    """Fill a temporary file beside ``dest`` with ``write(tmp)`` and give it the umask's mode;
    returns it. Nothing is left behind on failure.

    Raises:
        OutputError: the folder cannot be created or written, or the write failed (disk full).
    """
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError.from_os(dest.parent, exc, "create the folder") from None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix, dir=dest.parent)
    except OSError as exc:
        raise OutputError.from_os(dest, exc) from None
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        make_readable(tmp)
    except OSError as exc:
        _discard(tmp)
        raise OutputError.from_os(dest, exc) from None
    except BaseException:
        _discard(tmp)
        raise
    return tmp


def _discard(tmp: Path) -> None:
    try:
        if _exists(tmp):
            tmp.unlink()
    except OSError:
        pass


def _place(tmp: Path, dest: Path, overwrite: bool) -> None:
    """Move a staged file onto ``dest``. Without ``overwrite`` an existing file is never replaced,
    not even one that appeared meanwhile (a hard link claims the name). ``tmp`` may remain.

    Raises:
        OutputExistsError: ``dest`` exists and ``overwrite`` is false.
        OutputError: ``dest`` is a folder, or the rename failed.
    """
    _refuse_folder(dest)
    try:
        if overwrite:
            os.replace(tmp, dest)
            return
        try:
            os.link(tmp, dest)  # fails if dest appeared meanwhile: never clobbers
        except FileExistsError:
            raise OutputExistsError(dest) from None
        except OSError:  # file systems without hard links
            if _exists(dest):
                raise OutputExistsError(dest) from None
            os.replace(tmp, dest)
    except OutputExistsError:
        raise
    except OSError as exc:
        raise OutputError.from_os(dest, exc) from None


def write_atomic(
    path: str | os.PathLike,
    write: Callable[[Path], None],
    overwrite: bool = False,
    suffix: str = "",
) -> Path:
    """The one writer of every file the project makes: ``write(tmp)`` fills a temporary file
    beside ``path`` (``suffix`` keeps the extension a writer may need), which then takes its
    place, so the file appears whole or not at all. Without ``overwrite`` an existing file is
    never replaced, not even one that appears while writing (a hard link is used to claim the
    name). The new file gets the mode the user's umask asks for. Sets of files that must
    appear together go through :class:`WriteSet`.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is false.
        OutputError: ``path`` is a folder (even with ``overwrite``), or its folder cannot be
            created or written (read-only, full disk): one line naming the path and the reason.
    """
    dest = Path(path)
    _refuse_folder(dest)
    if _exists(dest) and not overwrite:
        raise OutputExistsError(dest)
    tmp = _stage(dest, write, suffix)
    try:
        _place(tmp, dest, overwrite)
    finally:
        _discard(tmp)
    return dest


class WriteSet:
    """Write a set of files that must appear together, or none of them.

    Each :meth:`add` writes its file at once to a temporary name beside its target; when the
    ``with`` block ends without an error the targets are checked again and every staged file
    is moved into place. Any failure (a write, disk full, a target that appeared meanwhile)
    removes every temporary file and every file of the set already moved into place, so no
    partial set is left. Files that ``overwrite`` already replaced cannot be brought back, but
    a failure that late needs a target changed by someone else during the move.

        with WriteSet(overwrite) as ws:
            ws.add(path, lambda tmp: ...)
            ws.add_nifti(mask, volume, other_path, "mask")
    """

    def __init__(self, overwrite: bool = False) -> None:
        self.overwrite = overwrite
        self._staged: list[tuple[Path, Path]] = []

    def add(self, path: str | os.PathLike, write: Callable[[Path], None], suffix: str = "") -> Path:
        """Stage ``path``, filled by ``write(tmp)``; returns its final path.

        Raises:
            OutputExistsError: ``path`` exists and ``overwrite`` is false.
            OutputError: ``path`` is a folder, is already in the set, or cannot be written.
        """
        dest = Path(path)
        _refuse_folder(dest)
        if _exists(dest) and not self.overwrite:
            raise OutputExistsError(dest)
        if any(d == dest for _, d in self._staged):
            raise OutputError(dest, f"cannot write {dest} twice in one set")
        self._staged.append((_stage(dest, write, suffix), dest))
        return dest

    def add_nifti(
        self,
        array: np.ndarray,
        like: Volume,
        path: str | os.PathLike,
        kind: Literal["map", "mask"] = "map",
    ) -> Path:
        """Stage a map or mask as :func:`save_nifti` writes it."""
        write, suffix = _nifti_writer(array, like, path, kind)
        return self.add(path, write, suffix)

    def add_json(self, obj: Any, path: str | os.PathLike) -> Path:
        """Stage JSON as :func:`write_json_atomic` writes it."""
        text = _json_text(obj)
        return self.add(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    @property
    def paths(self) -> list[Path]:
        """The final paths staged so far, in order."""
        return [d for _, d in self._staged]

    def commit(self) -> list[Path]:
        """Move every staged file into place (all or none); returns their paths.

        Raises:
            OutputExistsError: a target appeared meanwhile and ``overwrite`` is false.
            OutputError: a target became a folder, or a rename failed.
        """
        targets = self.paths
        try:
            refuse_existing(targets, self.overwrite, "file")
            placed: list[Path] = []
            new = {d for d in targets if not _exists(d)}
            try:
                for tmp, dest in self._staged:
                    _place(tmp, dest, self.overwrite)
                    placed.append(dest)
            except BaseException:
                for dest in placed:
                    if dest in new:
                        _discard(dest)
                raise
        finally:
            self.abort()
        return targets

    def abort(self) -> None:
        """Remove every temporary file; nothing staged is moved into place."""
        for tmp, _ in self._staged:
            _discard(tmp)
        self._staged.clear()

    def __enter__(self) -> WriteSet:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_text_atomic(text: str, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a text file (UTF-8) through :func:`write_atomic`."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite)


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple | np.ndarray):
        return [_jsonable(x) for x in (v.tolist() if isinstance(v, np.ndarray) else v)]
    if isinstance(v, float | np.floating):
        return None if not math.isfinite(float(v)) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


def _json_text(obj: Any) -> str:
    return json.dumps(_jsonable(obj), indent=2) + "\n"


def write_json_atomic(obj: Any, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write JSON (indent 2) through :func:`write_atomic`; NaN and infinities become null."""
    return write_text_atomic(_json_text(obj), path, overwrite)


def write_folder_atomic(
    path: str | os.PathLike, fill: Callable[[Path], None], overwrite: bool = False
) -> Path:
    """Create a folder whole or not at all: ``fill(tmp)`` writes its files (with
    :func:`write_atomic`) into a temporary folder beside ``path``, which is then renamed.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is false.
        OutputError: ``path`` is a file (even with ``overwrite``), or the folder beside it
            cannot be created or written.
    """
    dest = Path(path)
    if _exists(dest) and not dest.is_dir():
        raise OutputError(
            dest, f"cannot write the folder {dest}: a file of that name is in the way"
        )
    if _exists(dest) and not overwrite:
        raise OutputExistsError(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError.from_os(dest.parent, exc, "create the folder") from None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    except OSError as exc:
        raise OutputError.from_os(dest, exc) from None
    try:
        fill(tmp)
        make_readable(tmp)
        if _exists(dest):
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except OSError as exc:
        if isinstance(exc, OutputExistsError):
            raise
        raise OutputError.from_os(dest, exc) from None
    finally:
        if _exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _nifti_writer(
    array: np.ndarray, like: Volume, path: str | os.PathLike, kind: Literal["map", "mask"]
) -> tuple[Callable[[Path], None], str]:
    """``(write(tmp), suffix)`` that saves a map or mask as :func:`save_nifti` does.

    Raises:
        InputError: the name does not end in .nii/.nii.gz, or the shape differs from the scan's.
    """
    dest = Path(path)
    if not is_nifti_path(dest):
        raise InputError(f"output name must end in .nii or .nii.gz: {dest.name}")
    img = _output_image(array, like, kind)
    suffix = ".nii.gz" if str(dest).lower().endswith(".gz") else ".nii"
    return (lambda tmp: nib.save(img, str(tmp))), suffix


def save_nifti(
    array: np.ndarray,
    like: Volume,
    path: str | os.PathLike,
    kind: Literal["map", "mask"] = "map",
    overwrite: bool = False,
) -> Path:
    """Write a map (float32) or a mask (uint8) in the geometry of ``like`` (its affine and
    header), through :func:`write_atomic`.

    Raises:
        OutputExistsError: the file exists and ``overwrite`` is false.
        OutputError: the target is a folder, or it cannot be written.
        InputError: the name does not end in .nii/.nii.gz, or the array's shape differs from the
            scan's.
    """
    write, suffix = _nifti_writer(array, like, path, kind)
    return write_atomic(path, write, overwrite, suffix)
