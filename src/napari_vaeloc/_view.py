"""The first view of a scan in napari: an axial slice, anterior up, radiological by default.

The reader gives layers world axes (x, y, z) in RAS+ millimetres (x towards the patient's right,
y anterior, z superior). The axial plane is shown with y vertical and x horizontal:

- **radiological** (default, as scanners and PACS show it): anterior up, the patient's right on
  the screen's left, as if facing the patient;
- **neurological**: anterior up, the patient's right on the screen's right, as if looking from
  above.

The dimension sliders are named after the world axes (x, y, z, and "volume" for the volume
axis of a 4D file) instead of napari's -3, -2, -1.
"""

from __future__ import annotations

import weakref
from typing import Any, Literal

Convention = Literal["radiological", "neurological"]

#: napari's ``camera.orientation2d`` (vertical, horizontal) for the axial plane: where y (anterior)
#: and x (the patient's right) grow on the screen
ORIENTATION_2D: dict[str, tuple[str, str]] = {
    "radiological": ("up", "left"),
    "neurological": ("up", "right"),
}

#: the world axes of the reader's layers, in world order, and the name of a 4D file's volume axis
WORLD_AXES = ("x", "y", "z")
VOLUME_AXIS = "volume"

_pending: weakref.WeakSet[Any] = weakref.WeakSet()


def axis_labels(viewer: Any) -> tuple[str, ...]:
    """The viewer's axis labels with the last three (two in a 2D viewer) named x, y, z, and
    the axis before them "volume" when a 4D layer from this reader has its volume axis there;
    labels of other leading axes are kept."""
    from ._writer import VOLUME_AXIS_KEY

    ndim = viewer.dims.ndim
    labels = list(viewer.dims.axis_labels)
    world = WORLD_AXES[: min(ndim, 3)]
    labels[ndim - len(world) :] = world
    lead = ndim - len(world) - 1
    if lead >= 0 and any(
        layer.ndim == len(world) + 1 and layer.metadata.get(VOLUME_AXIS_KEY) == 0
        for layer in viewer.layers
    ):
        labels[lead] = VOLUME_AXIS
    return tuple(labels)


def axial_view(viewer: Any, convention: Convention = "radiological") -> None:
    """Show the axial plane of the last three world axes (x, y, z) of ``viewer``: z is the slice
    axis, y runs up the screen (anterior up) and x runs left (radiological) or right
    (neurological). A 2D viewer shows (x, y) the same way; earlier axes (a volume axis) stay
    sliders, named as :func:`axis_labels` says. The view is reset to fit. Never raises: the
    view is left as it is if napari refuses.

    Raises:
        ValueError: an unknown ``convention`` (before anything is changed).
    """
    if convention not in ORIENTATION_2D:
        raise ValueError(f"convention must be one of {sorted(ORIENTATION_2D)}, not {convention!r}")
    try:  # a view preference must never break opening a file
        ndim = viewer.dims.ndim
        if ndim < 2:
            return
        lead = tuple(range(max(0, ndim - 3)))
        viewer.dims.order = lead + tuple(range(ndim - 1, len(lead) - 1, -1))
    except Exception:
        return
    try:
        viewer.dims.axis_labels = axis_labels(viewer)
    except Exception:  # a napari that refuses the names: its own labels stay
        pass
    try:
        scene = getattr(viewer, "scene", viewer)  # napari >= 0.9 keeps the camera there
        scene.camera.orientation2d = ORIENTATION_2D[convention]
    except Exception:  # a napari without camera orientations: y runs down the screen
        pass
    try:
        viewer.reset_view()
    except Exception:
        return


def axial_view_when_added(convention: Convention = "radiological") -> None:
    """Apply :func:`axial_view` to the current napari viewer when the first layer read by this
    plugin is added to it, if it holds no layer now. Does nothing without a viewer; never
    raises."""
    try:
        import napari

        viewer = napari.current_viewer()
        if viewer is None or len(viewer.layers) or viewer in _pending:
            return
        _pending.add(viewer)
        event = viewer.layers.events.inserted
        ref = weakref.ref(viewer)

        def on_inserted(ev: Any) -> None:
            event.disconnect(on_inserted)
            target = ref()
            if target is None:
                return
            _pending.discard(target)
            layer = getattr(ev, "value", None)
            if len(target.layers) == 1 and "affine" in getattr(layer, "metadata", {}):
                axial_view(target, convention)

        event.connect(on_inserted)
    except Exception:
        return
