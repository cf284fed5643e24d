"""NIfTI input and output that keeps each scan's geometry.

A :class:`Volume` holds one 3D scan as float32 in the file's own voxel order, with the affine and
header it came with. Maps and masks are written back with that affine and header.

Every file the project writes (NIfTI, JSON, CSV, Markdown, PNG, safetensors, model cards) goes
through :func:`write_atomic`: whole or not at all, and never over an existing file unless asked.
"""

from __future__ import annotations

import gzip
import json
import math
import mmap
import os
import shutil
import tempfile
import time
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
    """One scan.

    Attributes:
        data: float32 array, shape (X, Y, Z), the file's voxel order. A 2D image is stored with a
            trailing axis of length 1. Only a volume from :func:`load_image` (for viewing) may
            be 4D, (X, Y, Z, T); everything that scores takes 3D volumes.
        affine: (4, 4) voxel-to-world matrix in mm (for files: the header's geometry as
            :func:`header_affine` validated it, converted to mm).
        header: the NIfTI header the scan came with, as stored in the file (None for arrays
            built in memory); written outputs take their geometry from ``affine``, not from it.
        path: where it was read from, if anywhere.
        source_dtype: the on-disk data type, for the record.
        notes: plain sentences on how the input was read or changed (e.g. "took volume 0 of 4",
            a repaired header geometry, a scan that looks like a mask or a label image).
        missing: bool, the data's shape: the voxels the file held no number for (NaN or
            infinite; ``data`` has the smallest finite value there, or, in a volume to score
            where data enclose them, values filled from around them: :func:`as_scorable_array`),
            or None when there are none. The engine leaves them out of the anomaly map and the
            mask.
    """

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | nib.Nifti2Header | None = None
    path: Path | None = None
    source_dtype: str = "float32"
    notes: tuple[str, ...] = field(default_factory=tuple)
    missing: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The data's shape: (X, Y, Z), or (X, Y, Z, T) from :func:`load_image`."""
        return tuple(self.data.shape)

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
        missing: np.ndarray | None = None,
    ) -> Volume:
        """Build a volume to score from a 2D or 3D array; see :func:`as_scorable_array` for the
        checks and for ``missing`` (voxels known to hold no data, added to the array's own
        non-finite ones) and the gaps it fills."""
        arr, notes, src, own = as_scorable_array(np.asarray(data), missing=missing)
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
        return cls(arr, affine, header, path, src, tuple(notes), own)


#: at most this many distinct whole-number values (in a sample of the voxels) make an image
#: look like a label image (a tissue segmentation, an atlas) rather than a scan; a real MRI,
#: even stored as 8-bit integers, has hundreds
LABEL_IMAGE_MAX_VALUES = 16

#: the number of voxels, at most, sampled on a regular grid for that check
_LABEL_SAMPLE = 1 << 18


def mask_like_note(data: np.ndarray) -> str | None:
    """One plain sentence when a (finite) image looks like a mask or a label image rather than
    a scan: at most two distinct values, or at most :data:`LABEL_IMAGE_MAX_VALUES` distinct
    whole numbers in a regular sample of at most 2^18 voxels; None otherwise. Cheap: min,
    max, one vectorised check and a sort of the sample.
    """
    if data.size == 0:
        return None
    lo, hi = float(np.min(data)), float(np.max(data))
    if lo == hi:
        return f"every voxel of the image is {lo:g}: it is empty, not a scan"
    if not np.any((data > lo) & (data < hi)):
        return (
            f"the image has only two values ({lo:g} and {hi:g}): it looks like a mask, not a scan"
        )
    step = max(1, math.ceil((data.size / _LABEL_SAMPLE) ** (1 / data.ndim)))
    sample = np.asarray(data[(slice(None, None, step),) * data.ndim])
    values = np.unique(sample)
    if len(values) > LABEL_IMAGE_MAX_VALUES or np.any(values != np.round(values)):
        return None
    shown = ", ".join(f"{v:g}" for v in values)
    return (
        f"the image has only the whole-number values {shown}: it looks like a label image "
        "(a segmentation), not a scan, and its maps and mask mean little"
    )


def _file_backed(arr: np.ndarray) -> bool:
    """True when ``arr`` is (a view of) a memory-mapped file."""
    base: Any = arr
    while base is not None:
        if isinstance(base, (np.memmap, mmap.mmap)):
            return True
        base = getattr(base, "base", None)
    return False


#: the smallest share of known data in a gap voxel's Gaussian neighbourhood that fills it
#: (normalised convolution, :func:`fill_gaps`)
_FILL_SUPPORT = 0.05


def enclosed_gaps(missing: np.ndarray) -> np.ndarray | None:
    """The voxels of ``missing`` that data enclose: its connected parts (26-connected) that
    touch no face of the image along an axis longer than one voxel, or None without any. Parts
    that reach a face lie outside the head (a file whose background is stored as NaN).

    Args:
        missing: bool (X, Y) or (X, Y, Z).
    """
    from scipy import ndimage

    labels, n = ndimage.label(missing, structure=np.ones((3,) * missing.ndim, bool))
    if n == 0:
        return None
    on_face = np.zeros(n + 1, bool)
    for ax, size in enumerate(missing.shape):
        if size > 1:
            on_face[np.unique(np.take(labels, [0, size - 1], axis=ax))] = True
    on_face[0] = True
    inside = ~on_face[labels]
    return inside if inside.any() else None


def fill_gaps(arr: np.ndarray, gaps: np.ndarray, known: np.ndarray) -> None:
    """Fill, in place, the voxels of ``gaps`` with the Gaussian-weighted mean of the
    ``known`` voxels around them (normalised convolution, ``G*(x w) / G*w`` with ``w`` = 1 on
    known voxels: Knutsson and Westin, "Normalized and differential convolution", CVPR 1993),
    at the smallest of σ = 1, 2, 4, ... voxels whose known weight there reaches
    :data:`_FILL_SUPPORT`; the voxels filled at one σ count as known at the next, so a gap is
    filled from its rim inwards and reads as smooth tissue like its surroundings.

    Args:
        arr: float32 image, changed in place.
        gaps, known: bool, ``arr``'s shape (disjoint; ``known`` is not changed).
    """
    from scipy import ndimage

    todo = gaps.copy()
    known = known.copy()
    where = np.nonzero(todo)
    lo = [int(w.min()) for w in where]
    hi = [int(w.max()) + 1 for w in where]
    del where
    sigma = 1.0
    while todo.any() and sigma <= 2 * max(arr.shape):
        margin = int(4 * sigma) + 1  # the gaps' bounding box, widened with the kernel
        box = tuple(
            slice(max(0, a - margin), min(size, b + margin))
            for a, b, size in zip(lo, hi, arr.shape, strict=True)
        )
        w = known[box].astype(np.float32)
        weight = ndimage.gaussian_filter(w, sigma, mode="constant")
        total = ndimage.gaussian_filter(arr[box] * w, sigma, mode="constant")
        now = todo[box] & (weight >= _FILL_SUPPORT)
        arr[box][now] = total[now] / weight[now]
        todo[box][now] = False
        known[box][now] = True
        sigma *= 2.0


def _float_image(
    data: np.ndarray,
    constant_ok: bool,
    given: np.ndarray | None = None,
    fill: bool = False,
) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """float32 version of a real-valued image with non-finite voxels set to the smallest finite
    value, or, with ``fill``, those the scan's data enclose filled from the voxels around them
    (:func:`enclosed_gaps`, :func:`fill_gaps`); ``given`` (bool, the image's size) adds voxels
    known to hold no data (already replaced) to its own non-finite ones. The notes say what was
    changed and whether it looks like a mask; the third element is the voxels without data
    (bool, the image's shape), None without any. A contiguous float32 image in memory with
    nothing to change is not copied: a read-only view of it is returned (a viewer's scan is
    not held twice); a memory-mapped file is copied.

    Raises:
        InputError: complex or non-numeric data, empty, all non-finite, or (unless
            ``constant_ok``) constant.
    """
    notes: list[str] = []
    if data.dtype.names is not None or not issubclass(data.dtype.type, _FLOAT_OK):
        raise InputError(f"cannot score image data of type {data.dtype}; expected real numbers")
    if data.size == 0:
        raise InputError(f"the image is empty (shape {data.shape})")
    arr = np.asarray(data, dtype=np.float32)
    finite = np.isfinite(arr)
    n_bad = int(arr.size - np.count_nonzero(finite))
    if n_bad == arr.size:
        raise InputError("every voxel is NaN or infinite: nothing to score")
    missing = ~finite if n_bad else None
    low = 0.0
    if n_bad:
        if np.shares_memory(arr, data):
            arr = arr.copy()
        low = float(arr[finite].min())
        arr[~finite] = low
    elif np.shares_memory(arr, data):
        if (arr.flags.c_contiguous or arr.flags.f_contiguous) and not _file_backed(arr):
            arr = arr.view()
            arr.flags.writeable = False
        else:  # a flipped or strided view, or a mapped file that may change under us: a copy
            arr = np.array(arr, order="C" if not arr.flags.f_contiguous else "F")
    del finite
    if given is not None and np.size(given) == arr.size and np.any(given):
        given = np.asarray(given, bool).reshape(arr.shape)
        missing = given if missing is None else given | missing
    gaps = enclosed_gaps(missing) if fill and missing is not None else None
    filled = 0
    if gaps is not None:
        if not arr.flags.writeable or np.shares_memory(arr, data):
            arr = arr.copy()
        fill_gaps(arr, gaps, ~missing)
        filled = int(gaps.sum())
    note = _missing_note(n_bad, arr.size, low, filled, 0 if missing is None else int(missing.sum()))
    if note is not None:
        notes.append(note)
    lo, hi = float(arr.min()), float(arr.max())
    if not constant_ok and hi - lo <= 1e-12 * max(1.0, abs(hi)):
        raise InputError(f"the image is constant (every voxel is {lo:g}): nothing to localize")
    note = mask_like_note(arr)
    if note is not None:
        notes.append(note)
    return arr, notes, missing


def _missing_note(n_bad: int, size: int, low: float, filled: int, missing: int) -> str | None:
    """The note on the voxels without data: the file's ``n_bad`` non-finite ones of ``size``
    (read as the minimum ``low``), of which, or of all ``missing`` ones, ``filled`` were
    filled from around them; None when there is nothing to say."""
    what = "enclosed by the scan's data filled from the voxels around them"
    if not n_bad:
        return f"{filled} voxels without data {what}" if filled else None
    head = f"{n_bad} non-finite voxels (NaN/Inf, {100.0 * n_bad / size:.2g} % of the image)"
    as_minimum = f"read as the minimum {low:g} (background)"
    if not filled:
        return f"{head} {as_minimum}"
    if filled == missing:
        return f"{head}, all {what}"
    return f"{head}: the {filled} {what}, the rest {as_minimum}"


def as_scorable_array(
    data: np.ndarray,
    constant_ok: bool = False,
    missing: np.ndarray | None = None,
    fill: bool = True,
) -> tuple[np.ndarray, list[str], str, np.ndarray | None]:
    """Check and convert an image array to float32 (X, Y, Z), as it is scored.

    Accepts 2D (becomes (X, Y, 1)) and 3D arrays of integer, boolean or float type. Non-finite
    voxels (NaN, +-Inf) are set to the smallest finite value and reported in the notes, and so
    is an image with at most two distinct values (:func:`mask_like_note`). ``missing`` (bool,
    the array's size) adds voxels known to hold no data (a viewer's layer whose file had NaN
    there, already replaced). With ``fill``, the voxels without data that data enclose
    (:func:`enclosed_gaps`) are filled from the voxels around them (:func:`fill_gaps`), with a
    note: the model then reads a gap as the tissue around it, not as a dark hole, and the
    engine still leaves it out of the anomaly map and the mask. On a real 1 mm T1 head with a
    64 ml NaN cube 8 mm from a 7 ml lesion, the mask went from 16.6 ml in two parts (6.8 ml
    of it around the gap, Dice 0.60) to 8.8 ml in one (Dice 0.89; the head without the gap:
    8.3 ml, Dice 0.92).

    Returns:
        (array, notes, source dtype name, the voxels without data: bool (X, Y, Z) or None)

    Raises:
        InputError: wrong dimensionality, complex or non-numeric data, empty, all non-finite, or
            (unless ``constant_ok``) constant volumes.
    """
    notes: list[str] = []
    src = str(data.dtype)
    if data.ndim == 2:
        data = data[:, :, None]
        notes.append("2D image scored as a single slice")
    if data.ndim != 3:
        raise InputError(
            f"expected a 2D or 3D image, got {data.ndim}D with shape {data.shape}; "
            "for 4D files choose one volume (volume_index / --volume-index)"
        )
    arr, more, own = _float_image(data, constant_ok, missing, fill)
    return arr, notes + more, src, own


# NIfTI xyzt_units, spatial part (bits 0-2): metres and microns are converted to mm; unknown
# (0) and anything undefined are taken as mm.
_MM_PER_UNIT = {1: 1000.0, 3: 0.001}
_UNIT_NAMES = {1: "metres", 3: "microns"}


def _matrix_problem(m: np.ndarray, rows: tuple[str, str, str]) -> str | None:
    """Why a voxel-to-world matrix cannot be used (names its rows as ``rows``), or None."""
    if not np.all(np.isfinite(m)):
        return "has NaN or infinite values"
    lin = m[:3, :3]
    if not np.any(lin):
        return "is all zero" if not np.any(m[:3, 3]) else "is all zero but for its offsets"
    norms = np.linalg.norm(lin, axis=0)
    zero_cols = [("i", "j", "k (slice)")[j] for j in range(3) if norms[j] == 0]
    if zero_cols:
        axes = f"axis {zero_cols[0]}" if len(zero_cols) == 1 else f"axes {' and '.join(zero_cols)}"
        return f"gives voxel {axes} no direction (zero column{'s' * (len(zero_cols) > 1)})"
    zero_rows = [rows[i] for i in range(3) if not np.any(lin[i])]
    if zero_rows:
        return f"has its {' and '.join(zero_rows)} row{'s' * (len(zero_rows) > 1)} all zero"
    if abs(np.linalg.det(lin)) <= 1e-6 * float(np.prod(norms)):
        return "is singular (two voxel axes point the same way)"
    return None


def _quaternion_affine(header: Any, zooms: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """The qform of NIfTI's method 2 from the raw fields, or (None, why not)."""
    b, c, d = (float(header[k]) for k in ("quatern_b", "quatern_c", "quatern_d"))
    offset = [float(header[k]) for k in ("qoffset_x", "qoffset_y", "qoffset_z")]
    if not np.all(np.isfinite([b, c, d, *offset])):
        return None, "has NaN or infinite quatern_b/c/d or qoffset values"
    w2 = 1.0 - (b * b + c * c + d * d)
    if w2 < -1e-6:
        return None, f"quaternion is not a rotation (b²+c²+d² = {1 - w2:.3g} > 1)"
    if w2 < 1e-7:
        # nifti1_io's rule: a near-zero scalar part is a 180° rotation; normalise (b, c, d) so
        # that float32 rounding of the stored fields does not tilt the axes
        norm = math.sqrt(b * b + c * c + d * d)
        b, c, d, a = b / norm, c / norm, d / norm, 0.0
    else:
        a = math.sqrt(w2)
    rot = np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
        ]
    )
    qfac = -1.0 if float(header["pixdim"][0]) < 0 else 1.0
    out = np.eye(4)
    out[:3, :3] = rot @ np.diag([zooms[0], zooms[1], zooms[2] * qfac])
    out[:3, 3] = offset
    return out, None


#: how a geometry from pixdim alone is read, and what that means for a head
_PIXDIM_ONLY = (
    "origin at the first voxel, axes taken as R, A, S: a head stored in another voxel order "
    "is read turned or mirrored, which the preparation cannot undo; give the file its "
    "orientation (an sform or qform)"
)


def header_affine(
    header: nib.Nifti1Header | nib.Nifti2Header, shape: tuple[int, ...], name: str = "the file"
) -> tuple[np.ndarray, list[str]]:
    """:func:`header_geometry` without the name of the form used."""
    affine, notes, _ = header_geometry(header, shape, name)
    return affine, notes


def orientation_unknown(volume: Volume) -> bool:
    """Whether ``volume`` came from a file whose header gives no usable sform or qform, so that
    its voxels' orientation was assumed (R, A, S): :func:`header_geometry` used pixdim."""
    if volume.header is None or not isinstance(volume.header, nib.Nifti1Header):
        return False
    try:
        return header_geometry(volume.header, tuple(volume.data.shape[:3]))[2] == "pixdim"
    except InputError:
        return False


def header_geometry(
    header: nib.Nifti1Header | nib.Nifti2Header, shape: tuple[int, ...], name: str = "the file"
) -> tuple[np.ndarray, list[str], str]:
    """The voxel-to-world matrix in mm of a NIfTI header as stored in the file (unrepaired),
    and notes on what was wrong with it. The one place that decides a file's geometry.

    Order: the sform when sform_code > 0 and it is usable (finite, no zero row or column, not
    singular); else the qform when qform_code > 0 and its quaternion, offsets and pixdim are
    finite and valid; else pixdim alone (a diagonal matrix, origin at the first voxel, axes
    taken as R, A, S). Negative pixdim values count by their size. Spatial units of metres or
    microns (``xyzt_units``) are converted to mm; unknown units are taken as mm.

    Args:
        header: the header read without nibabel's repairs.
        shape: the data's shape (axes a 2D file lacks get 1 mm when pixdim has no size there).
        name: the file's name, for the error message.

    Returns:
        ((4, 4) float64 affine in mm, notes, form used): a note for every fallback taken; the
        form is "sform", "qform" or "pixdim".

    Raises:
        InputError: no form is usable and pixdim has zero or non-finite voxel sizes (one line
            naming the file and the fields).
    """
    notes: list[str] = []
    problems: list[str] = []
    raw_zooms = np.asarray(header["pixdim"][1:4], dtype=np.float64)
    ndim = len(shape)
    zooms = np.array(
        [
            abs(z) if (math.isfinite(z) and z != 0) or i < ndim else 1.0
            for i, z in enumerate(raw_zooms)
        ]
    )
    pixdim_bad = not np.all(np.isfinite(zooms) & (zooms > 0))
    pixdim_why = "pixdim has zero or non-finite voxel sizes " + str(raw_zooms.tolist())
    affine: np.ndarray | None = None
    used = ""
    s_code, q_code = int(header["sform_code"]), int(header["qform_code"])
    if s_code > 0:
        sform = np.asarray(header.get_sform(), dtype=np.float64)
        why = _matrix_problem(sform, ("srow_x", "srow_y", "srow_z"))
        if why is None:
            affine, used = sform, "sform"
        else:
            problems.append(f"the sform (sform_code {s_code}) {why}")
    if affine is None and q_code > 0:
        qform, why = (
            (None, "lacks voxel sizes") if pixdim_bad else _quaternion_affine(header, zooms)
        )
        if qform is not None:
            why = _matrix_problem(qform, ("x", "y", "z"))
        if why is None:
            affine, used = qform, "qform"
        else:
            problems.append(f"the qform (qform_code {q_code}) {why}")
    if affine is None:
        if pixdim_bad:
            problems.append(pixdim_why)
            raise InputError(f"{name} has no usable voxel geometry: {'; '.join(problems)}")
        affine, used = np.diag([*zooms, 1.0]), "pixdim"
    if problems:
        instead = {
            "qform": "the qform was used instead",
            "pixdim": f"voxel sizes were taken from pixdim ({_PIXDIM_ONLY})",
        }[used]
        notes.append(f"{'; '.join(problems)}: {instead}")
    elif used == "pixdim":
        notes.append(
            f"the header has no sform or qform: voxel sizes were taken from pixdim ({_PIXDIM_ONLY})"
        )
    if used != "sform" and np.any(raw_zooms[:ndim] < 0):
        notes.append("pixdim has negative voxel sizes: their absolute values were used")
    unit = int(header["xyzt_units"]) & 0x07
    if unit in _MM_PER_UNIT:
        affine = affine.copy()
        affine[:3, :] *= _MM_PER_UNIT[unit]
        size = " x ".join(f"{v:.4g}" for v in np.linalg.norm(affine[:3, :3], axis=0))
        notes.append(
            f"the header gives spatial units in {_UNIT_NAMES[unit]} (xyzt_units): converted "
            f"to mm, voxel size {size} mm"
        )
    return np.asarray(affine, dtype=np.float64), notes, used


class _AnyGeometryHeader(nib.Nifti1Header):
    """A header that lets nibabel open a file whose stored geometry it cannot compute (a
    garbage quaternion); :func:`header_affine` decides the geometry instead."""

    def get_best_affine(self) -> np.ndarray:
        return np.eye(4)


class _AnyGeometryHeader2(_AnyGeometryHeader, nib.Nifti2Header):
    pass


class _AnyGeometryImage(nib.Nifti1Image):
    header_class = _AnyGeometryHeader


class _AnyGeometryImage2(nib.Nifti2Image):
    header_class = _AnyGeometryHeader2


def _open_nifti(p: Path) -> tuple[nib.Nifti1Image | nib.Nifti2Image, Any]:
    """Open a NIfTI file: (the image, its header as stored, without nibabel's repairs).

    Raises:
        InputError: missing, a folder, not named .nii/.nii.gz, or not readable as NIfTI.
    """
    if not p.exists():
        raise InputError(f"no such file: {p}")
    if p.is_dir():
        raise InputError(f"{p} is a folder, not a NIfTI file")
    if not is_nifti_path(p):
        raise InputError(f"{p.name} is not a NIfTI file (expected .nii or .nii.gz)")
    # nibabel logs its silent repairs; header_affine reports what it changes instead
    log = nib.imageglobals.logger
    was_disabled, log.disabled = log.disabled, True
    try:
        try:
            img = nib.load(str(p))
        except Exception as exc:  # nibabel raises many types for broken files
            img = None
            for klass in (_AnyGeometryImage, _AnyGeometryImage2):
                try:  # a stored geometry nibabel cannot compute: header_affine judges it
                    img = klass.from_filename(str(p))
                    break
                except Exception:
                    continue
            if img is None:
                raise InputError(f"cannot read {p.name} as NIfTI: {exc}") from exc
    finally:
        log.disabled = was_disabled
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(f"{p.name} is a {type(img).__name__}, not a NIfTI image")
    try:
        with img.file_map["image"].get_prepare_fileobj("rb") as fh:
            raw = type(img.header).from_fileobj(fh, check=False)
    except Exception as exc:
        raise InputError(f"cannot read {p.name} as NIfTI: {exc}") from exc
    return img, raw


def _plain_header(header: Any) -> nib.Nifti1Header | nib.Nifti2Header:
    """A copy of a loaded header as nibabel's own class."""
    if type(header) in (nib.Nifti1Header, nib.Nifti2Header):
        return header.copy()
    cls = nib.Nifti2Header if isinstance(header, nib.Nifti2Header) else nib.Nifti1Header
    return cls(header.binaryblock, check=False, extensions=header.extensions)


def _spatial_shape(img: Any, p: Path) -> tuple[int, ...]:
    """The image's shape without trailing singleton axes beyond the third.

    Raises:
        InputError: more than 4 dimensions remain.
    """
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 4:
        raise InputError(f"{p.name} has {len(shape)} dimensions {shape}; expected 3D or 4D")
    return shape


def _check_size(p: Path, voxels: int, max_bytes: int | None) -> None:
    limit = available_memory_bytes() // 2 if max_bytes is None else max_bytes
    if voxels * 4 > limit:
        raise InputError(
            f"{p.name} has {voxels:,} voxels ({voxels * 4 / 2**30:.1f} GiB as float32), more than "
            f"the {limit / 2**30:.1f} GiB allowed; crop or downsample it first"
        )


def _read_data(img: Any, p: Path, index: Any, shape: tuple[int, ...]) -> np.ndarray:
    try:
        return np.asarray(np.asanyarray(img.dataobj[index]).reshape(shape))
    except (EOFError, OSError, ValueError, zlib.error) as exc:
        raise InputError(f"{p.name} is truncated or corrupted: {exc}") from exc


def load_volume(
    path: str | os.PathLike,
    volume_index: int | None = None,
    max_bytes: int | None = None,
    *,
    scorable: bool = True,
) -> Volume:
    """Read a ``.nii`` / ``.nii.gz`` scan as one 3D volume.

    The geometry is checked and repaired by :func:`header_affine` (notes say what was used).

    Args:
        path: the file.
        volume_index: which volume of a 4D file to take. A 4D file with one volume needs none.
        max_bytes: refuse scans whose float32 copy would exceed this (default: half the memory
            the system has available).
        scorable: False allows a constant image (to view it, or for masks); the data is still
            float32 (X, Y, Z) with non-finite voxels replaced, but gaps are not filled.

    Raises:
        InputError: missing, corrupted or non-NIfTI file; 4D without ``volume_index``; too
            large; no usable voxel geometry; constant (when ``scorable``).
    """
    p = Path(path)
    img, raw = _open_nifti(p)
    shape = _spatial_shape(img, p)
    notes: list[str] = []
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
    elif volume_index not in (None, 0, -1):
        raise InputError(f"{p.name} is 3D: it has no volume {volume_index} (only 4D files do)")
    affine, geometry = header_affine(raw, shape[:3], p.name)
    _check_size(p, int(np.prod(shape[:3])), max_bytes)
    if len(shape) == 4:
        raw_data = _read_data(img, p, (..., volume_index), shape[:3])
    else:
        raw_data = _read_data(img, p, ..., shape)
    arr, more, _, missing = as_scorable_array(raw_data, constant_ok=not scorable, fill=scorable)
    return Volume(
        arr,
        affine,
        _plain_header(img.header),
        p,
        str(img.get_data_dtype()),
        (*geometry, *notes, *more),
        missing,
    )


def load_image(path: str | os.PathLike, max_bytes: int | None = None) -> Volume:
    """Read a ``.nii`` / ``.nii.gz`` file whole, for viewing: every volume of a 4D file, and
    constant images too.

    Returns:
        a :class:`Volume` whose data is float32 (X, Y, Z) or (X, Y, Z, T) (a 2D image gets a
        trailing axis of length 1, trailing singleton axes beyond the fourth are dropped),
        non-finite voxels replaced, the geometry as :func:`header_affine` decides it.

    Raises:
        InputError: missing, corrupted or non-NIfTI file; more than 4 dimensions; too large
            (``max_bytes``, default half the available memory); no usable voxel geometry.
    """
    p = Path(path)
    img, raw = _open_nifti(p)
    shape = _spatial_shape(img, p)
    if len(shape) < 2:
        raise InputError(f"{p.name} has {len(shape)} dimension(s) {shape}; expected 2D to 4D")
    affine, geometry = header_affine(raw, shape[:3], p.name)
    if len(shape) == 2:
        shape = (*shape, 1)
    _check_size(p, int(np.prod(shape)), max_bytes)
    arr, more, missing = _float_image(_read_data(img, p, ..., shape), constant_ok=True)
    header = _plain_header(img.header)
    return Volume(arr, affine, header, p, str(img.get_data_dtype()), (*geometry, *more), missing)


def _output_image(array: np.ndarray, like: Volume, kind: Literal["map", "mask"]) -> nib.Nifti1Image:
    if kind == "mask":
        data = np.asarray(array).astype(np.uint8, copy=False)
        dtype = np.uint8
    elif kind == "map":  # float16 maps stay so until nibabel writes them as float32
        data = np.asarray(array)
        if data.dtype not in (np.float32, np.float16):
            data = data.astype(np.float32)
        dtype = np.float32
    else:
        raise ValueError(f"kind must be 'map' or 'mask', not {kind!r}")
    if data.shape != like.shape:
        raise InputError(f"array shape {data.shape} differs from the scan's {like.shape}")
    header = like.header.copy() if like.header is not None else nib.Nifti1Header()
    affine: np.ndarray | None = like.affine
    if orientation_unknown(like):
        # the scan's header gives no orientation: the output's gives none either (pixdim and
        # units as the scan's), so that every reader, with its own assumption for such a file,
        # puts the output where it puts the scan
        header["sform_code"], header["qform_code"] = 0, 0
        affine = None
    else:
        # the geometry actually used (a repaired header's too), in both forms, in mm
        has_codes = like.header is not None
        codes = [int(header[k]) for k in ("sform_code", "qform_code")] if has_codes else []
        code = next((c for c in codes if c > 0), 2)
        header.set_sform(like.affine, code)
        header.set_qform(like.affine, code)
        header["xyzt_units"] = 2 | (int(header["xyzt_units"]) & 0x38)  # mm; time unit kept
    header.set_intent("label" if kind == "mask" else "none")
    if like.header is not None and int(header["dim"][0]) == 2 and data.shape[2] == 1:
        data = data[:, :, 0]  # a 2D scan gets 2D outputs, so that its shape matches theirs
    klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    img = klass(data, affine, header)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"] = 0
    img.header["cal_max"] = 0
    return img


def _exists(path: Path) -> bool:
    """True when something (even a broken link) is at ``path``; False when it cannot be seen."""
    return os.path.lexists(path)


def default_output_folder(scan: str | os.PathLike | None) -> Path:
    """Where a scan's outputs go when no folder is given: beside the scan's file; for a scan with
    no file, or one inside this package (the bundled samples), the current folder when it is
    writable and outside the package, else the home folder. Never inside the package."""
    package = Path(__file__).resolve().parent
    if scan is not None and not _inside(Path(scan), package):
        return Path(scan).resolve().parent
    cwd = Path.cwd()
    return cwd if os.access(cwd, os.W_OK) and not _inside(cwd, package) else Path.home()


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder)
    except OSError:
        return False


def check_output_folder(folder: str | os.PathLike) -> Path:
    """Make sure ``folder`` can take output files, before any work is done: create it when it is
    missing, create and delete a temporary file in it, remove again the folders it created (the
    writers make them when they write, so a run refused later leaves nothing), and roll back what
    a killed run left in it (:func:`discard_interrupted`). Returns it as a Path.

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
    created = [d for d in (p, *p.parents) if not _exists(d)]
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError.from_os(p, exc, "create the output folder") from None
    try:
        try:
            fd, probe = tempfile.mkstemp(prefix=".vaeloc-probe-", dir=p)
        except OSError as exc:
            raise OutputError.from_os(p, exc, "write to the output folder") from None
        os.close(fd)
        try:
            os.unlink(probe)
        except OSError as exc:
            raise OutputError.from_os(p, exc, "write to the output folder") from None
    finally:
        for d in created:  # the writers create it again when they write; a refusal leaves nothing
            try:
                d.rmdir()
            except OSError:
                break
    discard_interrupted(p)
    return p


def _refuse_folder(path: Path) -> None:
    if os.path.isdir(path):
        raise OutputError(path, f"cannot write {path}: a folder of that name is in the way")


def refuse_existing(
    paths: Iterable[str | os.PathLike], overwrite: bool, what: str = "file"
) -> None:
    """Check a set of targets before any is written, so that a refusal writes none. What a
    killed run left in their folders is rolled back first (:func:`discard_interrupted`).

    Raises:
        OutputError: one of ``paths`` is a folder (even with ``overwrite``).
        OutputExistsError: some of ``paths`` exist and ``overwrite`` is false (``.paths`` lists
            them).
    """
    targets = [Path(p) for p in paths]
    for folder in dict.fromkeys(p.parent for p in targets):
        discard_interrupted(folder)
    for p in targets:
        _refuse_folder(p)
    existing = [p for p in targets if _exists(p)]
    if existing and not overwrite:
        raise OutputExistsError(existing, what)


# A set of files is written into a hidden staging folder beside its targets, then moved into
# place. The staging folder keeps a hard link to every file moved (and to every file it
# replaced), so that a failed set, or the leftover of a killed run, can be rolled back: a target
# that is still the same file as its staged copy came from that set. A lock held for the life
# of the set tells a live run's staging folder from a killed run's.
_STAGING_PREFIX = ".vaeloc-partial-"
_LOCK = ".vaeloc-lock"
_REPLACED = ".vaeloc-replaced"
_SWAP = ".vaeloc-swap"
_UNLOCKED_GRACE_S = 60.0  # a staging folder without a lock file yet: its run may be starting

try:
    import fcntl
except ImportError:  # Windows: leftovers are recognised by age only
    fcntl = None  # type: ignore[assignment]


def _discard(path: Path) -> None:
    try:
        if _exists(path):
            path.unlink()
    except OSError:
        pass


class _Staging:
    """One staging folder, ``<parent>/.vaeloc-partial-XXXX``, locked while this run lives.

    Raises:
        OutputError: the folder cannot be created or written.
    """

    def __init__(self, parent: Path) -> None:
        self.parent = parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError.from_os(parent, exc, "create the folder") from None
        try:
            self.path = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=parent))
        except OSError as exc:
            raise OutputError.from_os(parent, exc, "write to the folder") from None
        try:
            self._fd = os.open(self.path / _LOCK, os.O_CREAT | os.O_RDWR, 0o600)
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
        except OSError as exc:
            shutil.rmtree(self.path, ignore_errors=True)
            raise OutputError.from_os(parent, exc, "write to the folder") from None

    def roll_back(self) -> None:
        _roll_back(self.path, self.parent)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)  # the lock goes last
        os.close(self._fd)


def _roll_back(staging: Path, parent: Path) -> None:
    """Undo what a set moved into place: a target that is still its staged file is removed, or
    given back the file it replaced."""
    try:
        names = [n for n in os.listdir(staging) if not n.startswith(".vaeloc-")]
    except OSError:
        return
    for name in names:
        dest, old = parent / name, staging / _REPLACED / name
        try:
            if _exists(dest) and os.path.samefile(staging / name, dest):
                if _exists(old):
                    os.replace(old, dest)
                else:
                    dest.unlink()
        except OSError:
            pass


def discard_interrupted(folder: str | os.PathLike) -> None:
    """Roll back and remove what killed runs left in ``folder``: their staging folders, and
    any file of their set already moved into place (so a rerun needs no overwrite). Staging
    folders of live runs are left alone. Never raises."""
    root = Path(folder)
    try:
        leftovers = [root / n for n in os.listdir(root) if n.startswith(_STAGING_PREFIX)]
    except OSError:
        return
    for staging in leftovers:
        try:
            fd = os.open(staging / _LOCK, os.O_RDWR)
        except FileNotFoundError:
            try:
                young = time.time() - staging.stat().st_mtime < _UNLOCKED_GRACE_S
            except OSError:
                continue
            if not young:
                _roll_back(staging, root)
                shutil.rmtree(staging, ignore_errors=True)
            continue
        except OSError:
            continue
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # a live run holds it
            elif time.time() - os.fstat(fd).st_mtime < 86400:
                continue
            _roll_back(staging, root)
            shutil.rmtree(staging, ignore_errors=True)
        finally:
            os.close(fd)


def _place(tmp: Path, dest: Path, overwrite: bool, staging: Path) -> None:
    """Move a staged file onto ``dest``, keeping it linked in ``staging`` (and the file it
    replaces in ``staging/.vaeloc-replaced``) for a roll-back. Without ``overwrite`` an
    existing file is never replaced, not even one that appeared meanwhile (a hard link claims
    the name). On file systems without hard links the file is renamed and cannot be rolled
    back.

    Raises:
        OutputExistsError: ``dest`` exists and ``overwrite`` is false.
        OutputError: ``dest`` is a folder, or the move failed.
    """
    _refuse_folder(dest)
    try:
        if not overwrite:
            try:
                os.link(tmp, dest)  # fails if dest appeared meanwhile: never clobbers
            except FileExistsError:
                raise OutputExistsError(dest) from None
            except OSError:  # file systems without hard links
                if _exists(dest):
                    raise OutputExistsError(dest) from None
                os.replace(tmp, dest)
            return
        if _exists(dest):
            try:
                (staging / _REPLACED).mkdir(exist_ok=True)
                os.link(dest, staging / _REPLACED / dest.name)
            except OSError:
                pass  # no hard links: the replaced file cannot be given back
        swap = staging / _SWAP
        try:
            os.link(tmp, swap)
        except OSError:
            os.replace(tmp, dest)
            return
        os.replace(swap, dest)
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
    (named like ``path``, so a writer sees its extension) in a hidden staging folder beside
    ``path``, which then takes its place, so the file appears whole or not at all. Without
    ``overwrite`` an existing file is never replaced, not even one that appears while
    writing (a hard link is used to claim the name). The new file gets the mode the user's
    umask asks for. Sets of files that must appear together go through :class:`WriteSet`.
    ``suffix`` is accepted for compatibility; the temporary file already ends like ``path``.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is false.
        OutputError: ``path`` is a folder (even with ``overwrite``), or its folder cannot be
            created or written (read-only, full disk): one line naming the path and the reason.
    """
    with WriteSet(overwrite) as ws:
        dest = ws.add(path, write)
    return dest


class WriteSet:
    """Write a set of files that must appear together, or none of them.

    Each :meth:`add` writes its file at once into a hidden staging folder beside its target
    (``.vaeloc-partial-XXXX``); when the ``with`` block ends without an error the targets
    are checked again and every staged file is moved into place. Any failure (a write, disk
    full, a target that appeared meanwhile, a move that fails) removes the staging folder and
    every file of the set already moved into place, and puts back the files that
    ``overwrite`` replaced, so no partial set is left. A run killed mid-way leaves only its
    staging folder (and, killed during the moves, some files of its set); the next check of
    that folder (:func:`check_output_folder`, :func:`refuse_existing`) rolls it back, so a
    rerun needs no overwrite.

        with WriteSet(overwrite) as ws:
            ws.add(path, lambda tmp: ...)
            ws.add_nifti(mask, volume, other_path, "mask")
    """

    def __init__(self, overwrite: bool = False) -> None:
        self.overwrite = overwrite
        self._staged: list[tuple[Path, Path]] = []
        self._staging: dict[Path, _Staging] = {}

    def add(self, path: str | os.PathLike, write: Callable[[Path], None], suffix: str = "") -> Path:
        """Stage ``path``, filled by ``write(tmp)``; returns its final path. ``suffix`` is
        accepted for compatibility (the staged file is named like ``path``).

        Raises:
            OutputExistsError: ``path`` exists and ``overwrite`` is false.
            OutputError: ``path`` is a folder, is already in the set, or cannot be written.
        """
        return self.add_all([(path, write)])[0]

    def add_all(
        self, items: list[tuple[str | os.PathLike, Callable[[Path], None]]], workers: int = 1
    ) -> list[Path]:
        """Stage several files, each ``(path, write)`` as in :meth:`add`, their writes on up to
        ``workers`` threads (compressing a ``.nii.gz`` releases the interpreter, so large maps
        are written side by side); every target is checked before any is written. On any
        failure none of them stays staged and the first error is raised. Returns the final
        paths, in order.

        Raises:
            OutputExistsError: a path exists and ``overwrite`` is false.
            OutputError: a path is a folder, is in the set twice, or cannot be written.
        """
        claimed: list[tuple[Path, Path, Callable[[Path], None]]] = []
        for path, write in items:
            dest = Path(path)
            _refuse_folder(dest)
            if _exists(dest) and not self.overwrite:
                raise OutputExistsError(dest)
            if any(d == dest for _, d in self._staged) or any(d == dest for d, _, _ in claimed):
                raise OutputError(dest, f"cannot write {dest} twice in one set")
            if dest.name.startswith(".vaeloc-"):
                raise OutputError(dest, f"cannot write {dest}: the name is reserved")
            staging = self._staging.get(dest.parent)
            if staging is None:
                staging = self._staging[dest.parent] = _Staging(dest.parent)
            claimed.append((dest, staging.path / dest.name, write))

        def write_one(dest: Path, tmp: Path, write: Callable[[Path], None]) -> None:
            try:
                write(tmp)
                make_readable(tmp)
            except OSError as exc:
                raise OutputError.from_os(dest, exc) from None

        errors: list[BaseException] = []
        if workers > 1 and len(claimed) > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(workers, len(claimed))) as pool:
                futures = [pool.submit(write_one, *c) for c in claimed]
            errors = [e for e in (f.exception() for f in futures) if e is not None]
        else:
            for c in claimed:
                try:
                    write_one(*c)
                except BaseException as exc:
                    errors.append(exc)
                    break
        if errors:
            for _, tmp, _ in claimed:
                _discard(tmp)
            raise errors[0]
        self._staged.extend((tmp, dest) for dest, tmp, _ in claimed)
        return [dest for dest, _, _ in claimed]

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

    def add_niftis(
        self,
        items: list[
            tuple[
                np.ndarray | Callable[[], np.ndarray],
                Volume,
                str | os.PathLike,
                Literal["map", "mask"],
            ]
        ],
        workers: int | None = None,
    ) -> list[Path]:
        """Stage several maps and masks, each ``(array, like, path, kind)`` as in
        :meth:`add_nifti`, written side by side on ``workers`` threads (default: the CPUs, at
        most 4) through :meth:`add_all`. ``array`` may be a function that makes it when its
        file is written (at most ``workers`` of them are then held at once)."""
        writes = [(path, _nifti_writer(a, like, path, kind)[0]) for a, like, path, kind in items]
        return self.add_all(writes, workers or min(4, os.cpu_count() or 1))

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
            OutputError: a target became a folder, or a move failed.
        """
        targets = self.paths
        try:
            refuse_existing(targets, self.overwrite, "file")
            try:
                for tmp, dest in self._staged:
                    _place(tmp, dest, self.overwrite, self._staging[dest.parent].path)
            except BaseException:
                for staging in self._staging.values():
                    staging.roll_back()
                raise
        finally:
            self.abort()
        return targets

    def abort(self) -> None:
        """Remove the staging folders; nothing staged is moved into place."""
        for staging in self._staging.values():
            staging.close()
        self._staging.clear()
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
    array: np.ndarray | Callable[[], np.ndarray],
    like: Volume,
    path: str | os.PathLike,
    kind: Literal["map", "mask"],
) -> tuple[Callable[[Path], None], str]:
    """``(write(tmp), suffix)`` that saves a map or mask as :func:`save_nifti` does. ``array``
    may be a function that makes it: it is then made when the file is written, and let go
    with it.

    Raises:
        InputError: the name does not end in .nii/.nii.gz, or the shape differs from the scan's
            (for a function: when it is written).
    """
    dest = Path(path)
    if not is_nifti_path(dest):
        raise InputError(f"output name must end in .nii or .nii.gz: {dest.name}")
    suffix = ".nii.gz" if str(dest).lower().endswith(".gz") else ".nii"
    if callable(array):
        make = array
        return (lambda tmp: write_nifti(_output_image(make(), like, kind), tmp)), suffix
    img = _output_image(array, like, kind)
    return (lambda tmp: write_nifti(img, tmp)), suffix


def write_nifti(img: nib.Nifti1Image | nib.Nifti2Image, path: str | os.PathLike) -> None:
    """Save a single-file NIfTI image to ``path``; gzip-compressed when the name ends in
    ``.gz``.

    The compression is zlib's at level 1 with its run-length strategy (``Z_RLE``): on float32
    maps 2.5x as fast as the default strategy nibabel uses, for files 2-6 % larger (float
    mantissas offer deflate's string matching little beyond runs of zeros); any gzip reader
    reads it. The gzip header's time stamp is 0, so the same data gives the same bytes.

    Raises:
        OSError: the file cannot be written.
    """
    if not str(path).lower().endswith(".gz"):
        nib.save(img, str(path))
        return
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=0) as gz,
    ):
        # GzipFile takes no strategy: its compressor is replaced before the first byte
        gz.compress = zlib.compressobj(
            1, zlib.DEFLATED, -zlib.MAX_WBITS, zlib.DEF_MEM_LEVEL, zlib.Z_RLE
        )
        img.to_stream(gz)


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
