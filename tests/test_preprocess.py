"""Slicing along anatomical axes in any voxel order, and the exact inverse mapping."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from napari_vaeloc.errors import InputError
from napari_vaeloc.preprocess import (
    Normalisation,
    canonical_slices,
    clip_outliers,
    foreground_mask,
    make_geometry,
    outlier_mask,
    resolve_axis,
    slices_to_volume,
    volume_to_slices,
)
from tests.helpers import oblique_affine

ORIENTATIONS = {
    "RAS": np.diag([1.0, 1, 1, 1]),
    "LPS": np.diag([-1.0, -1, 1, 1]),
    "SLA": np.array([[0, -1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1.0]]),
    "oblique": oblique_affine(0) @ np.diag([1 / 0.9, 1 / 1.3, 1 / 2.2, 1]),
}


@pytest.mark.parametrize("orient", list(ORIENTATIONS))
@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_roundtrip_is_exact_when_no_resizing(orient, axis):
    """A 16^3 isotropic cube sliced into 16x16 model slices maps back voxel for voxel."""
    data = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32) + 1
    aff = ORIENTATIONS[orient]
    ms = volume_to_slices(data, aff, (1, 1, 1), axis, 16, Normalisation(clip=(-10, 10)))
    back = slices_to_volume(ms.images[:, 0], ms.geometry)
    want = (data - ms.stats["mean"]) / ms.stats["std"]
    np.testing.assert_allclose(back, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("orient", list(ORIENTATIONS))
def test_axial_means_superior_inferior_whatever_the_voxel_order(orient):
    """Slice k of an axial stack lies at one world z; consecutive slices go upward."""
    aff = ORIENTATIONS[orient]
    shape = (10, 12, 14)
    ijk = np.indices(shape).reshape(3, -1)
    world_z = (aff[:3, :3] @ ijk)[2].reshape(shape).astype(np.float32)
    geom = make_geometry(shape, aff, (1, 1, 1), resolve_axis("axial"), 16)
    stack = canonical_slices(world_z, geom)
    per_slice = stack.reshape(stack.shape[0], -1).mean(1)
    assert np.all(np.diff(per_slice) > 0)
    if orient != "oblique":
        assert np.ptp(stack.reshape(stack.shape[0], -1), axis=1).max() < 1e-4
    # the file axis along which axial slices are stacked
    assert shape[geom.file_axis] == stack.shape[0]


@pytest.mark.parametrize("shape", [(31, 17, 9), (8, 40, 23), (5, 5, 1)])
def test_inverse_gives_the_exact_input_shape(shape):
    data = np.random.default_rng(1).random(shape).astype(np.float32)
    for axis in ("axial", "coronal", "sagittal"):
        if 1 in shape and shape.index(1) != resolve_axis(axis):
            continue
        ms = volume_to_slices(
            data, np.diag([0.7, 1.9, 3.0, 1]), (0.7, 1.9, 3.0), axis, 32, Normalisation()
        )
        assert ms.images.shape == (ms.geometry.n_slices, 1, 32, 32)
        assert slices_to_volume(ms.images[:, 0], ms.geometry).shape == shape


def test_aspect_ratio_kept_and_padding_is_background():
    data = np.ones((40, 20, 3), dtype=np.float32)
    data[0, 0, 0] = 0  # background value present
    ms = volume_to_slices(data, np.eye(4), (1, 1, 1), "axial", 32, Normalisation("nonzero"))
    assert ms.geometry.fit_shape == (32, 16)
    assert ms.geometry.offset == (0, 8)
    img = ms.images[1, 0].numpy()
    assert np.all(img[:, :8] == ms.pad_value) and np.all(img[:, 24:] == ms.pad_value)
    # anisotropic voxels: 20 voxels of 2 mm are as long as 40 of 1 mm
    ms2 = volume_to_slices(data, np.diag([1, 2, 1, 1]), (1, 2, 1), "axial", 32, Normalisation())
    assert ms2.geometry.fit_shape == (32, 32)


def test_normalisation_zscores_foreground_and_clips():
    data = _cube()
    fg = foreground_mask(data, "otsu")
    assert fg.sum() == 20**3
    ms = volume_to_slices(data, np.eye(4), (1, 1, 1), "axial", 32, Normalisation())
    assert ms.stats["mean"] == pytest.approx(100, abs=0.5)
    assert ms.stats["std"] == pytest.approx(10, abs=0.5)
    assert float(ms.images.min()) == -1.5 and 1.4 < float(ms.images.max()) <= 1.5
    assert ms.pad_value == -1.5
    assert ms.foreground.tolist() == [5 <= k < 25 for k in range(30)]


def _cube(seed: int = 0) -> np.ndarray:
    """30^3 zeros around a 20^3 object of intensity N(100, 10)."""
    data = np.zeros((30, 30, 30), dtype=np.float32)
    data[5:25, 5:25, 5:25] = np.random.default_rng(seed).normal(100, 10, (20, 20, 20))
    return data


def test_outliers_are_extremes_far_outside_the_scans_own_range():
    data = _cube()
    assert not outlier_mask(data).any()
    data[1, 1, :2] = [2.5 * data.max(), -100.0]  # bright, or below a zero background: kept
    data[0, 0, :4] = [5000.0, -5000.0, np.nan, -np.inf]  # saturated, dropped out, non-finite
    want = np.zeros(data.shape, bool)
    want[0, 0, :4] = True
    np.testing.assert_array_equal(outlier_mask(data), want)
    clipped, bad = clip_outliers(data)
    np.testing.assert_array_equal(bad, want)
    good = data[~want]
    assert clipped[0, 0, :4].tolist() == [good.max(), good.min(), good.min(), good.min()]
    np.testing.assert_array_equal(clipped[~want], good)


def test_outliers_found_up_to_a_few_percent_of_the_object():
    data = _cube()
    rng = np.random.default_rng(1)
    inside = rng.choice(20**3, int(0.04 * 20**3), replace=False)  # 4 % of the object
    data[5:25, 5:25, 5:25].put(inside, 1e6)
    outside = rng.choice(np.flatnonzero(data.ravel() == 0), int(0.009 * data.size), replace=False)
    data.reshape(-1)[outside] = -1e6  # 0.9 % of the volume
    assert outlier_mask(data).sum() == inside.size + outside.size


def test_normalisation_and_foreground_ignore_outliers():
    clean = _cube()
    data = clean.copy()
    data[5:25, 5:25, 5:25].put(np.arange(0, 20**3, 500), 1e6)  # 16 saturated object voxels
    data[0, :5, 0] = -1e6  # and dropped-out background voxels
    bad = outlier_mask(data)
    a = volume_to_slices(clean, np.eye(4), (1, 1, 1), "axial", 32, Normalisation())
    b = volume_to_slices(data, np.eye(4), (1, 1, 1), "axial", 32, Normalisation())
    np.testing.assert_array_equal(b.foreground_mask, a.foreground_mask & ~bad)
    assert b.stats["mean"] == pytest.approx(a.stats["mean"], abs=0.01)
    assert b.stats["std"] == pytest.approx(a.stats["std"], rel=0.01)
    assert b.pad_value == a.pad_value == -1.5
    assert (a.n_outliers, b.n_outliers) == (0, 21)
    assert b.foreground.tolist() == a.foreground.tolist()
    for method in ("otsu", "nonzero"):
        norm = Normalisation(foreground=method)
        c = volume_to_slices(data, np.eye(4), (1, 1, 1), "axial", 32, norm)
        assert c.foreground_mask.sum() == 20**3 - 16


def test_unknown_axis_refused():
    with pytest.raises(InputError, match="unknown axis"):
        resolve_axis("oblique")


def test_same_function_for_training_and_scoring(anatomical_path):
    """Training data (datasets.build_slice_dataset, see test_train) and the engine both call
    volume_to_slices: its output depends on the volume alone, not on the array objects."""
    img = nib.load(anatomical_path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    a = volume_to_slices(data, img.affine, img.header.get_zooms()[:3], "axial", 32, Normalisation())
    b = volume_to_slices(
        data.copy(), img.affine.copy(), img.header.get_zooms()[:3], "axial", 32, Normalisation()
    )
    np.testing.assert_array_equal(a.images.numpy(), b.images.numpy())


def test_fill_object_fills_holes_within_slices():
    from scipy.ndimage import binary_fill_holes

    from napari_vaeloc.preprocess import fill_object

    tube = np.zeros((9, 9, 6), bool)  # a tube along z: its inside is open in 3D, closed in 2D
    tube[2:7, 2:7, :] = True
    tube[4, 4, :] = False
    assert not fill_object(tube)[4, 4, 0]  # 3D: the hole reaches the border
    assert fill_object(tube, axis=2)[4, 4, :].all()  # every axial slice encloses it
    assert not fill_object(tube, axis=0)[4, 4, 0]  # sagittal slices: the line is open
    rng = np.random.default_rng(0)
    m = rng.random((12, 13, 14)) > 0.4
    for ax in range(3):
        ref = m.copy()
        for i in range(m.shape[ax]):
            index = [slice(None)] * 3
            index[ax] = i
            ref[tuple(index)] = binary_fill_holes(ref[tuple(index)])
        np.testing.assert_array_equal(fill_object(m, axis=ax), ref)


@pytest.mark.parametrize("shape", [(17, 15), (12, 13, 14), (30, 8, 21)])
@pytest.mark.parametrize("density", [0.35, 0.55, 0.7])
def test_fill_holes_equals_scipy(shape, density):
    from scipy.ndimage import binary_fill_holes

    from napari_vaeloc.preprocess import fill_holes

    rng = np.random.default_rng(len(shape) * 100 + int(density * 10))
    for _ in range(4):
        m = rng.random(shape) > 1 - density
        m[(slice(0, 2),) * len(shape)] = False  # background in a corner of the array
        np.testing.assert_array_equal(fill_holes(m), binary_fill_holes(m))
    ball = np.zeros((20, 20, 20), bool)
    ball[3:17, 3:17, 3:17] = True
    ball[8:12, 8:12, 8:12] = False  # a cavity: filled
    ball[10, 10, 4:8] = False  # a channel from the cavity, closed by the wall at z = 3 ...
    assert fill_holes(ball)[8:12, 8:12, 8:12].all()
    ball[10, 10, :] = False  # ... open to the border along the line
    np.testing.assert_array_equal(fill_holes(ball), binary_fill_holes(ball))
    assert not fill_holes(ball)[10, 10, 10]
    assert not fill_holes(np.zeros((5, 6, 7), bool)).any()


def test_excess_is_how_far_the_foreground_lies_outside_the_healthy_range():
    """Model-space excess: 0 where the z-scores lie within (low, high) and outside the
    foreground; z - high inside a bright block, low - z inside a dark one (a uniform block keeps
    its value through the resize away from its edge)."""
    import torch

    from napari_vaeloc.preprocess import excess_slices, make_geometry

    rng = np.random.default_rng(0)
    data = rng.normal(0.0, 1.0, (48, 48, 20)).clip(-1.0, 1.0).astype(np.float32)
    data[10:30, 10:30, 5:15] = 4.0  # z = 4 (mean 0, std 1 given)
    data[34:46, 34:46, 5:15] = -5.0
    inside = np.ones(data.shape, bool)
    inside[:, :, 17:] = False  # outside the foreground: never counted
    data[:, :, 17:] = 9.0
    geom = make_geometry(data.shape, np.eye(4), (1.0, 1.0, 1.0), 2, 48)
    out = excess_slices(
        torch.from_numpy(data), torch.from_numpy(inside.view(np.uint8)), geom,
        {"mean": 0.0, "std": 1.0}, (-2.0, 1.5),
    ).numpy()[:, 0]  # fmt: skip
    assert out.shape == (20, 48, 48)
    stack = out if not geom.flipped else out[::-1]
    assert np.allclose(stack[17:], 0.0)  # outside the foreground
    assert np.allclose(stack[:5], 0.0) and np.allclose(stack[15:17], 0.0)  # within the range
    values = set(stack[5:15][stack[5:15] > 0].round(3).ravel().tolist())
    assert {2.5, 3.0} <= values  # 4 - 1.5 inside the bright block, -2 - (-5) in the dark one
    assert stack.max() == pytest.approx(3.0, abs=1e-4)  # the resize makes nothing larger
    assert np.isclose(stack[5:15], 0.0).mean() > 0.5  # the rest of those slices is in range
