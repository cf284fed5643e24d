"""Finding NIfTI scans and their ground-truth masks in folders, for ``vaeloc evaluate scans``.

Two layouts:

- one folder, masks named like their scan plus a suffix (``case01.nii.gz`` +
  ``case01_mask.nii.gz``; suffixes ``_mask``, ``_seg``, ``_truth``, ``_label``);
- a scan folder and a mask folder (``--masks``), a mask with its scan's name (``.nii`` or
  ``.nii.gz``).

A scan without a mask is healthy: its truth is all zero. Masks are binarised (> 0).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from ..errors import InputError
from ..io import is_nifti_path, load_volume, scan_stem
from .runner import Case

MASK_SUFFIXES = ("_mask", "_seg", "_truth", "_label")


@dataclass(frozen=True)
class ScanPair:
    """A scan and its mask (None: healthy)."""

    scan: Path
    mask: Path | None = None

    @property
    def name(self) -> str:
        return scan_stem(self.scan)


def _nifti_files(folder: Path) -> dict[str, Path]:
    """stem -> file of the NIfTI files directly in ``folder`` (hidden files skipped)."""
    if not folder.exists():
        raise InputError(f"no such folder: {folder}")
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder")
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    if not entries:
        raise InputError(f"the folder {folder} is empty")
    out: dict[str, Path] = {}
    for p in entries:
        if p.is_file() and is_nifti_path(p):
            stem = scan_stem(p)
            if stem in out:
                raise InputError(f"{out[stem].name} and {p.name} in {folder} have the same name")
            out[stem] = p
    if not out:
        raise InputError(f"no NIfTI files (.nii or .nii.gz) in {folder}")
    return out


def _mask_base(stem: str) -> str | None:
    low = stem.lower()
    return next((stem[: -len(s)] for s in MASK_SUFFIXES if low.endswith(s)), None)


def _spatial_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a volume of this file shape is scored with: 2D gets a trailing 1, trailing
    singleton axes beyond the third are dropped."""
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return (*shape, 1) if len(shape) == 2 else shape


def _header_shape(path: Path) -> tuple[int, ...]:
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for broken files
        raise InputError(f"cannot read {path} as NIfTI: {exc}") from exc
    return _spatial_shape(img.shape)


def find_pairs(folder: str | os.PathLike, masks: str | os.PathLike | None = None) -> list[ScanPair]:
    """Scans in ``folder`` paired with their masks (sorted by name); checks from the headers
    that every file reads as NIfTI and that each mask has its scan's shape.

    Raises:
        InputError: missing or empty folder, no NIfTI files, a mask without its scan, two masks
            for one scan, an unreadable file (named), or a mask of another shape (both named).
    """
    files = _nifti_files(Path(folder))
    pairs: list[ScanPair] = []
    if masks is not None:
        mask_files = _nifti_files(Path(masks))
        pairs = [ScanPair(p, mask_files.get(stem)) for stem, p in files.items()]
    else:
        found: dict[str, Path] = {}
        for stem, p in files.items():
            base = _mask_base(stem)
            if base is None:
                continue
            if base not in files:
                raise InputError(
                    f"{p.name} is named like a mask, but there is no scan {base}.nii(.gz) next "
                    "to it"
                )
            if base in found:
                raise InputError(f"{base} has two masks: {found[base].name} and {p.name}")
            found[base] = p
        pairs = [
            ScanPair(p, found.get(stem)) for stem, p in files.items() if _mask_base(stem) is None
        ]
    for pair in pairs:
        shape = _header_shape(pair.scan)
        if len(shape) != 3:
            raise InputError(f"{pair.scan} has shape {shape}; evaluation needs 2D or 3D scans")
        if pair.mask is not None and _header_shape(pair.mask) != shape:
            raise InputError(
                f"mask {pair.mask} has shape {_header_shape(pair.mask)}, but its scan "
                f"{pair.scan} has {shape}"
            )
    return pairs


def load_mask(path: Path, shape: tuple[int, ...], scan: Path | None = None) -> np.ndarray:
    """A mask file as bool of ``shape`` (voxels > 0).

    Raises:
        InputError: unreadable file, or another shape (naming the scan when given).
    """
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel / zlib raise many types for broken files
        raise InputError(f"cannot read the mask {path}: {exc}") from exc
    if _spatial_shape(data.shape) != tuple(shape):
        of = f" of {scan}" if scan is not None else ""
        raise InputError(f"mask {path} has shape {data.shape}, not the shape {shape}{of}")
    return np.asarray(data).reshape(shape) > 0


def load_case(pair: ScanPair) -> Case:
    """The scan and its binarised mask (all zero without one) as a :class:`Case`; info holds
    name, scan, mask (None when healthy) and healthy."""
    volume = load_volume(pair.scan)
    if pair.mask is None:
        truth = np.zeros(volume.shape, bool)
    else:
        truth = load_mask(pair.mask, volume.shape, pair.scan)
    info = {
        "name": pair.name,
        "scan": str(pair.scan),
        "mask": str(pair.mask) if pair.mask is not None else None,
        "healthy": pair.mask is None,
    }
    return Case(volume, truth, info)


def iter_cases(pairs: Iterable[ScanPair]) -> Iterator[Case]:
    """Cases loaded one at a time, when asked for."""
    for pair in pairs:
        yield load_case(pair)
