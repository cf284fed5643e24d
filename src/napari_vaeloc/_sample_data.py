"""napari sample data: the bundled 2 mm MNI-space sample scans (see ``napari_vaeloc.demo``)."""

from __future__ import annotations

from ._reader import LayerData, volume_layer_data


def _sample(key: str, name: str) -> list[LayerData]:
    from .io import load_volume
    from .samples import sample_path

    return [volume_layer_data(load_volume(sample_path(key)), name=name)]


def t2_lesion() -> list[LayerData]:
    """T2 brain with a synthetic lesion."""
    return _sample("t2-lesion", "t2-lesion")


def t2_lesion_truth() -> list[LayerData]:
    """The synthetic lesion's ground truth, as a Labels layer."""
    data, kwargs, _ = _sample("t2-lesion-truth", "t2-lesion truth")[0]
    kwargs.pop("contrast_limits", None)
    return [((data > 0).astype("uint8"), kwargs, "labels")]


def t2_healthy() -> list[LayerData]:
    """Healthy T2 brain."""
    return _sample("t2-healthy", "t2-healthy")


def t1_healthy() -> list[LayerData]:
    """Healthy T1 brain."""
    return _sample("t1-healthy", "t1-healthy")
