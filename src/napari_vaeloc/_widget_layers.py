"""Public-API napari layer helpers for the widget: scan geometry from a layer, and result layers
that copy the input's geometry and are updated in place by name."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ._writer import (
    MISSING_KEY,
    N_VOLUMES_KEY,
    VOLUME_AXIS_KEY,
    file_geometry,
    shear_matrix,
    voxel_axes,
)

#: metadata key marking layers this plugin produced (they are not offered as input)
ROLE_KEY = "vaeloc_role"


def _spatial_data(layer: Any) -> Any:
    """The layer's data (its first level when multiscale)."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def _is_4d(layer: Any) -> bool:
    md = layer.metadata or {}
    return md.get(VOLUME_AXIS_KEY) == 0 or (
        np.ndim(_spatial_data(layer)) == 4 and not getattr(layer, "rgb", False)
    )


def n_volumes(layer: Any) -> int:
    """How many volumes a layer holds: the length of the first axis of a 4D layer (volume axis
    first, as the reader gives it), 1 for a 2D or 3D layer."""
    return int(np.shape(_spatial_data(layer))[0]) if _is_4d(layer) else 1


def _layer_meta(layer: Any) -> dict[str, Any]:
    """The layer attributes napari passes to writers, for :func:`_writer.file_geometry`."""
    return {
        "metadata": layer.metadata,
        "scale": layer.scale,
        "translate": layer.translate,
        "rotate": layer.rotate,
        "shear": layer.shear,
        "affine": layer.affine.affine_matrix,
    }


def scan_inputs(layer: Any, volume_index: int | None = None) -> dict[str, Any]:
    """Data and geometry for :meth:`Volume.from_array` from an Image layer (2D, 3D, or one
    volume of a 4D layer).

    Args:
        layer: a napari Image layer.
        volume_index: which volume of a 4D layer (volume axis first) to take, 0 to
            ``n_volumes(layer) - 1``; ignored for 2D and 3D layers.

    Returns:
        ``data`` (2D or 3D, in the file's voxel order when the layer carries this plugin's
        metadata, else in the layer's), ``affine`` (4x4, mm: the file's, else the layer's full
        data-to-world transform), ``header`` (or None), ``path`` (or None), ``shape``,
        ``missing`` (the file's voxels without data, as the reader found them, or None).

    Raises:
        ValueError: an RGB layer; a 4D layer without a volume index or with one out of range;
            data that are not 2D or 3D.
    """
    if getattr(layer, "rgb", False):
        raise ValueError(f"{layer.name} is an RGB image; choose a grayscale scan")
    data = _spatial_data(layer)
    if _is_4d(layer):
        n = n_volumes(layer)
        if volume_index is None or not 0 <= volume_index < n:
            given = "no volume was chosen" if volume_index is None else f"not {volume_index}"
            raise ValueError(f"{layer.name} holds {n} volumes: choose one, 0 to {n - 1} ({given})")
        data = data[volume_index]
    data = np.asarray(data)
    if data.ndim not in (2, 3):
        raise ValueError(
            f"{layer.name} has {data.ndim} dimensions {data.shape}; choose a 2D, 3D or 4D image"
        )
    data, affine, header = file_geometry(data, _layer_meta(layer))
    src = (layer.metadata or {}).get("source_path")
    missing = (layer.metadata or {}).get(MISSING_KEY)
    if missing is not None and np.ndim(missing) == 4 and volume_index is not None:
        missing = np.asarray(missing)[..., volume_index]
    return {
        "data": data,
        "affine": affine,
        "header": header,
        "path": Path(src) if src else None,
        "shape": data.shape,
        "missing": missing,
    }


def to_layer_order(like: Any, data: np.ndarray) -> np.ndarray:
    """Data given in the order :func:`scan_inputs` returned for ``like`` (the file's voxel
    order), put in the axis order of ``like``'s spatial data."""
    shape = tuple(np.shape(_spatial_data(like)))[1 if _is_4d(like) else 0 :]
    axes = voxel_axes(like.metadata, shape)
    return np.transpose(data, axes) if axes is not None and data.ndim == len(axes) else data


def geometry_of(layer: Any) -> dict[str, Any]:
    """Keyword arguments that place a new 2D or 3D layer exactly on ``layer``; on a 4D layer,
    on its spatial axes (the volume axis is left out)."""
    md = {
        k: v
        for k, v in (layer.metadata or {}).items()
        if k not in (ROLE_KEY, VOLUME_AXIS_KEY, N_VOLUMES_KEY, MISSING_KEY)
    }
    lead = 1 if _is_4d(layer) else 0
    if lead and md.get("source_shape") is not None:
        md["source_shape"] = tuple(md["source_shape"])[:3]
    n = layer.ndim - lead
    return {
        "scale": tuple(float(v) for v in layer.scale[lead:]),
        "translate": tuple(float(v) for v in layer.translate[lead:]),
        "rotate": np.asarray(layer.rotate)[lead:, lead:],
        "shear": shear_matrix(layer.shear, layer.ndim)[lead:, lead:][np.triu_indices(n, 1)],
        "affine": np.asarray(layer.affine.affine_matrix)[lead:, lead:],
        "units": tuple(layer.units)[lead:],
        "metadata": md,
    }


def put_layer(
    viewer: Any,
    kind: str,
    name: str,
    data: np.ndarray,
    like: Any,
    role: str,
    **kwargs: Any,
) -> Any:
    """Add an image/labels layer called ``name`` with ``like``'s geometry, or update the
    existing one in place (data, geometry and contrast limits; its display settings are kept).
    ``data`` are in the order :func:`scan_inputs` gave for ``like`` (:func:`to_layer_order`)."""
    data = to_layer_order(like, data)
    geom = geometry_of(like)
    geom["metadata"] = {**geom["metadata"], ROLE_KEY: role}
    from napari.layers import Image, Labels

    cls = Labels if kind == "labels" else Image
    existing = viewer.layers[name] if name in viewer.layers else None
    if existing is not None and (
        not isinstance(existing, cls) or existing.data.shape != data.shape
    ):
        viewer.layers.remove(existing)
        existing = None
    if existing is None:
        adder = viewer.add_labels if kind == "labels" else viewer.add_image
        return adder(data, name=name, **geom, **kwargs)
    existing.data = data  # napari refreshes the view itself
    for key in ("scale", "translate", "rotate", "shear", "affine", "units"):
        current = getattr(existing, key)
        if key == "affine":
            current = current.affine_matrix
        if key == "units" or np.shape(current) != np.shape(geom[key]):
            if tuple(current) != tuple(geom[key]):
                setattr(existing, key, geom[key])
        elif not np.allclose(current, geom[key]):
            setattr(existing, key, geom[key])
    old_md, new_md = existing.metadata, geom["metadata"]
    if old_md.keys() != new_md.keys() or not all(_same(old_md[k], new_md[k]) for k in new_md):
        existing.metadata = new_md
    if "contrast_limits" in kwargs and tuple(existing.contrast_limits) != tuple(
        kwargs["contrast_limits"]
    ):
        existing.contrast_limits = kwargs["contrast_limits"]
    return existing


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.shape(a) == np.shape(b) and bool(np.array_equal(a, b))
    try:
        return bool(a == b)
    except Exception:
        return False


def preparation_layer_data(
    prepared: Any, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray | None, float]:
    """What :func:`put_preparation_layers` shows, made off the GUI thread (whole-volume work:
    0.4 s at 600x600x400): the brain mask as uint8 of ``shape``, the bias-corrected brain
    (float32, None when preparation kept none) and its upper contrast limit (the brain's
    99.5th percentile)."""
    mask = np.asarray(prepared.brain_mask).reshape(shape).astype(np.uint8)
    corrected = getattr(prepared, "corrected", None)
    if corrected is None:
        return mask, None, 1.0
    data = np.asarray(corrected, np.float32).reshape(shape)
    inside = data[mask > 0]
    top = float(np.percentile(inside, 99.5)) if inside.size else 1.0
    return mask, data, max(top, 1e-6)


def put_preparation_layers(
    viewer: Any, shown: tuple[np.ndarray, np.ndarray | None, float], like: Any, base: str
) -> Iterator[Any]:
    """Show what preparation found on the scan ``like``: the brain mask ("<base> brain mask",
    Labels, just above the scan when new) and the bias-corrected brain ("<base> corrected brain",
    Image, hidden), both with ``like``'s geometry (:func:`put_layer`), from
    :func:`preparation_layer_data`'s ``shown``. A generator: it yields each layer as it is
    put, so that a caller can let the event loop turn in between (napari takes up to a tenth
    of a second for one layer of a large scan)."""
    mask, corrected, top = shown
    name = f"{base} brain mask"
    new = name not in viewer.layers
    layer = put_layer(viewer, "labels", name, mask, like, "brain mask", opacity=0.25)
    if new and like in viewer.layers:  # under the result maps, over the scan
        viewer.layers.move(viewer.layers.index(layer), viewer.layers.index(like) + 1)
    yield layer
    if corrected is not None:
        yield put_layer(
            viewer, "image", f"{base} corrected brain", corrected, like, "prepared",
            colormap="gray", visible=False, contrast_limits=(0.0, top),
        )  # fmt: skip


def file_axis(like: Any, axis: int, shape: tuple[int, ...]) -> int:
    """The axis of data in the order :func:`scan_inputs` gave for ``like`` (the file's voxel
    order, of ``shape``) that is shown on the layer axis ``axis`` (:func:`to_layer_order`)."""
    layer_shape = tuple(np.shape(_spatial_data(like)))[1 if _is_4d(like) else 0 :]
    axes = voxel_axes(like.metadata, layer_shape)
    if axes is None or len(axes) != len(shape):
        return axis
    return int(axes[axis])


class PendingMap:
    """The data of a map layer whose map the engine deferred
    (:class:`~napari_vaeloc.mapset.MapSet`), as napari reads layer data: ``shape``, ``dtype``,
    ``ndim`` and indexing. napari reads nothing of a hidden layer, so a hidden map layer costs
    no memory until it is shown; when it is, the panel makes the map in a worker
    (:meth:`make`) and puts it in the layer's place. Until then indexing gives zeros (a
    read-only view, no memory). ``np.asarray`` makes the map at once (for code reading a layer).
    ``reshape`` and ``transpose`` are applied to the map once made.
    """

    def __init__(
        self,
        maps: Any,
        name: str,
        shape: tuple[int, ...],
        dtype: Any,
        ops: tuple[tuple[str, tuple[int, ...]], ...] = (),
    ) -> None:
        self.maps, self.name, self.ops = maps, name, ops
        self.shape, self.dtype = tuple(int(n) for n in shape), np.dtype(dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return self.shape[0]

    def reshape(self, *shape: Any) -> PendingMap:
        new = tuple(shape[0]) if len(shape) == 1 and np.iterable(shape[0]) else tuple(shape)
        if int(np.prod(new)) != self.size:
            raise ValueError(f"cannot reshape {self.shape} to {new}")
        return PendingMap(self.maps, self.name, new, self.dtype, (*self.ops, ("reshape", new)))

    def transpose(self, *axes: Any) -> PendingMap:
        order = tuple(axes[0]) if len(axes) == 1 and np.iterable(axes[0]) else tuple(axes)
        order = order or tuple(reversed(range(self.ndim)))
        shape = tuple(self.shape[a] for a in order)
        return PendingMap(
            self.maps, self.name, shape, self.dtype, (*self.ops, ("transpose", order))
        )

    def made(self) -> np.ndarray | None:
        """The map in this layer's order once it is made (held by the result); else None."""
        if self.maps.is_deferred(self.name):
            return None
        return self._arranged(self.maps[self.name])

    def make(self) -> np.ndarray:
        """Make the map (and keep it in the result), in this layer's order; for a worker."""
        return self._arranged(self.maps[self.name])

    def _arranged(self, values: np.ndarray) -> np.ndarray:
        for op, arg in self.ops:
            values = values.reshape(arg) if op == "reshape" else values.transpose(arg)
        return values

    def __getitem__(self, key: Any) -> np.ndarray:
        values = self.made()
        if values is None:
            values = np.broadcast_to(np.zeros((), self.dtype), self.shape)
        return values[key]

    def copy(self) -> np.ndarray:
        """A copy of the map (made now), as ``ndarray.copy`` gives."""
        return self.make().copy()

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        values = self.make()
        return values if dtype is None else values.astype(dtype, copy=False)
