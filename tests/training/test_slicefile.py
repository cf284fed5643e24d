"""Slice sets: prepare the training slices where the sources are, train from them elsewhere."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_vaeloc.cli import main
from napari_vaeloc.errors import InputError
from napari_vaeloc.io import load_volume
from napari_vaeloc.models.store import load_model
from napari_vaeloc.preprocess import Normalisation
from napari_vaeloc.samples import sample_path
from napari_vaeloc.training.builder import prepare_slices
from napari_vaeloc.training.datasets import block_mean
from napari_vaeloc.training.loop import TrainConfig
from napari_vaeloc.training.slicefile import read_slices

SMALL = ["--image-size", "16", "--z-dim", "8", "--seed", "0", "--quiet"]
TRAIN = ["--max-steps", "6", "--val-every", "3", "--lr", "1e-3", "--batch-size", "8"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[str]:
    """Two real healthy T1 brains (the bundled ICBM 2009c sample at 6 mm and its mirror)."""
    vol = load_volume(sample_path("t1-healthy"))
    data, affine = block_mean(vol.data, vol.affine, vol.spacing, 6.0)
    folder = tmp_path_factory.mktemp("sources")
    paths = []
    for i, d in enumerate((data, data[::-1])):
        p = folder / f"healthy{i}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(d), affine), p)
        paths.append(str(p))
    return paths


def _export(sources, out, *extra) -> int:
    return main(
        [
            *("train", *sources, "--modality", "T1", "--individuals", "1", "--clip=-3,3"),
            *SMALL,
            *("--export-slices", "--out", str(out), *extra),
        ]
    )


def _train_from(slices, out, *extra) -> int:
    return main(
        [
            *("train", "--slices", str(slices), "--modality", "T1", "--clip=-3,3"),
            *SMALL,
            *TRAIN,
            *("--out", str(out), *extra),
        ]
    )


def test_a_slice_set_holds_the_sources_slices_and_trains_a_model(sources, tmp_path):
    torch.set_num_threads(1)
    f = tmp_path / "t1.npz"
    assert _export(sources, f) == 0
    got = read_slices(f)
    cfg = TrainConfig(image_size=16, z_dim=8, seed=0)
    want = prepare_slices(
        sources, cfg, modality="T1", normalisation=Normalisation(clip=(-3, 3)), individuals=1
    )
    assert got.data.train.shape == want.data.train.shape
    assert got.data.val.shape == want.data.val.shape and len(got.data.val) > 0
    # float16 storage: relative rounding 2**-11 of values within the clip (|z| <= 3)
    assert float((got.data.train - want.data.train).abs().max()) <= 3 * 2.0**-11
    assert float((got.data.val - want.data.val).abs().max()) <= 3 * 2.0**-11
    assert torch.equal(got.data.val_foreground, want.data.val_foreground)
    assert got.records == want.records and got.data.split == want.data.split
    assert got.normalisation.clip == (-3.0, 3.0) and got.modality == "T1"

    assert _train_from(f, tmp_path / "a") == 0
    assert _train_from(f, tmp_path / "b") == 0
    a, b = load_model(tmp_path / "a").card, load_model(tmp_path / "b").card
    assert a.weights_sha256 == b.weights_sha256  # seeded: reproducible from the file
    assert a.preprocessing.normalisation.clip == (-3.0, 3.0)
    assert a.preprocessing.modality == "T1"
    training = a.provenance.training
    assert training["slice_set"] == "t1.npz"
    assert training["individuals"]["per_source"] == 1
    assert [r["name"] for r in training["source_records"]] == ["healthy0.nii.gz", "healthy1.nii.gz"]
    assert a.provenance.sources.endswith(
        "healthy1.nii.gz: NIfTI file [user's file] + 1 synthetic individual"
    )
    assert training["split"]["n_train"] == len(got.data.train)


def test_bad_slice_sets_and_contradicting_settings_are_refused(sources, tmp_path, capsys):
    f = tmp_path / "t1.npz"
    assert _export(sources, f) == 0
    before = f.read_bytes()
    capsys.readouterr()
    assert _export(sources, f) != 0  # never overwritten without --overwrite
    assert f.read_bytes() == before
    assert "exists" in capsys.readouterr().err

    for extra, word in (
        (["--clip=-1.5,1.5"], "--clip -3,3"),
        (["--image-size", "32"], "--image-size 16"),
        (["--modality", "T2"], "--modality T1"),
    ):
        args = ["train", "--slices", str(f), "--modality", "T1", "--clip=-3,3", *SMALL, *TRAIN]
        args += ["--out", str(tmp_path / "m"), *extra]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert word in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "m").exists()

    junk = tmp_path / "junk.npz"
    np.savez(junk, a=np.zeros(3))
    nifti = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), nifti)
    for bad, word in (
        (junk, "is not a slice set"),
        (nifti, "is not a slice set"),
        (tmp_path / "missing.npz", "it is missing"),
        (tmp_path, "it is a folder"),
    ):
        assert _train_from(bad, tmp_path / "m") == 2
        err = capsys.readouterr().err
        assert word in err and "pickle" not in err and "Errno" not in err
        assert len(err.strip().splitlines()) == 1
    assert _train_from(f, tmp_path / "m", "--individuals", "3") == 2
    assert "--individuals were decided when the slice set was exported" in capsys.readouterr().err
    meta = json.loads(str(np.load(f)["meta"]))
    other = tmp_path / "other.npz"
    with np.load(f) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["meta"] = np.array(json.dumps({**meta, "format": "something else 9"}))
    np.savez_compressed(other, **arrays)
    with pytest.raises(InputError, match="another format"):
        read_slices(other)
    assert main(["train", *sources, "--slices", str(f), "--out", str(tmp_path / "m")]) == 2
    assert main(["train", "--out", str(tmp_path / "m")]) == 2
    assert not (tmp_path / "m").exists()


def test_a_volume_of_slices_round_trips_through_the_file(tmp_path):
    """Values at the clip bounds and the pad value survive float16 storage exactly."""
    from napari_vaeloc.training.datasets import SliceDataset
    from napari_vaeloc.training.slicefile import SliceSet, write_slices

    gen = torch.Generator().manual_seed(0)
    train = torch.rand((5, 1, 8, 8), generator=gen) * 3 - 1.5
    train[0, 0, 0] = -1.5
    data = SliceDataset(train, train[:2], train[:2, 0] > 0, -1.5, {"n_train": 5, "n_val": 2})
    sset = SliceSet(data, "axial", 8, 0, "T2", Normalisation(), [], ["x"], None)
    p = write_slices(sset, tmp_path / "s.npz")
    back = read_slices(p)
    assert back.data.train.dtype == torch.float32
    assert torch.equal(back.data.train[0, 0, 0], train[0, 0, 0])
    assert back.data.pad_value == -1.5 and back.sources == ["x"]
    assert float((back.data.train - train).abs().max()) <= 1.5 * 2.0**-11
