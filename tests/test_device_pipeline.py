"""The device-resident pipeline against a plain reference: the numpy/nibabel preprocessing and
mapping back the engine used before (reorientation with ``apply_orientation``, a normalised
float32 copy of the volume, one resize of every slice at once) and a per-batch scoring loop.

Tolerances: on the CPU the pipeline does the same float32 operations in the same order, so
model-space slices, maps and scores agree to float32 rounding (rtol 1e-5, atol 1e-6; most are
bitwise equal). On CUDA the resizing and the network run on the GPU (TF32 convolutions), so maps
are compared relative to their maximum (2 %) and by correlation (> 0.999).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nibabel.orientations import apply_orientation

from napari_vaeloc.engine import EngineOptions, localize
from napari_vaeloc.errors import InputError
from napari_vaeloc.evaluation.synthetic import head_phantom
from napari_vaeloc.io import Volume
from napari_vaeloc.mapnames import DEFAULT_MAPS, SLICE_SCORES
from napari_vaeloc.models.store import LoadedModel
from napari_vaeloc.models.vae import ConvVAE
from napari_vaeloc.preprocess import (
    Normalisation,
    _resize,
    clip_outliers,
    foreground_mask,
    make_geometry,
    resolve_axis,
    slices_to_volume,
    volume_to_slices,
    with_neighbours,
)
from napari_vaeloc.scoring import gaussian_kernel, score_batch
from tests.helpers import oblique_affine, tiny_card

ORIENTATIONS = {
    "RAS": np.diag([1.0, 1, 1, 1]),
    "LPS": np.diag([-1.0, -1, 1, 1]),
    "SLA": np.array([[0, -1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1.0]]),
    "oblique": oblique_affine(0),
}
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


# --------------------------------------------------------------------------- the reference


def reference_slices(data, affine, spacing, axis, image_size, norm):
    """The previous preprocessing: (images (N, 1, S, S), fg slices, geometry, stats, pad)."""
    geom = make_geometry(data.shape, affine, spacing, resolve_axis(axis), image_size)
    data, outliers = clip_outliers(data)
    fg = foreground_mask(data, norm.foreground) & ~outliers
    values = data[fg] if fg.sum() >= 2 else data.ravel()
    mean, std = float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64))
    normed = (data - np.float32(mean)) / np.float32(std)
    np.clip(normed, norm.clip[0], norm.clip[1], out=normed)
    pad = float(np.clip((float(data.min()) - mean) / std, *norm.clip))
    stack = np.moveaxis(apply_orientation(normed, geom.to_canon), geom.axis, 0)
    t = _resize(torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32)), geom.fit_shape)
    s = image_size
    images = torch.full((t.shape[0], 1, s, s), pad)
    (oa, ob), (fa, fb) = geom.offset, geom.fit_shape
    images[:, 0, oa : oa + fa, ob : ob + fb] = t
    fg_stack = np.moveaxis(apply_orientation(fg, geom.to_canon), geom.axis, 0)
    fg_slices = fg_stack.reshape(geom.n_slices, -1).any(axis=1)
    return images, fg_slices, geom, {"mean": mean, "std": std}, pad


def reference_to_volume(maps, geom) -> np.ndarray:
    """The previous mapping back: every slice resized at once, then reoriented."""
    t = torch.as_tensor(maps).reshape(-1, geom.image_size, geom.image_size).float()
    (oa, ob), (fa, fb) = geom.offset, geom.fit_shape
    t = _resize(t[:, oa : oa + fa, ob : ob + fb].contiguous(), geom.plane_shape)
    out = apply_orientation(np.moveaxis(t.numpy(), 0, geom.axis), geom.from_canon)
    return np.ascontiguousarray(out, dtype=np.float32)


def reference_localize(volume: Volume, model: LoadedModel, maps, batch_size: int = 64):
    """The previous engine loop: preprocessing, per-batch scoring, mapping back, on the CPU."""
    card = model.card
    images, fg_slices, geom, stats, pad = reference_slices(
        volume.data, volume.affine, volume.spacing, card.axis, card.image_size, card.normalisation
    )
    images = with_neighbours(images, card.preprocessing.neighbours)
    n, s = geom.n_slices, card.image_size
    stacks = {k: torch.zeros((n, s, s)) for k in maps}
    if "reconstruction" in stacks:
        stacks["reconstruction"].fill_(pad)
    scores = {k: np.full(n, np.nan, np.float32) for k in SLICE_SCORES}
    scale = float(card.calibration.kl_grad_scale) if card.calibration is not None else 1.0
    todo = np.flatnonzero(fg_slices)
    for i in range(0, len(todo), batch_size):
        idx = todo[i : i + batch_size]
        out = score_batch(
            model.network.cpu(),
            images[idx],
            card.likelihood_log_std,
            gaussian_kernel(),
            scale,
            False,
            any(k.endswith("_sg") for k in maps),
            "restoration" in maps,
        )
        for k in maps:
            stacks[k][torch.from_numpy(idx)] = out[k]
        for k in SLICE_SCORES:
            scores[k][idx] = out[k].numpy()
    result = {k: reference_to_volume(v, geom) for k, v in stacks.items()}
    if "reconstruction" in result:
        result["reconstruction"] = result["reconstruction"] * np.float32(stats["std"]) + np.float32(
            stats["mean"]
        )
    order = geom.file_slice_order()
    return result, {k: v[order] for k, v in scores.items()}


def _with_outliers(data: np.ndarray) -> np.ndarray:
    data = data.copy()
    data.reshape(-1)[[3, 500, 1000]] = [np.nan, 1e6, -1e6]
    return data


# --------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("orient", list(ORIENTATIONS))
@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_model_space_slices_equal_the_reference(orient, axis):
    data = _with_outliers(head_phantom((23, 29, 17), seed=3))
    spacing = (0.9, 1.3, 2.2)
    for size in (16, 64):  # shrinking (antialiased) and enlarging
        ms = volume_to_slices(data, ORIENTATIONS[orient], spacing, axis, size, Normalisation())
        images, fg, geom, stats, pad = reference_slices(
            data, ORIENTATIONS[orient], spacing, axis, size, Normalisation()
        )
        assert (ms.geometry.fit_shape, ms.geometry.offset) == (geom.fit_shape, geom.offset)
        np.testing.assert_allclose(ms.images.numpy(), images.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(ms.foreground, fg)
        assert ms.stats["mean"] == pytest.approx(stats["mean"], rel=1e-9)
        assert ms.stats["std"] == pytest.approx(stats["std"], rel=1e-9)
        assert ms.pad_value == pytest.approx(pad, abs=1e-7)
        assert ms.n_outliers == 3


@pytest.mark.parametrize("orient", list(ORIENTATIONS))
@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_mapping_back_equals_the_reference(orient, axis):
    shape = (19, 26, 15)
    geom = make_geometry(shape, ORIENTATIONS[orient], (0.9, 1.3, 2.2), resolve_axis(axis), 32)
    maps = torch.from_numpy(
        np.random.default_rng(0).random((geom.n_slices, 32, 32)).astype(np.float32)
    )
    want = reference_to_volume(maps, geom)
    np.testing.assert_allclose(slices_to_volume(maps, geom), want, rtol=1e-6, atol=1e-7)
    scaled = slices_to_volume(maps, geom, scale=3.5, offset=-2.0)
    np.testing.assert_allclose(scaled, want * 3.5 - 2.0, rtol=1e-5, atol=1e-6)
    half = slices_to_volume(maps, geom, dtype=np.float16)
    assert half.dtype == np.float16
    np.testing.assert_allclose(half.astype(np.float32), want, rtol=2**-10, atol=1e-4)


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_chunked_equals_in_memory(axis):
    """One slice per chunk gives exactly what one chunk for the whole volume gives, both ways."""
    data = head_phantom((22, 27, 18), seed=5)
    aff = ORIENTATIONS["oblique"]
    whole = volume_to_slices(data, aff, (1, 1, 2), axis, 32, Normalisation(), chunk_voxels=2**30)
    chunked = volume_to_slices(data, aff, (1, 1, 2), axis, 32, Normalisation(), chunk_voxels=1)
    np.testing.assert_array_equal(chunked.images.numpy(), whole.images.numpy())
    maps = whole.images[:, 0] ** 2
    a = slices_to_volume(maps, whole.geometry, chunk_voxels=2**30)
    b = slices_to_volume(maps, whole.geometry, chunk_voxels=1)
    np.testing.assert_array_equal(a, b)
    part = slices_to_volume(maps, whole.geometry, span=(3, 10), chunk_voxels=100)
    inside = np.zeros(whole.geometry.n_slices, bool)
    inside[3:10] = True
    inside = inside[whole.geometry.file_slice_order()]  # canonical -> file order
    index = [slice(None)] * 3
    index[whole.geometry.file_axis] = inside
    np.testing.assert_array_equal(part[tuple(index)], a[tuple(index)])
    index[whole.geometry.file_axis] = ~inside
    assert not part[tuple(index)].any()
    acc = np.ones(data.shape, np.float32)
    slices_to_volume(maps, whole.geometry, acc, scale=2.0, accumulate=True, chunk_voxels=7)
    np.testing.assert_allclose(acc, 1 + 2 * a, rtol=1e-6)


def test_hole_filling_in_chunks_equals_in_one_go(monkeypatch):
    import napari_vaeloc.preprocess as pre

    mask = np.random.default_rng(0).random((20, 21, 22)) > 0.4
    whole = [pre.fill_object(mask, axis=a) for a in range(3)]
    monkeypatch.setattr(pre, "CHUNK_VOXELS", 50)  # a few slices per chunk
    for a in range(3):
        np.testing.assert_array_equal(pre.fill_object(mask, axis=a), whole[a])


def test_input_volume_is_never_written():
    data = head_phantom((16, 18, 12), seed=0)
    before = data.copy()
    data.setflags(write=False)  # a read-only array is accepted as it is
    for axis in ("axial", "sagittal"):
        volume_to_slices(data, np.eye(4), (1, 1, 1), axis, 16, Normalisation())
    np.testing.assert_array_equal(data, before)


def test_mapping_back_refuses_a_wrong_output():
    geom = make_geometry((8, 9, 10), np.eye(4), (1, 1, 1), 2, 16)
    with pytest.raises(ValueError, match="not the file's"):
        slices_to_volume(np.zeros((10, 16, 16)), geom, np.zeros((8, 9, 11), np.float32))
    with pytest.raises(ValueError, match="expected 10 slices"):
        slices_to_volume(np.zeros((9, 16, 16)), geom)


# --------------------------------------------------------------------------- whole engine


def _neighbour_model() -> LoadedModel:
    torch.manual_seed(1)
    net = ConvVAE(image_size=16, in_channels=3, out_channels=1, widths=(8, 16), z_dim=8)
    card = tiny_card(net.eval().requires_grad_(False), "tiny-neighbours")
    prep = card.preprocessing.__class__(**{**card.preprocessing.__dict__, "neighbours": 1})
    return LoadedModel(net, card.__class__(**{**card.__dict__, "preprocessing": prep}))


def _compare(res_maps, ref_maps, names, rtol=1e-5, atol=1e-6):
    for k in names:
        np.testing.assert_allclose(res_maps[k], ref_maps[k], rtol=rtol, atol=atol, err_msg=k)


@pytest.mark.parametrize("orient", ["RAS", "oblique"])
def test_engine_maps_equal_the_reference_on_cpu(tiny_model, orient):
    vol = Volume.from_array(
        _with_outliers(head_phantom((21, 25, 17), seed=2)), ORIENTATIONS[orient]
    )
    names = (*DEFAULT_MAPS, "restoration", "kl_grad_sg")
    res = localize(vol, tiny_model, EngineOptions(device="cpu", batch_size=7), maps=names)
    ref, scores = reference_localize(vol, tiny_model, names, batch_size=7)
    _compare(res.maps, ref, names)
    for k in SLICE_SCORES:
        np.testing.assert_allclose(res.slice_scores[k], scores[k], rtol=1e-5)
    half = localize(vol, tiny_model, EngineOptions(device="cpu", map_dtype="float16"), maps=names)
    for k in names:
        assert half.maps[k].dtype == np.float16
        scale = float(np.abs(ref[k]).max())
        np.testing.assert_allclose(half.maps[k].astype(np.float32), ref[k], atol=1e-3 * scale)


def test_engine_with_neighbouring_slices_equals_the_reference():
    model = _neighbour_model()
    assert model.card.preprocessing.neighbours == 1
    vol = Volume.from_array(head_phantom((20, 24, 18), seed=4), ORIENTATIONS["LPS"])
    res = localize(vol, model, EngineOptions(device="cpu"), maps=DEFAULT_MAPS, prepare=None)
    ref, _ = reference_localize(vol, model, DEFAULT_MAPS)
    _compare(res.maps, ref, DEFAULT_MAPS)


def test_map_precision_is_checked():
    with pytest.raises(InputError, match="map precision"):
        EngineOptions(map_dtype="int8")


def test_budget_message_names_maps_and_remedies(tiny_model, phantom):
    with pytest.raises(InputError) as err:
        localize(phantom, tiny_model, EngineOptions(max_bytes=10_000), maps=("kl_grad",))
    text = str(err.value)
    assert "1 float32 maps" in text and "float16" in text and "crop or downsample" in text


@CUDA
@pytest.mark.parametrize("orient", ["RAS", "oblique"])
def test_model_space_slices_on_cuda(orient):
    data = _with_outliers(head_phantom((23, 29, 17), seed=3))
    args = (data, ORIENTATIONS[orient], (0.9, 1.3, 2.2), "axial", 64, Normalisation())
    cpu = volume_to_slices(*args)
    gpu = volume_to_slices(*args, device="cuda")
    assert gpu.images.device.type == "cuda"
    np.testing.assert_allclose(gpu.images.cpu().numpy(), cpu.images.numpy(), atol=1e-5)
    np.testing.assert_array_equal(gpu.foreground, cpu.foreground)


@CUDA
def test_engine_maps_on_cuda_equal_the_reference(tiny_model):
    vol = Volume.from_array(head_phantom((21, 25, 17), seed=2), ORIENTATIONS["oblique"])
    names = (*DEFAULT_MAPS, "restoration")
    res = localize(vol, tiny_model, EngineOptions(device="cuda", amp=False), maps=names)
    assert res.device.startswith("cuda")
    ref, _ = reference_localize(vol, tiny_model, names)
    for k in names:
        scale = float(np.abs(ref[k]).max()) or 1.0
        assert np.abs(res.maps[k] - ref[k]).max() <= 0.02 * scale, k
        assert np.corrcoef(res.maps[k].ravel(), ref[k].ravel())[0, 1] > 0.999, k
