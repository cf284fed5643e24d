"""napari writers: Image and Labels layers to NIfTI in the scan's original geometry.

A layer read by this plugin (or produced by its widget) carries the scan's affine and header in
``metadata``; those are written back unchanged. A layer without them is written with an affine
built from its ``scale`` and ``translate``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .io import Volume, save_nifti


def layer_affine(meta: dict[str, Any], shape: tuple[int, ...]) -> tuple[np.ndarray, Any]:
    """(affine, header) for a layer: from its metadata when they fit its shape, else from its
    scale and translate (axes beyond the third are ignored)."""
    md = meta.get("metadata") or {}
    aff = md.get("affine")
    src_shape = md.get("source_shape")
    shape3 = tuple(shape) + (1,) * (3 - len(shape))
    if (
        aff is not None
        and np.shape(aff) == (4, 4)
        and (src_shape is None or tuple(src_shape) == shape3)
    ):
        return np.asarray(aff, dtype=np.float64), md.get("header")
    scale = meta.get("scale")
    translate = meta.get("translate")
    scale = list(scale if scale is not None else [1.0] * len(shape))[-len(shape) :]
    translate = list(translate if translate is not None else [0.0] * len(shape))[-len(shape) :]
    affine = np.eye(4)
    for i in range(min(3, len(shape))):
        affine[i, i] = float(scale[i]) or 1.0
        affine[i, 3] = float(translate[i])
    return affine, None


def as_volume(data: Any, meta: dict[str, Any]) -> Volume:
    """A :class:`Volume` holding a layer's data and geometry (2D data gets a trailing axis)."""
    arr = np.asarray(data)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"can only write 2D or 3D layers as NIfTI, not shape {arr.shape}")
    affine, header = layer_affine(meta, arr.shape)
    return Volume(arr, affine, header)


def _write(path: str, data: Any, meta: dict[str, Any], kind: str) -> list[str]:
    vol = as_volume(data, meta)
    if kind == "mask" and (vol.data.min() < 0 or vol.data.max() > 255):
        kind = "map"  # label values beyond uint8: keep them exactly as float32
    # napari's save dialog has already asked before replacing a file
    out = save_nifti(vol.data, vol, os.fspath(path), kind=kind, overwrite=True)  # type: ignore[arg-type]
    return [str(out)]


def write_labels(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write a Labels layer as a uint8 NIfTI mask."""
    return _write(path, data, meta, "mask")


def write_image(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """Write an Image layer as a float32 NIfTI map."""
    return _write(path, data, meta, "map")
