"""Synthetic individuals, training on several sources with them, resuming, and the model card's
training provenance."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_vaeloc.cli import main
from napari_vaeloc.errors import InputError, ModelError
from napari_vaeloc.io import Volume, load_volume
from napari_vaeloc.models.store import load_model
from napari_vaeloc.samples import TEMPLATES, TRAINING_TEMPLATES, sample_path
from napari_vaeloc.training.builder import (
    TrainingSet,
    build_training_set,
    check_provenance,
    choose_holdout,
    recalibrate,
    train_model,
)
from napari_vaeloc.training.datasets import block_mean
from napari_vaeloc.training.individuals import (
    IndividualConfig,
    _sample,
    individuals_for,
    jacobian_determinant,
    make_individual,
    random_diffeomorphism,
    tissue_classes,
)
from napari_vaeloc.training.loop import TrainConfig


@pytest.fixture(scope="module")
def brain() -> tuple[Volume, np.ndarray]:
    """The bundled healthy T1 brain (ICBM 2009c, 2 mm), averaged to 6 mm: a real brain, small."""
    vol = load_volume(sample_path("t1-healthy"))
    data, affine = block_mean(vol.data, vol.affine, vol.spacing, 6.0)
    return Volume(data, affine), data > 0.05 * data.max()


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_same_seed_same_individual_and_the_cache_gives_it_back(brain, tmp_path):
    vol, mask = brain
    a = make_individual(vol, mask, "T1", 3)
    b = make_individual(vol, mask, "T1", 3)
    c = make_individual(vol, mask, "T1", 4)
    np.testing.assert_array_equal(a.volume.data, b.volume.data)
    np.testing.assert_array_equal(a.brain_mask, b.brain_mask)
    assert a.params == b.params
    assert np.abs(a.volume.data - c.volume.data).max() > 0.1
    made = individuals_for("t1", vol, mask, "T1", 2, seed=0, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2
    again = individuals_for("t1", vol, mask, "T1", 2, seed=0, cache_dir=tmp_path)
    for x, y in zip(made, again, strict=True):
        np.testing.assert_array_equal(x.volume.data, y.volume.data)
        np.testing.assert_array_equal(x.brain_mask, y.brain_mask)
    assert np.abs(made[0].volume.data - made[1].volume.data).max() > 0.1


def test_the_warp_is_a_diffeomorphism_with_its_inverse():
    shape, spacing = (40, 48, 40), (2.0, 2.0, 2.0)
    for seed in range(3):
        fwd, inv = random_diffeomorphism(shape, spacing, 8.0, 12.0, np.random.default_rng(seed))
        longest = float((fwd * 2.0).square().sum(0).sqrt().max())  # mm
        assert 4.0 < longest < 12.0
        det = jacobian_determinant(fwd.numpy())
        assert det.min() > 0.1, det.min()
        # inverse after forward is the identity (away from the border, where samples clamp)
        back = fwd + _sample(inv, fwd)
        assert float(back[:, 6:-6, 6:-6, 6:-6].abs().max()) < 0.1


def test_noise_has_the_asked_snr(brain):
    vol, mask = brain
    for seed, snr in ((0, 10.0), (2, 40.0)):
        clean = make_individual(vol, mask, "T1", seed, IndividualConfig(snr=None))
        noisy = make_individual(vol, mask, "T1", seed, IndividualConfig(snr=(snr, snr)))
        np.testing.assert_array_equal(clean.brain_mask, noisy.brain_mask)
        bright = clean.brain_mask & (clean.volume.data > 0.5 * clean.params["wm_mean"])
        diff = noisy.volume.data[bright] - clean.volume.data[bright]
        measured = noisy.params["wm_mean"] / float(diff.std())
        assert snr * 0.85 < measured < snr * 1.15, (snr, measured)
    drawn = [make_individual(vol, mask, "T1", s).params["snr"] for s in range(4)]
    assert all(10.0 <= x <= 40.0 for x in drawn) and max(drawn) - min(drawn) > 5


def test_brain_mask_is_warped_with_the_image(brain):
    vol, mask = brain
    binary = Volume(mask.astype(np.float32), vol.affine)
    ind = make_individual(binary, mask, "T1", 5, IndividualConfig.warp_only((8.0, 8.0)))
    assert 0.9 < _dice(ind.brain_mask, mask) < 0.999
    assert (ind.brain_mask != mask).sum() > 50  # it moved
    assert _dice(ind.volume.data > 0.5, ind.brain_mask) > 0.98  # the image moved with it
    full = make_individual(vol, mask, "T1", 5)
    assert not full.volume.data[~full.brain_mask].any()
    assert abs(int(full.brain_mask.sum()) - int(mask.sum())) < 0.1 * mask.sum()


def test_grown_ventricles_widen_the_deep_csf_and_leave_the_cortex():
    """On the bundled 2 mm T1 brain (ICBM 2009c): the ventricles grow with the distance asked,
    only in deep brain and to CSF intensity; without it (the default) an individual of a seed
    is the one it was before the option existed, and the configuration's record and cache key
    do not mention it."""
    from scipy import ndimage as ndi

    vol = load_volume(sample_path("t1-healthy"))
    mask = vol.data > 0.05 * vol.data.max()
    made = {
        g: make_individual(vol, mask, "T1", 3, IndividualConfig(ventricles_mm=(g, g), snr=None))
        for g in (0.0, 2.0, 5.0)
    }
    grown = [made[g].params.get("ventricles_grown_ml", 0.0) for g in (0.0, 2.0, 5.0)]
    assert grown[0] == 0.0 and 5.0 < grown[1] < grown[2], grown
    before, after = made[0.0], made[5.0]
    np.testing.assert_array_equal(before.brain_mask, after.brain_mask)
    depth = ndi.distance_transform_edt(before.brain_mask, sampling=vol.spacing)
    changed = np.abs(after.volume.data - before.volume.data) > 0.05
    assert changed.sum() * 8 / 1000 > 0.5 * grown[2]  # ml on the 2 mm grid
    assert not changed[before.brain_mask & (depth < 8.0)].any()  # the cortex is untouched
    csf_level = np.percentile(before.volume.data[before.brain_mask & (depth > 20)], 5)
    assert np.median(after.volume.data[changed]) < 0.7 * np.median(before.volume.data[changed])
    assert np.median(after.volume.data[changed]) < 2 * csf_level
    plain = make_individual(vol, mask, "T1", 3, IndividualConfig(snr=None))
    np.testing.assert_array_equal(plain.volume.data, before.volume.data)
    assert "ventricles_mm" not in IndividualConfig().to_dict()
    cfg = IndividualConfig(ventricles_mm=(0.0, 5.0))
    assert IndividualConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="ventricles_mm"):
        IndividualConfig(ventricles_mm=(-1.0, 2.0))


def test_a_t1_source_gives_t2_and_pd_contrast(brain):
    vol, mask = brain
    centres = tissue_classes(vol.data, mask)
    dark = mask & (vol.data < 0.5 * (centres[0] + centres[1]))  # CSF in T1
    bright = mask & (vol.data > 0.5 * (centres[1] + centres[2]))  # white matter in T1
    still = dict(warp_mm=(0.0, 0.0), bias=(0.0, 0.0), snr=None, slice_mm=(0.0, 0.0))
    for contrast, csf_brighter in (("T1", False), ("T2", True), ("PD", True)):
        out = make_individual(vol, mask, "T1", 1, IndividualConfig(contrast=contrast, **still))
        d = out.volume.data
        assert (d[dark].mean() > d[bright].mean()) == csf_brighter, contrast


def test_training_sources_are_registered_and_test_anatomy_refused(tmp_path):
    assert "mni152-t1" not in TRAINING_TEMPLATES
    assert {"icbm-t1", "mni2009a-t1", "oasis-t1", "cat12-t1", "icbm-variant-t1"} <= set(
        TRAINING_TEMPLATES
    )
    for key in TRAINING_TEMPLATES:
        assert TEMPLATES[key].licence and TEMPLATES[key].origin, key
    with pytest.raises(InputError, match="held-out test anatomy"):
        build_training_set(["mni152-t1"], "T1")
    f = tmp_path / "t2.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), f)
    with pytest.raises(InputError, match="synthetic individuals"):
        build_training_set(["icbm-t2"], "T1")


def _write_sources(brain, folder) -> list[str]:
    vol, _ = brain
    paths = []
    for i, flip in enumerate((False, True)):
        data = vol.data[::-1] if flip else vol.data
        p = folder / f"healthy{i}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(data), vol.affine), p)
        paths.append(str(p))
    return paths


class _Stop(Exception):
    pass


def _train(sources, out, **kw):
    cfg = TrainConfig(
        image_size=16, z_dim=8, widths=[8, 16], lr=1e-3, batch_size=8, max_steps=12, val_every=4
    )
    return train_model(sources, out, cfg, modality="T1", individuals=2, **kw)


def test_training_with_individuals_resumes_to_the_same_weights(brain, tmp_path):
    torch.set_num_threads(1)
    sources = _write_sources(brain, tmp_path)
    whole, _ = _train(sources, tmp_path / "whole", data_licence="CC0, test data")
    ckpt = tmp_path / ".cut.checkpoint"

    def stop(info):
        if info["step"] == 10:
            raise _Stop  # after the checkpoint of step 8

    with pytest.raises(_Stop):
        _train(sources, tmp_path / "cut", progress=stop, data_licence="CC0, test data")
    assert len(list((ckpt / "individuals").glob("*.npz"))) == 4
    resumed, _ = _train(sources, tmp_path / "cut", resume=True, data_licence="CC0, test data")
    a, b = load_model(whole).card, load_model(resumed).card
    assert a.weights_sha256 == b.weights_sha256
    assert [h["step"] for h in b.provenance.training["history"]] == [4, 8, 12]
    record = a.provenance.training
    assert record["split"]["by"] == "individual"  # two sources: individuals validate
    assert all("#" in n for n in record["split"]["val_names"])
    assert [r["name"] for r in record["source_records"]] == ["healthy0.nii.gz", "healthy1.nii.gz"]
    assert all(r["licence"] == "CC0, test data" for r in record["source_records"])
    assert "healthy1.nii.gz: NIfTI file [user's file] + 2 synthetic individuals" in (
        a.provenance.sources
    )
    assert not ckpt.exists()


def test_a_card_without_training_provenance_is_refused(brain, tmp_path, capsys):
    sources = _write_sources(brain, tmp_path)
    out = tmp_path / "m"
    rc = main(
        [
            "train",
            *sources,
            "--out",
            str(out),
            "--modality",
            "T1",
            "--individuals",
            "1",
            "--ventricles",
            "4",
            "--image-size",
            "16",
            "--z-dim",
            "8",
            "--max-steps",
            "4",
            "--val-every",
            "2",
            "--quiet",
        ]
    )
    assert rc == 0
    card = load_model(out).card
    check_provenance(card)  # a trained model names its sources and their licence
    # the individuals' recipe is recorded, grown ventricles with it (a recalibration remakes
    # the held-out individuals from it)
    made = card.provenance.training["individuals"]
    assert made["per_source"] == 1 and made["config"]["ventricles_mm"] == [0.0, 4.0]
    for field in ("provenance", "licence"):
        raw = json.loads((out / "model.json").read_text())
        raw[field] = ""
        (out / "model.json").write_text(json.dumps(raw))
        with pytest.raises(ModelError, match="lacks training provenance"):
            recalibrate(out, {"rec_error": 1.0})
    assert json.loads((out / "model.json").read_text())["licence"] == ""  # not rewritten
    assert main(["train", *sources, "--out", str(tmp_path / "n"), "--individuals", "-1"]) == 2
    # grown ventricles are a property of synthetic individuals: refused without them
    assert main(["train", *sources, "--out", str(tmp_path / "n"), "--ventricles", "3"]) == 2
    assert "give --individuals N too" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()


@pytest.mark.parametrize(("per_source", "held"), [(1, 1), (2, 1), (8, 2), (20, 6)])
def test_holdout_by_individuals_keeps_the_validation_share_small(per_source, held):
    # two sources, each its own volume and ``per_source`` synthetic individuals
    groups, individual = [], []
    for g in ("a", "b"):
        groups += [g] * (per_source + 1)
        individual += [False] + [True] * per_source
    tset = TrainingSet(
        volumes=[None] * len(groups),
        names=[f"{g}#{i}" for i, g in enumerate(groups)],
        groups=groups,
        individual=individual,
        records=[],
    )
    flags, by = choose_holdout(tset, seed=3)
    assert by == "individual"
    assert sum(flags) == held
    assert not any(f and not ind for f, ind in zip(flags, individual, strict=True))
    # spread over the sources: their counts differ by at most one
    counts = [sum(f for f, g in zip(flags, groups, strict=True) if g == s) for s in ("a", "b")]
    assert abs(counts[0] - counts[1]) <= 1
    assert choose_holdout(tset, seed=3) == (flags, by)
