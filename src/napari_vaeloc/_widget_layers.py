"""Public-API napari layer helpers for the widget: scan geometry from a layer, and result layers
that copy the input's geometry and are updated in place by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

#: metadata key marking layers this plugin produced (they are not offered as input)
ROLE_KEY = "vaeloc_role"


def scan_inputs(layer: Any) -> dict[str, Any]:
    """Data and geometry for :meth:`Volume.from_array` from an Image layer (2D or 3D).

    The affine comes from the layer's metadata (set by this plugin's reader) when it fits,
    otherwise from the layer's scale and translate.
    """
    from ._writer import layer_affine

    if getattr(layer, "multiscale", False):
        data = layer.data[0]
    else:
        data = layer.data
    if getattr(layer, "rgb", False):
        raise ValueError(f"{layer.name} is an RGB image; choose a grayscale scan")
    data = np.asarray(data)
    if data.ndim not in (2, 3):
        raise ValueError(
            f"{layer.name} has {data.ndim} dimensions {data.shape}; choose a 2D or 3D image "
            "(split 4D stacks first)"
        )
    meta = {"metadata": layer.metadata, "scale": layer.scale, "translate": layer.translate}
    affine, header = layer_affine(meta, data.shape)
    src = (layer.metadata or {}).get("source_path")
    return {
        "data": data,
        "affine": affine,
        "header": header,
        "path": Path(src) if src else None,
        "shape": data.shape,
    }


def geometry_of(layer: Any) -> dict[str, Any]:
    """Keyword arguments that place a new layer exactly on ``layer``."""
    md = {k: v for k, v in (layer.metadata or {}).items() if k != ROLE_KEY}
    return {
        "scale": tuple(layer.scale),
        "translate": tuple(layer.translate),
        "rotate": np.asarray(layer.rotate),
        "shear": np.asarray(layer.shear),
        "affine": np.asarray(layer.affine.affine_matrix),
        "units": tuple(layer.units),
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
    existing one in place (data, geometry and contrast limits; its display settings are kept)."""
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


def put_preparation_layers(
    viewer: Any, prepared: Any, like: Any, shape: tuple[int, ...], base: str
) -> list[Any]:
    """Show what preparation found on the scan ``like``: the brain mask ("<base> brain mask",
    Labels, just above the scan when new) and the bias-corrected brain ("<base> corrected brain",
    Image, hidden), both with ``like``'s geometry (:func:`put_layer`); returns the layers."""
    layers = []
    name = f"{base} brain mask"
    new = name not in viewer.layers
    mask = np.asarray(prepared.brain_mask).reshape(shape).astype(np.uint8)
    layer = put_layer(viewer, "labels", name, mask, like, "brain mask", opacity=0.25)
    if new and like in viewer.layers:  # under the result maps, over the scan
        viewer.layers.move(viewer.layers.index(layer), viewer.layers.index(like) + 1)
    layers.append(layer)
    corrected = getattr(prepared, "corrected", None)
    if corrected is not None:
        data = np.asarray(corrected, np.float32).reshape(shape)
        inside = data[mask > 0]
        top = float(np.percentile(inside, 99.5)) if inside.size else 1.0
        image = put_layer(
            viewer, "image", f"{base} corrected brain", data, like, "prepared", colormap="gray",
            visible=False, contrast_limits=(0.0, max(top, 1e-6)),
        )  # fmt: skip
        layers.append(image)
    return layers
