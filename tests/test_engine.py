"""The engine over whole volumes: shapes, axes, batching, progress, cancel, memory guard, and a
trained VAE that really finds an inserted blob."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_vaeloc.combine import CombineSettings, PostProcessor
from napari_vaeloc.engine import EngineOptions, localize, resolve_device
from napari_vaeloc.errors import Cancelled, InputError
from napari_vaeloc.evaluation.synthetic import head_phantom, insert_sphere
from napari_vaeloc.io import Volume, load_volume
from napari_vaeloc.mapnames import DEFAULT_MAPS, SMOOTHGRAD_MAPS
from napari_vaeloc.models.store import LoadedModel
from napari_vaeloc.models.vae import ConvVAE
from napari_vaeloc.preprocess import Normalisation, volume_to_slices
from napari_vaeloc.training.loop import TrainConfig, fit
from tests.helpers import oblique_affine, tiny_card


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_maps_have_the_exact_input_shape(tiny_model, axis):
    data = head_phantom((21, 26, 17), seed=2)
    vol = Volume.from_array(data, affine=oblique_affine(3))
    res = localize(vol, tiny_model, EngineOptions(device="cpu"), axis=axis)
    assert set(res.maps) == set(DEFAULT_MAPS)
    for m in res.maps.values():
        assert m.shape == data.shape and m.dtype == np.float32
        assert np.isfinite(m).all()
    assert res.foreground.shape == data.shape
    n = data.shape[res.slice_axis]
    for v in res.slice_scores.values():
        assert v.shape == (n,)
    # slices without foreground are not scored and their maps are zero
    empty = ~res.foreground.any(axis=tuple(a for a in range(3) if a != res.slice_axis))
    assert np.isnan(res.slice_scores["kl"][empty]).all()
    assert np.isfinite(res.slice_scores["kl"][~empty]).all()
    assert res.volume_scores["n_slices_scored"] == (~empty).sum()


def test_slice_scores_are_in_file_order(tiny_model):
    """Flipping the file's voxel order along the slicing axis (and the affine with it) flips the
    per-slice scores and the maps the same way."""
    data = head_phantom((18, 20, 16), seed=4)
    aff = np.diag([1.0, 1, 1, 1])
    flipped_aff = aff.copy()
    flipped_aff[2, 2] = -1
    flipped_aff[2, 3] = data.shape[2] - 1
    a = localize(Volume.from_array(data, aff), tiny_model, axis="axial")
    b = localize(Volume.from_array(data[:, :, ::-1].copy(), flipped_aff), tiny_model, axis="axial")
    np.testing.assert_allclose(a.slice_scores["elbo"], b.slice_scores["elbo"][::-1], rtol=1e-5)
    np.testing.assert_allclose(
        a.maps["kl_grad"], b.maps["kl_grad"][:, :, ::-1], rtol=1e-4, atol=1e-7
    )


def test_result_does_not_depend_on_batch_size(tiny_model, phantom):
    a = localize(phantom, tiny_model, EngineOptions(batch_size=64))
    b = localize(
        phantom, tiny_model, EngineOptions(batch_size=5)
    )  # last batch smaller: it is scored too
    for k in DEFAULT_MAPS:
        np.testing.assert_allclose(a.maps[k], b.maps[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.slice_scores["kl"], b.slice_scores["kl"], rtol=1e-5)


def test_smoothgrad_maps_on_request(tiny_model, phantom):
    a = localize(
        phantom, tiny_model, EngineOptions(batch_size=64), maps=(*SMOOTHGRAD_MAPS, "kl_grad")
    )
    b = localize(phantom, tiny_model, EngineOptions(batch_size=5), maps=SMOOTHGRAD_MAPS)
    assert set(b.maps) == set(SMOOTHGRAD_MAPS)
    for k in SMOOTHGRAD_MAPS:  # fixed noise: deterministic and independent of the batch
        np.testing.assert_allclose(a.maps[k], b.maps[k], rtol=1e-5, atol=1e-6)
    sg, plain = a.maps["kl_grad_sg"], a.maps["kl_grad"]
    assert not np.allclose(sg, plain)  # the noisy copies change the gradient ...
    assert np.corrcoef(sg.ravel(), plain.ravel())[0, 1] > 0.5  # ... but not beyond recognition


def test_progress_and_cancel(tiny_model, phantom):
    seen = []
    options = EngineOptions(batch_size=4, progress=lambda d, t: seen.append((d, t)))
    localize(phantom, tiny_model, options)
    total = seen[-1][1]
    assert seen[0] == (0, total) and seen[-1] == (total, total)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        localize(phantom, tiny_model, EngineOptions(batch_size=4, cancel=cancel))


def test_single_slice_image(tiny_model):
    img = head_phantom((30, 34, 9), seed=0)[:, :, 4]
    res = localize(Volume.from_array(img), tiny_model, axis="coronal")
    assert res.maps["combi"].shape == (30, 34, 1)
    assert res.axis == "axial"
    assert any("single-slice" in n for n in res.notes)


def test_a_single_slice_of_another_plane_is_scored_by_the_fused_model_s_own_network():
    """A coronal slice given to t1-brain (axial, fused with coronal and sagittal companions):
    scored along its own plane by the axial network alone, and the note names both planes."""
    from napari_vaeloc.models.store import bundled_models, cached_model
    from napari_vaeloc.samples import sample_path

    if "t1-brain" not in bundled_models():
        pytest.skip("the bundled t1-brain model is not installed")
    t1 = load_volume(sample_path("t1-healthy"))
    y = t1.shape[1] // 2  # the sample is RAS: its second voxel axis runs posterior-anterior
    affine = t1.affine.copy()
    affine[:3, 3] += affine[:3, 1] * y
    res = localize(
        Volume.from_array(t1.data[:, y : y + 1, :], affine),
        cached_model("t1-brain"),
        EngineOptions(device="cpu"),
        prepare=None,
    )
    assert res.axis == "coronal" and not res.fused_axes
    assert any(
        n.startswith("t1-brain scored this single coronal slice with its axial network alone, "
                     "which learned axial slices") for n in res.notes
    ), res.notes  # fmt: skip


def test_voxels_without_data_are_left_out_of_the_map_and_the_mask(tiny_model, tmp_path):
    """NaN or infinite voxels in a file (read as the background value) are marked missing on
    the volume and left out of the foreground, so the combined map and the mask are 0 there,
    with a note giving their volume."""
    data = head_phantom((30, 34, 20), seed=0)
    gap = (slice(10, 20), slice(12, 22), slice(6, 14))
    holed = data.copy()
    holed[gap] = np.nan
    holed[0, 0, 0] = np.inf  # outside the head: not counted in the note
    path = tmp_path / "holed.nii.gz"
    nib.save(nib.Nifti1Image(holed, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    vol = load_volume(path)
    assert vol.missing is not None and int(vol.missing.sum()) == 10 * 10 * 8 + 1
    assert Volume.from_array(data).missing is None
    res = localize(vol, tiny_model, prepare=None)
    assert not res.foreground[gap].any()
    [note] = [n for n in res.notes if "has no data in the file" in n]
    assert note.startswith(f"{10 * 10 * 8 * 8 / 1000:.3g} ml of the scan's foreground"), note
    assert res.missing_ml == pytest.approx(10 * 10 * 8 * 8 / 1000)  # the fronts read this
    post = PostProcessor(res, CombineSettings.from_card(tiny_model.card).replace(threshold=0.0))
    assert not post.combined()[gap].any() and not post.mask()[gap].any()
    assert post.mask().any()  # threshold 0: the rest is scored and marked
    plain = localize(Volume.from_array(np.where(np.isfinite(holed), holed, 0)), tiny_model)
    assert plain.foreground[gap].any()  # the same gap given as numbers is scored
    # a few voxels (under 0.1 ml) are left out without a word
    edge = data.copy()
    edge[gap[0], gap[1], 7] = np.nan  # inside the head, one plane of the gap: 0.8 ml
    edge[15, 17, 10:12] = np.nan  # two voxels: 0.016 ml
    nib.save(nib.Nifti1Image(edge, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    few = localize(load_volume(path), tiny_model, prepare=None)
    [note] = [n for n in few.notes if "has no data in the file" in n]
    assert note.startswith("0.816 ml"), note
    edge[gap[0], gap[1], 7] = data[gap[0], gap[1], 7]
    nib.save(nib.Nifti1Image(edge, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    few = localize(load_volume(path), tiny_model, prepare=None)
    assert not few.foreground[15, 17, 10:12].any()
    assert not any("has no data in the file" in n for n in few.notes), few.notes
    assert few.missing_ml == pytest.approx(2 * 8 / 1000)  # counted, too few for a word


def test_reconstruction_is_in_scan_units(tiny_model, phantom):
    res = localize(phantom, tiny_model)
    scaled = Volume.from_array(phantom.data * 1000 + 5, phantom.affine)
    res2 = localize(scaled, tiny_model)
    np.testing.assert_allclose(
        res2.maps["reconstruction"], res.maps["reconstruction"] * 1000 + 5, rtol=1e-3, atol=1e-2
    )
    np.testing.assert_allclose(res2.maps["kl_grad"], res.maps["kl_grad"], rtol=1e-3, atol=1e-6)


def test_integer_volume_and_real_file(tiny_model, anatomical_path):
    vol = load_volume(anatomical_path)
    res = localize(vol, tiny_model)
    assert res.maps["elbo_grad"].shape == vol.shape


def test_memory_guard(tiny_model, phantom):
    with pytest.raises(InputError, match="crop or downsample"):
        localize(phantom, tiny_model, EngineOptions(max_bytes=10_000))


def test_devices():
    assert resolve_device("auto") in ("cuda", "mps", "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(InputError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="not available"):
            resolve_device("cuda")


@pytest.mark.slow
def test_trained_vae_finds_an_inserted_blob():
    """End to end: train on healthy phantoms for ~40 s, then a bright blob in an unseen phantom
    must score above healthy tissue (pixel AUROC inside the head)."""
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(0)
    norm = Normalisation()
    stacks = []
    for seed in range(6):
        vol = Volume.from_array(head_phantom((40, 48, 40), seed=seed))
        ms = volume_to_slices(vol.data, vol.affine, vol.spacing, "axial", 32, norm)
        stacks.append(ms.images[torch.from_numpy(np.flatnonzero(ms.foreground))])
    images = torch.cat(stacks)
    net = ConvVAE(image_size=32, z_dim=32)
    cfg = TrainConfig(
        image_size=32,
        z_dim=32,
        lr=1e-3,
        batch_size=32,
        max_steps=600,
        max_minutes=3.0,  # a bound for a busy machine; 600 steps end it first when idle
        val_every=50,
        patience=100,
    )
    res = fit(net, images[8:], images[:8], cfg)
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"] - 50
    card = tiny_card(net, "phantom")
    model = LoadedModel(net, card)

    healthy = head_phantom((40, 48, 40), seed=99)
    data, truth = insert_sphere(healthy, (20, 22, 20), 5.0, 0.6, mode="add")
    res = localize(Volume.from_array(data), model, axis="axial")
    inside = res.foreground | truth.astype(bool)
    auroc = {
        k: roc_auc_score(truth[inside], res.maps[k][inside])
        for k in ("rec_error", "rec_error_smooth", "elbo_grad", "combi", "kl_grad")
    }
    print(auroc)
    assert auroc["rec_error_smooth"] > 0.85, auroc
    assert auroc["rec_error"] > 0.7, auroc
    assert auroc["elbo_grad"] > 0.85, auroc
    assert auroc["combi"] > 0.7, auroc


def test_selected_maps_only(tiny_model, phantom):
    full = localize(phantom, tiny_model)
    part = localize(phantom, tiny_model, maps=("kl_grad", "reconstruction"))
    assert set(part.maps) == {"kl_grad", "reconstruction"}
    np.testing.assert_array_equal(part.maps["kl_grad"], full.maps["kl_grad"])
    np.testing.assert_array_equal(part.maps["reconstruction"], full.maps["reconstruction"])
    with pytest.raises(InputError, match="unknown maps"):
        localize(phantom, tiny_model, maps=("nope",))


def test_restoration_map_on_request(tiny_model, phantom):
    a = localize(phantom, tiny_model, EngineOptions(batch_size=64), maps=("restoration",))
    both = ("restoration", "rec_error")
    b = localize(phantom, tiny_model, EngineOptions(batch_size=5), maps=both)
    assert set(a.maps) == {"restoration"} and "restoration" not in DEFAULT_MAPS
    np.testing.assert_allclose(a.maps["restoration"], b.maps["restoration"], rtol=1e-5, atol=1e-6)
    r = a.maps["restoration"][a.foreground]
    assert r.min() >= 0 and r.max() > 0
    # the restored image moves towards the reconstruction: the map follows the error's pattern
    assert np.corrcoef(r, b.maps["rec_error"][b.foreground])[0, 1] > 0.3


def test_warm_up_scores_full_batches_of_a_small_volume(tiny_model, monkeypatch):
    from napari_vaeloc import scoring
    from napari_vaeloc.engine import warm_up

    real, batches = scoring.score_batch, []

    def counted(network, x, *args, **kwargs):  # the real scoring, its batch sizes recorded
        batches.append(x.shape[0])
        return real(network, x, *args, **kwargs)

    monkeypatch.setattr(scoring, "score_batch", counted)
    assert warm_up(tiny_model, "cpu", batch_size=8) > 0
    assert batches == [8, 6]  # a full batch (its convolutions are set up), then the rest
    with pytest.raises(InputError, match="unknown device"):
        warm_up(tiny_model, "nope")


def test_a_warm_up_in_another_thread_does_not_change_a_run(tiny_model, phantom):
    import threading

    from napari_vaeloc.engine import warm_up

    alone = localize(phantom, tiny_model, EngineOptions(device="cpu"))
    threads = [threading.Thread(target=warm_up, args=(tiny_model, "cpu", 8)) for _ in range(2)]
    for t in threads:
        t.start()
    both = localize(phantom, tiny_model, EngineOptions(device="cpu", batch_size=8))
    for t in threads:
        t.join()
    for k in alone.maps:
        np.testing.assert_allclose(both.maps[k], alone.maps[k], rtol=1e-5, atol=1e-6)
