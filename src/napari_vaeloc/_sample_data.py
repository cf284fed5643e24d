"""napari sample data: the bundled 2 mm MNI-space sample scans and a raw individual head (see
``napari_vaeloc.samples``), each with its geometry (the reader's :func:`volume_layer_data`; the
ground truths open as Labels). Loaded into an empty viewer, a sample is shown axially
(:mod:`._view`)."""

from __future__ import annotations

from ._reader import LayerData, volume_layer_data


def _sample(key: str, name: str) -> list[LayerData]:
    from ._view import axial_view_when_added
    from .io import load_image
    from .samples import sample_path

    layers = [volume_layer_data(load_image(sample_path(key)), name=name)]
    axial_view_when_added()
    return layers


def t2_lesion() -> list[LayerData]:
    """T2 brain with a synthetic lesion."""
    return _sample("t2-lesion", "t2-lesion")


def t2_lesion_truth() -> list[LayerData]:
    """The synthetic lesion's ground truth, as a Labels layer."""
    return _sample("t2-lesion-truth", "t2-lesion truth")


def t2_healthy() -> list[LayerData]:
    """Healthy T2 brain."""
    return _sample("t2-healthy", "t2-healthy")


def t1_healthy() -> list[LayerData]:
    """Healthy T1 brain."""
    return _sample("t1-healthy", "t1-healthy")


def t1_head() -> list[LayerData]:
    """The raw individual T1 head without a lesion (skull kept, LIA voxel order, 2 mm, not
    registered): a healthy real head, for which the default mask should stay empty."""
    return _sample("t1-head", "t1-head")


def t1_head_lesion() -> list[LayerData]:
    """A raw individual T1 head (skull kept, LIA voxel order, 2 mm, not registered) with a
    synthetic lesion: the widget prepares it before scoring."""
    return _sample("t1-head-lesion", "t1-head-lesion")


def t1_head_lesion_truth() -> list[LayerData]:
    """The raw head's synthetic lesion, as a Labels layer on the head's own grid."""
    return _sample("t1-head-lesion-truth", "t1-head-lesion truth")
