"""napari writers: Image and Labels layers to NIfTI in the scan's original geometry.

A layer read by this plugin (or produced by its widget) carries the scan's affine, header, shape
and the file axis shown on each layer axis in ``metadata``; the data go back into the file's
voxel order and are written with that affine and header. A layer without them (one made with
napari's "new labels" button, or read by another plugin) is written as it is, with the affine of
the layer's full data-to-world transform (``affine`` after ``translate``, ``rotate``, ``shear``
and ``scale``), so it lands where napari shows it.

This module does not import napari: it works on the layer attributes napari passes to writers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .io import Volume, save_nifti

#: metadata keys this plugin sets on layers (besides "affine", "header", "source_path" and
#: "source_shape"): the file axis shown on each spatial layer axis; where a 4D file's volume
#: axis lies in the layer (always first) and how many volumes it has
VOXEL_AXES_KEY = "voxel_axes"
VOLUME_AXIS_KEY = "volume_axis"
N_VOLUMES_KEY = "n_volumes"
#: the file's voxels without data (NaN or infinite: bool, the file's voxel order and shape),
#: when it has any, so that a run leaves them out (``Volume.missing``)
MISSING_KEY = "missing_voxels"


def shear_matrix(shear: Any, n: int) -> np.ndarray:
    """napari's shear (upper-triangular values, row by row, or a full matrix) as an n x n matrix."""
    sh = np.asarray(shear if shear is not None else [], dtype=np.float64)
    if sh.ndim == 2:
        out = np.eye(n)
        out[n - sh.shape[0] :, n - sh.shape[1] :] = sh
        return out
    m = round((1 + float(np.sqrt(1 + 8 * sh.size))) / 2) if sh.size else 1
    tri = np.eye(m)
    tri[np.triu_indices(m, 1)] = sh
    out = np.eye(n)
    out[n - m :, n - m :] = tri
    return out


def _embed(mat: Any, n: int) -> np.ndarray:
    """A square matrix placed in the bottom-right corner of an n x n identity."""
    a = np.asarray(mat if mat is not None else np.eye(n), dtype=np.float64)
    out = np.eye(n)
    k = min(n, a.shape[0])
    out[n - k :, n - k :] = a[-k:, -k:]
    return out


def _vector(values: Any, n: int, fill: float) -> np.ndarray:
    v = np.asarray(values if values is not None else [], dtype=np.float64).ravel()[-n:]
    return np.concatenate([np.full(n - v.size, fill), v])


def data_to_world(meta: Mapping[str, Any], ndim: int) -> np.ndarray:
    """A layer's full data-to-world matrix, (ndim + 1) x (ndim + 1), composed as napari does:
    ``affine @ [rotate @ shear @ diag(scale) | translate]``, from the attributes napari passes
    to writers (``scale``, ``translate``, ``rotate``, ``shear``, ``affine``; missing ones are the
    identity)."""
    scale = _vector(meta.get("scale"), ndim, 1.0)
    inner = np.eye(ndim + 1)
    inner[:ndim, :ndim] = (
        _embed(meta.get("rotate"), ndim) @ shear_matrix(meta.get("shear"), ndim) @ np.diag(scale)
    )
    inner[:ndim, ndim] = _vector(meta.get("translate"), ndim, 0.0)
    return _embed(meta.get("affine"), ndim + 1) @ inner


def _spatial_block(matrix: np.ndarray, n_spatial: int) -> np.ndarray:
    """The (n_spatial + 1)-square part of a homogeneous matrix for its last ``n_spatial`` axes."""
    keep = list(range(matrix.shape[0] - 1 - n_spatial, matrix.shape[0]))
    return matrix[np.ix_(keep, keep)]


def _as_4x4(matrix: np.ndarray) -> np.ndarray:
    """A 2D (3x3) or 3D (4x4) homogeneous matrix as a NIfTI 4x4 affine (2D: z is the identity)."""
    if matrix.shape == (4, 4):
        return matrix
    out = np.eye(4)
    out[:2, :2] = matrix[:2, :2]
    out[:2, 3] = matrix[:2, 2]
    return out


def voxel_axes(md: Mapping[str, Any] | None, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The file axis shown on each axis of spatial layer data of ``shape`` (2D or 3D), when the
    plugin's metadata (the file's affine, and its shape when recorded) is there and fits that
    shape; None otherwise."""
    md = md or {}
    aff, src = md.get("affine"), md.get("source_shape")
    if aff is None or np.shape(aff) != (4, 4) or len(shape) not in (2, 3):
        return None
    axes = tuple(int(a) for a in md.get(VOXEL_AXES_KEY, range(len(shape))))
    if sorted(axes) != list(range(len(shape))):
        return None
    file_shape = tuple(shape[axes.index(i)] for i in range(len(shape)))
    if src is not None and file_shape + (1,) * (3 - len(shape)) != tuple(src)[:3]:
        return None
    return axes


def file_geometry(data: Any, meta: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, Any]:
    """``(data, affine, header)`` of layer data as a NIfTI file holds them.

    Args:
        data: layer data, shape (X, Y) or (X, Y, Z) in the layer's axis order, or (T, X, Y, Z)
            for a 4D layer (volume axis first, as the reader gives it).
        meta: the layer attributes napari passes to writers (``metadata``, ``scale``,
            ``translate``, ``rotate``, ``shear``, ``affine``); only their spatial (last) axes
            are used.

    Returns:
        With the plugin's metadata: the data in the file's voxel order ((X, Y, Z, T) for 4D),
        the file's affine (mm) and header. Without: the data in the layer's order (4D: the
        volume axis moved last), the 4x4 affine of the layer's data-to-world transform (2D: the
        z axis is the identity) and None.

    Raises:
        ValueError: the data are not 2D, 3D or 4D.
    """
    arr = np.asarray(data)
    if arr.ndim not in (2, 3, 4):
        raise ValueError(f"can only write 2D, 3D or 4D layers as NIfTI, not shape {arr.shape}")
    lead = 1 if arr.ndim == 4 else 0
    n_spatial = arr.ndim - lead
    md = meta.get("metadata") or {}
    axes = voxel_axes(md, arr.shape[lead:])
    if axes is not None:
        arr = np.transpose(arr, (*range(lead), *(lead + int(a) for a in np.argsort(axes))))
        affine, header = np.asarray(md["affine"], dtype=np.float64), md.get("header")
    else:
        layer_ndim = len(np.asarray(meta.get("scale", [1.0] * arr.ndim)).ravel())
        full = data_to_world(meta, max(layer_ndim, arr.ndim))
        affine, header = _as_4x4(_spatial_block(full, n_spatial)), None
    return (np.moveaxis(arr, 0, -1) if lead else arr), affine, header


def as_volume(data: Any, meta: dict[str, Any]) -> Volume:
    """A :class:`Volume` holding a layer's data (in the file's voxel order, see
    :func:`file_geometry`) and geometry; 2D data get a trailing axis.

    Raises:
        ValueError: the layer is not 2D, 3D or 4D.
    """
    arr, affine, header = file_geometry(data, meta)
    if arr.ndim == 2:
        arr = arr[:, :, None]
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
