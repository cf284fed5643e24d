"""Fusing the bundled T1 model with its coronal and sagittal companions (real models, real scan)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from napari_vaeloc.engine import EngineOptions, localize
from napari_vaeloc.errors import InputError
from napari_vaeloc.io import load_volume
from napari_vaeloc.models.store import load_model
from napari_vaeloc.samples import sample_path

MAPS = ("rec_error_smooth", "kl_grad", "reconstruction")


@pytest.fixture(scope="module")
def t1():
    return load_model("t1-brain"), load_volume(sample_path("t1-healthy"))


def test_fuse_three_axes_on_request(t1):
    model, vol = t1
    assert model.card.defaults.fuse is False  # slower, and no gain on the benchmark
    steps: list[tuple[int, int]] = []
    options = EngineOptions(device="cpu", progress=lambda d, t: steps.append((d, t)))
    fused = localize(vol, model, options, maps=MAPS, fuse=True)
    single = localize(vol, model, EngineOptions(device="cpu"), maps=MAPS)
    assert "axial, coronal, sagittal" in fused.notes[-1]
    assert not any("averaged" in n for n in single.notes)
    assert steps[-1][0] == steps[-1][1] == 3000
    assert all(b[0] >= a[0] for a, b in itertools.pairwise(steps))  # never backwards
    # the model's own reconstruction and slice scores; the maps are averages
    np.testing.assert_array_equal(fused.maps["reconstruction"], single.maps["reconstruction"])
    np.testing.assert_array_equal(fused.slice_scores["kl"], single.slice_scores["kl"])
    assert not np.allclose(fused.maps["rec_error_smooth"], single.maps["rec_error_smooth"])
    # in the model's units: the healthy brain's typical value stays close to the single axis's
    fg = fused.foreground
    ratio = np.median(fused.maps["rec_error_smooth"][fg]) / np.median(
        single.maps["rec_error_smooth"][fg]
    )
    assert 0.7 < ratio < 1.3
    again = localize(vol, model, EngineOptions(device="cpu"), maps=MAPS, fuse=True)
    np.testing.assert_array_equal(again.maps["kl_grad"], fused.maps["kl_grad"])


def test_other_axis_or_no_companions(t1):
    model, vol = t1
    coronal = localize(
        vol, model, EngineOptions(device="cpu"), maps=MAPS, axis="coronal", fuse=True
    )
    assert not any("averaged" in n for n in coronal.notes)  # asked for one other axis
    with pytest.raises(InputError, match="no companion models"):
        localize(
            vol, load_model("t2-brain"), EngineOptions(device="cpu"), maps=MAPS, fuse=True,
            prepare=None,
        )  # fmt: skip


def test_a_map_the_companions_were_not_calibrated_for_is_not_fused(t1):
    """The bundled companions predate the `restoration` map (no scale for it, and no healthy
    range's excess): fusing the default is refused in one line before anything is scored."""
    model, vol = t1
    assert "restoration" in model.card.defaults.weights
    with pytest.raises(InputError, match="cannot fuse restoration with the companion"):
        localize(vol, model, EngineOptions(device="cpu"), fuse=True)
    with pytest.raises(InputError, match=r"both know combi, .*rec_error_smooth") as refused:
        localize(vol, model, EngineOptions(device="cpu"), maps=("restoration",), fuse=True)
    assert "restoration" not in str(refused.value).split("both know")[1]
    # refused before the preparation (a raw head would take tens of seconds to prepare)
    stages: list[str] = []
    head = load_volume(sample_path("t1-head"))
    options = EngineOptions(device="cpu", stage=stages.append)
    with pytest.raises(InputError, match="cannot fuse restoration"):
        localize(head, model, options, fuse=True, prepare="auto")
    assert stages == []
    localize(head, model, options, maps=("rec_error_smooth",), fuse=False, prepare="auto")
    assert "registration" in stages  # the same options report the preparation's stages
