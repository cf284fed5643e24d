"""A few extreme voxels (saturated, dropped out, NaN/Inf) change neither the foreground, nor the
normalisation, nor the mask: the bundled T2 model on its lesion sample, through the command line,
and the shared preprocessing that training and scoring both run."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from napari_vaeloc.cli import main
from napari_vaeloc.evaluation.metrics import Overlap
from napari_vaeloc.io import load_volume
from napari_vaeloc.models.store import bundled_models, cached_model
from napari_vaeloc.preprocess import clip_outliers, outlier_mask, volume_to_slices
from napari_vaeloc.samples import SAMPLES, sample_path
from napari_vaeloc.training.datasets import build_slice_dataset, load_training_volumes

STEM = "scan"


def with_outliers(data: np.ndarray, n: int, kind: str, seed: int = 0) -> np.ndarray:
    """A float32 copy of ``data`` with ``n`` voxels at random (seeded) positions set to 50 times
    the maximum ("bright"), minus 50 times the maximum ("dark"), or NaN / +Inf ("nonfinite")."""
    out = np.array(data, dtype=np.float32)
    idx = np.random.default_rng(seed).choice(out.size, n, replace=False)
    top = float(np.nanmax(data))
    values = {"bright": 50 * top, "dark": -50 * top}
    if kind == "nonfinite":
        out.reshape(-1)[idx[::2]] = np.nan
        out.reshape(-1)[idx[1::2]] = np.inf
    else:
        out.reshape(-1)[idx] = values[kind]
    return out


def write_scan(path, data: np.ndarray, affine: np.ndarray):
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), affine), str(path))
    return path


#: how the T2 sample is scored: as given (it lies in the template's space)
PREPARE_MODES = ("none", "auto")


def mask_dice(scan_path, out_dir, truth: np.ndarray, prepare: str) -> float:
    """Dice of the default mask that `vaeloc localize` writes for ``scan_path``."""
    args = ["localize", str(scan_path), "--out", str(out_dir), "--device", "cpu", "--quiet"]
    assert main([*args, "--prepare", prepare]) == 0
    mask = np.asanyarray(nib.load(out_dir / f"{STEM}_mask.nii.gz").dataobj) > 0
    overlap = Overlap()
    overlap.add(mask, truth)
    return overlap.dice


@pytest.fixture(scope="module")
def t2():
    vol = load_volume(sample_path("t2-lesion"))
    truth = load_volume(sample_path("t2-lesion-truth")).data > 0
    return vol, truth


@pytest.fixture(scope="module", params=PREPARE_MODES)
def clean_dice(request, t2, tmp_path_factory) -> tuple[str, float]:
    vol, truth = t2
    d = tmp_path_factory.mktemp("clean")
    scan = write_scan(d / f"{STEM}.nii.gz", vol.data, vol.affine)
    return request.param, mask_dice(scan, d, truth, request.param)


@pytest.mark.parametrize(("kind", "n"), [("bright", 5), ("bright", 200), ("dark", 200)])
def test_mask_dice_survives_outliers(t2, clean_dice, tmp_path, kind, n):
    """Saturated (50x the maximum) or dropped-out (-50x) voxels at random positions: the mask's
    Dice stays within 0.02 of the clean scan's (it fell from 0.70 to 0.45 with 5 bright voxels
    and to 0 with 50 when the foreground and z-score used the raw range, mean and std)."""
    vol, truth = t2
    prepare, clean = clean_dice
    assert clean > 0.6  # the clean scan's mask finds the lesion
    scan = write_scan(tmp_path / f"{STEM}.nii.gz", with_outliers(vol.data, n, kind), vol.affine)
    assert abs(mask_dice(scan, tmp_path, truth, prepare) - clean) <= 0.02


@pytest.mark.parametrize("kind", ["bright", "dark", "nonfinite"])
def test_foreground_and_normalised_slices_ignore_outliers(t2, kind):
    """2000 extreme voxels (0.2 % of the volume, 1 % of the brain): the foreground mask changes
    only at those voxels, the z-score's mean and std by under 0.2 %, and nearly every model-space
    pixel keeps its value."""
    vol, _ = t2
    norm = cached_model("t2-brain").card.normalisation
    bad = with_outliers(vol.data, 2000, kind)
    changed = ~(bad == vol.data)  # NaN != anything
    if kind == "nonfinite":
        assert outlier_mask(bad)[changed].all()
    clean = volume_to_slices(vol.data, vol.affine, vol.spacing, "axial", 64, norm)
    dirty = volume_to_slices(bad, vol.affine, vol.spacing, "axial", 64, norm)
    assert not outlier_mask(vol.data).any()
    assert not np.any(clean.foreground_mask[~changed] ^ dirty.foreground_mask[~changed])
    for k in ("mean", "std"):
        assert dirty.stats[k] == pytest.approx(clean.stats[k], rel=2e-3)
    assert dirty.pad_value == clean.pad_value
    diff = np.abs(dirty.images.numpy() - clean.images.numpy())
    assert np.isfinite(dirty.images.numpy()).all()
    assert (diff > 0.05).mean() < 0.01
    assert np.array_equal(dirty.foreground, clean.foreground)


def test_clean_scans_are_processed_exactly_as_before():
    """No voxel of a bundled sample or a bundled model's template counts as an outlier (vessels
    and fat of the raw head included), so a clean scan's slices are those of the plain
    foreground z-score that the bundled models were trained and calibrated with."""
    volumes = [load_volume(sample_path(k)) for k, s in SAMPLES.items() if s.truth_of is None]
    for folder in bundled_models().values():
        volumes += [load_volume(p) for p in folder.glob("template*.nii.gz")]
    assert len(volumes) >= 7
    for vol in volumes:
        assert not outlier_mask(vol.data).any(), vol.path
        assert clip_outliers(vol.data)[0] is vol.data


def test_training_slices_equal_scoring_slices(t2, tmp_path):
    """The training loader and the scoring preprocessing give the same model-space slices for
    a scan with outliers and NaN/Inf voxels, and these match the clean scan's slices."""
    vol, _ = t2
    norm = cached_model("t2-brain").card.normalisation
    bad = with_outliers(with_outliers(vol.data, 300, "bright", 1), 300, "dark", 2)
    bad = with_outliers(bad, 300, "nonfinite", 3)
    paths = [write_scan(tmp_path / f"{STEM}{i}.nii.gz", bad, vol.affine) for i in range(3)]
    volumes, _ = load_training_volumes(paths)  # three volumes: one is held out whole
    ds = build_slice_dataset(volumes, "axial", 64, norm)
    scan = load_volume(paths[0])  # what the engine scores
    ms = volume_to_slices(scan.data, scan.affine, scan.spacing, "axial", 64, norm)
    scored = ms.images[ms.foreground].numpy()
    assert ds.train.shape[0] == 2 * scored.shape[0] and ds.val.shape[0] == scored.shape[0]
    for part in (ds.train[: len(scored)], ds.train[len(scored) :], ds.val):
        np.testing.assert_array_equal(part.numpy(), scored)
    assert ds.pad_value == ms.pad_value
    clean = volume_to_slices(vol.data, vol.affine, vol.spacing, "axial", 64, norm)
    diff = np.abs(scored - clean.images[clean.foreground].numpy())
    assert (diff > 0.05).mean() < 0.01
