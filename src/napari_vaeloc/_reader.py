"""napari reader for NIfTI scans (``.nii`` / ``.nii.gz``).

The layer shows the data in the file's voxel order with the voxel spacing as ``scale`` and the
origin as ``translate`` (mm). The exact affine and the header travel in ``layer.metadata`` so
that the writer and the widget can restore the scan's true geometry.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from .io import Volume, is_nifti_path, load_volume, scan_stem

LayerData = tuple[Any, ...]
#: napari's "nothing to show" value for a reader: no layer, no error
NULL_LAYER: list[LayerData] = [(None,)]


def geometry_kwargs(volume: Volume, ndim: int = 3) -> dict[str, Any]:
    """Layer keyword arguments (scale, translate, units, metadata) for a volume's geometry."""
    return {
        "scale": tuple(volume.spacing[:ndim]),
        "translate": tuple(volume.origin[:ndim]),
        "units": ("mm",) * ndim,
        "metadata": {
            "affine": np.asarray(volume.affine, dtype=np.float64),
            "header": volume.header,
            "source_path": str(volume.path) if volume.path else None,
            "source_shape": tuple(volume.shape),
        },
    }


def volume_layer_data(volume: Volume, name: str | None = None) -> LayerData:
    """One image layer tuple for a volume; a single-slice scan becomes a 2D layer."""
    data = volume.data
    ndim = 3
    if data.shape[2] == 1:
        data, ndim = data[:, :, 0], 2
    kwargs = geometry_kwargs(volume, ndim)
    kwargs["name"] = name or scan_stem(volume.path)
    fg = data[data > data.min()]
    if fg.size:
        lo, hi = np.percentile(fg[:: max(1, fg.size // 200_000)], [0.5, 99.5])
        kwargs["contrast_limits"] = (float(data.min()), float(max(hi, lo + 1e-6)))
    return (data, kwargs, "image")


def read_nifti(path: str | os.PathLike | list) -> list[LayerData]:
    """Read one or more NIfTI files; an unreadable file gives a notification, not an exception."""
    from napari.utils.notifications import show_error

    from .errors import VaelocError

    paths = path if isinstance(path, list) else [path]
    layers: list[LayerData] = []
    for p in paths:
        try:
            layers.append(volume_layer_data(load_volume(p)))
        except VaelocError as exc:
            show_error(f"napari-vaeloc: {exc}")
    return layers or NULL_LAYER


def napari_get_reader(path: str | list[str]) -> Callable[..., list[LayerData]] | None:
    """Return :func:`read_nifti` for NIfTI paths, None (quickly, without reading) otherwise."""
    paths = path if isinstance(path, list) else [path]
    if not paths or not all(isinstance(p, str | os.PathLike) and is_nifti_path(p) for p in paths):
        return None
    return read_nifti
