"""napari reader for NIfTI scans (``.nii`` / ``.nii.gz``).

A layer's world coordinates are the file's world coordinates: scanner millimetres, RAS+, world
axes in the order x, y, z, for any voxel order and any affine (flips, rotations, shear). The
voxel sizes are the layer's ``scale`` and the rest of the NIfTI affine is its ``affine``.

napari draws a 2D slice along world axes and cannot draw a layer whose axes are swapped by its
affine (e.g. a scan stored in LIA order), so the file's axes are put in the order of the world
axes they run closest to (a view, no copy); a 4D file's volume axis comes first. The file's
affine, header, shape and that axis order travel in ``layer.metadata`` so that the writer and the
widget restore the file's own voxel order and geometry.

A file whose header says it holds labels (NIfTI intent "label", as the plugin's masks do), or an
integer file holding only 0 and 1, opens as a Labels layer.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import nibabel as nib
import numpy as np

from ._writer import MISSING_KEY, N_VOLUMES_KEY, VOLUME_AXIS_KEY, VOXEL_AXES_KEY
from .io import Volume, is_nifti_path, scan_stem

LayerData = tuple[Any, ...]
#: napari's "nothing to show" value for a reader: no layer, no error
NULL_LAYER: list[LayerData] = [(None,)]


def layer_axes(affine: np.ndarray, n_spatial: int) -> tuple[int, ...]:
    """For each spatial layer axis, the file axis shown on it: the first ``n_spatial`` file axes
    sorted by the world axis (x, y, z) each runs closest to (file order if that is unclear)."""
    world = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))[:n_spatial, 0]
    if np.any(np.isnan(world)):
        return tuple(range(n_spatial))
    return tuple(int(i) for i in np.argsort(world, kind="stable"))


def layer_matrix(affine: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """The data-to-world matrix of spatial layer data whose axis k is file axis ``axes[k]``:
    4x4 for 3D; 3x3 for 2D, whose world axes are the two the file axes run closest to."""
    a = np.asarray(affine, dtype=np.float64)
    n = len(axes)
    if n == 3:
        return a[:, [*axes, 3]]
    rows = sorted(int(r) for r in nib.orientations.io_orientation(a)[list(axes), 0])
    if len(set(rows)) != n:  # an unclear orientation: the file's first two world axes
        rows = list(range(n))
    return np.vstack([a[np.ix_(rows, [*axes, 3])], np.eye(n + 1)[-1]])


def geometry_kwargs(volume: Volume, n_spatial: int) -> dict[str, Any]:
    """Layer keyword arguments (scale, affine, units, metadata) for a volume shown with
    ``n_spatial`` (2 or 3) spatial axes, and a leading volume axis when its data are 4D.

    ``scale`` holds the voxel sizes (mm, 1 for the volume axis) and ``affine`` the rest of the
    NIfTI affine, so that napari's data-to-world transform is the file's affine (with the layer's
    axis order, see :func:`layer_axes`).
    """
    axes = layer_axes(volume.affine, n_spatial)
    spatial = layer_matrix(volume.affine, axes)
    scale = np.sqrt((spatial[:-1, :-1] ** 2).sum(axis=0))
    scale = np.where(scale > 0, scale, 1.0)
    n_vol = volume.data.shape[3] if volume.data.ndim == 4 else 0
    lead = 1 if n_vol else 0
    full = np.eye(n_spatial + 1 + lead)
    full[lead:, lead:] = spatial
    full_scale = np.concatenate([np.ones(lead), scale])
    metadata: dict[str, Any] = {
        "affine": np.asarray(volume.affine, dtype=np.float64),
        "header": volume.header,
        "source_path": str(volume.path) if volume.path else None,
        "source_shape": tuple(volume.data.shape),
        VOXEL_AXES_KEY: axes,
    }
    if volume.missing is not None:  # the file's NaN / infinite voxels, in its voxel order
        metadata[MISSING_KEY] = volume.missing
    if n_vol:
        metadata[VOLUME_AXIS_KEY] = 0
        metadata[N_VOLUMES_KEY] = int(n_vol)
    return {
        "scale": tuple(float(s) for s in full_scale),
        "affine": full @ np.diag([*(1.0 / full_scale), 1.0]),
        "units": ("pixel",) * lead + ("mm",) * n_spatial,
        "metadata": metadata,
    }


def _label_data(volume: Volume) -> np.ndarray | None:
    """The volume's data as integer labels when the file holds labels, else None."""
    data = volume.data
    header = volume.header
    intent = header.get_intent()[0] if hasattr(header, "get_intent") else ""
    integer_file = np.issubdtype(np.dtype(volume.source_dtype), np.integer) or (
        volume.source_dtype == "bool"
    )
    if intent != "label" and not (
        integer_file and data.max() == 1 and bool(np.all((data == 0) | (data == 1)))
    ):
        return None
    if not np.array_equal(data, np.round(data)):
        return None
    lo, hi = float(data.min()), float(data.max())
    if lo >= 0 and hi <= 255:
        return data.astype(np.uint8)
    if -(2**31) <= lo and hi < 2**31:
        return data.astype(np.int32)
    return None


def volume_layer_data(volume: Volume, name: str | None = None) -> LayerData:
    """One layer tuple for a volume: Image, or Labels for a file of labels.

    Data (X, Y, Z) become a 3D layer, (X, Y, 1) a 2D layer and (X, Y, Z, T) a 4D layer with
    the volume axis first, (T, X, Y, Z); the spatial axes in the order of :func:`layer_axes`.
    """
    data = volume.data
    n_spatial = 2 if data.ndim == 3 and data.shape[2] == 1 else 3
    kwargs = geometry_kwargs(volume, n_spatial)
    kwargs["name"] = name or scan_stem(volume.path)
    axes = kwargs["metadata"][VOXEL_AXES_KEY]
    labels = _label_data(volume)
    kind = "labels" if labels is not None else "image"
    arr = labels if labels is not None else data
    if n_spatial == 2:
        arr = arr[:, :, 0]
    arr = np.transpose(arr, (3, *axes) if arr.ndim == 4 else axes)
    if kind == "image":
        lo, hi = float(arr.min()), float(arr.max())
        fg = arr[arr > lo]
        if fg.size:
            top = float(np.percentile(fg[:: max(1, fg.size // 200_000)], 99.5))
            hi = max(top, lo + 1e-6)
        kwargs["contrast_limits"] = (lo, hi if hi > lo else lo + 1.0)
    return (arr, kwargs, kind)


def read_nifti(path: str | os.PathLike | list) -> list[LayerData]:
    """Read one or more NIfTI files; an unreadable file gives a notification, not an exception.

    Opened into an empty viewer, the first layer is shown axially (:mod:`._view`)."""
    from napari.utils.notifications import show_error

    from ._view import axial_view_when_added
    from .errors import VaelocError
    from .io import load_image

    paths = path if isinstance(path, list) else [path]
    layers: list[LayerData] = []
    for p in paths:
        try:
            layers.append(volume_layer_data(load_image(p)))
        except VaelocError as exc:
            show_error(f"napari-vaeloc: {exc}")
    if not layers:
        return NULL_LAYER
    axial_view_when_added()
    return layers


def napari_get_reader(path: str | list[str]) -> Callable[..., list[LayerData]] | None:
    """Return :func:`read_nifti` for NIfTI paths, None (quickly, without reading) otherwise."""
    paths = path if isinstance(path, list) else [path]
    if not paths or not all(isinstance(p, str | os.PathLike) and is_nifti_path(p) for p in paths):
        return None
    return read_nifti
