"""The bundled sample scans, the bundled models, and the README's main command (`vaeloc demo`)."""

from __future__ import annotations

import json
import re
import shutil

import nibabel as nib
import numpy as np
import pytest

from napari_vaeloc.cli import main
from napari_vaeloc.combine import PostProcessor
from napari_vaeloc.demo import mask_parts, run_demo
from napari_vaeloc.engine import EngineOptions, localize
from napari_vaeloc.errors import ModelError
from napari_vaeloc.io import load_volume
from napari_vaeloc.models.store import WEIGHTS_FILE, bundled_models, load_model
from napari_vaeloc.samples import SAMPLES, sample_path

MNI_SAMPLES = [k for k in SAMPLES if not k.startswith("t1-head")]
HEAD_SAMPLES = [k for k in SAMPLES if k.startswith("t1-head")]


@pytest.mark.parametrize("key", MNI_SAMPLES)
def test_sample_scans_are_small_real_anatomy_in_mni_space(key):
    path = sample_path(key)
    assert path.stat().st_size < 2_000_000
    img = nib.load(path)
    assert img.shape == (96, 114, 96)
    assert np.allclose(img.header.get_zooms(), 2.0)
    assert int(img.header["sform_code"]) == 4
    data = img.get_fdata()
    if "truth" in key:
        assert 500 < data.sum() < 20_000 and set(np.unique(data)) == {0, 1}
    else:
        assert 0.15 < (data > 0).mean() < 0.4  # a skull-stripped brain, not noise
    assert SAMPLES[key].notice_path.is_file()


@pytest.mark.parametrize("key", HEAD_SAMPLES)
def test_raw_head_samples_are_a_real_head_in_its_own_orientation(key):
    img = nib.load(sample_path(key))
    assert sample_path(key).stat().st_size < 1_000_000
    assert img.shape == (128, 128, 128) and np.allclose(img.header.get_zooms(), 2.0)
    assert nib.aff2axcodes(img.affine) == ("L", "I", "A")  # scanner order, not RAS
    data = img.get_fdata()
    if "truth" in key or "mask" in key:
        assert set(np.unique(data)) == {0, 1}
        ml = data.sum() * 8 / 1000
        assert (1000 < ml < 1800) if "mask" in key else (5 < ml < 60), ml
    else:
        brain = nib.load(sample_path("t1-head-brain-mask")).get_fdata() > 0
        head = data > 0.1 * data.max()
        assert head.sum() > 1.8 * brain.sum()  # skull, scalp and face are there
    assert SAMPLES[key].notice_path.name == "PYCORTEX-LICENSE"
    assert SAMPLES[key].notice_path.is_file()


def test_lesion_sample_differs_from_healthy_only_at_the_lesion():
    healthy = nib.load(sample_path("t2-healthy")).get_fdata()
    lesion = nib.load(sample_path("t2-lesion")).get_fdata()
    truth = nib.load(sample_path("t2-lesion-truth")).get_fdata() > 0
    changed = np.abs(lesion - healthy) > 1.0  # well above the uint8 rounding of either file
    assert changed[~truth].mean() < 1e-3
    assert changed[truth].mean() > 0.5


def test_bundled_models_are_listed_checked_and_small(capsys):
    from napari_vaeloc.cli.models import trained_on

    models = bundled_models()
    assert {"t2-brain", "t1-brain"} <= set(models)
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name, folder in models.items():
        assert name in out
        assert (folder / WEIGHTS_FILE).stat().st_size < 20_000_000
        card = load_model(folder).card  # checksum verified
        assert card.calibration and card.defaults.threshold > 0
        assert "ICBM" in card.provenance.sources and "McGill" in card.provenance.licence
        assert card.modality in out and trained_on(card) in out


def test_tampered_bundled_weights_refused(tmp_path):
    folder = shutil.copytree(bundled_models()["t2-brain"], tmp_path / "t2-brain")
    raw = bytearray((folder / WEIGHTS_FILE).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (folder / WEIGHTS_FILE).write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="checksum"):
        load_model(folder)


def test_t2_brain_finds_the_sample_lesion(tmp_path):
    """The bundled T2 model on the sample with a synthetic lesion: the default combined map
    separates lesion from healthy brain (pixel AUROC inside the brain > 0.9)."""
    res = run_demo(tmp_path, model="t2-brain", device="cpu", sample="t2-lesion")
    m = res["metrics"]
    print(json.dumps({k: round(v["auroc"], 3) for k, v in m.items()}))
    assert m["combined (default)"]["auroc"] > 0.9, m
    assert res["mask_dice"] > 0.1


def test_default_threshold_is_rare_on_healthy_brain():
    """Calibration: on the healthy T2 sample few brain voxels exceed the default threshold."""
    model = load_model("t2-brain")
    vol = load_volume(sample_path("t2-healthy"))
    res = localize(vol, model, EngineOptions(device="cpu"))
    post = PostProcessor(res)
    s = post.settings
    assert post.is_calibrated()
    c = post.combined()
    fpr = float((c[res.foreground] > s.threshold).mean())
    print(f"healthy false-positive rate at the default threshold: {fpr:.5f}")
    assert fpr < 0.01


def test_demo_command_end_to_end(tmp_path, capsys):
    """The README's main command: the whole pipeline on the raw T1 head, checks printed next
    to the lesion metrics, the lesion found inside the brain and nothing flagged outside it."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    for k in ("rec_error", "kl_grad", "elbo_grad", "combi", "combined (default)", "Dice"):
        assert k in text
    for check in ("voxel size", "skull", "coverage", "registration", "modality", "contrast"):
        assert f"check {check}: ok" in text, text
    assert "brain extraction: done" in text and "registration: done" in text
    row = next(line for line in text.splitlines() if "combined (default)" in line).split()
    auroc, ap = float(row[-3]), float(row[-2])
    assert auroc > 0.95 and ap > 0.5, row
    assert "0.0 ml outside the brain" in text
    # printed in the order of `vaeloc localize`: preparation, the run's line, then the mask
    lines = text.splitlines()
    first = {
        key: next(i for i, ln in enumerate(lines) if ln.startswith(key))
        for key in ("preparation:", "t1-brain on cpu", "pixel metrics", "mask: ")
    }
    assert list(first.values()) == sorted(first.values()), first
    # the mask line is the one `vaeloc localize` prints, then how it meets the known lesion
    assert re.search(r"^mask: \d+\.\d ml in \d+ parts? \(threshold [\d.]+, each part", text, re.M)
    assert re.search(r"Dice 0\.\d+; \d+ parts? \(\d+\.\d ml\) not touching it", text)
    names = {p.name for p in out.iterdir()}
    assert {
        "sample_t1_head_lesion_mask.nii.gz",
        "sample_t1_head_lesion_combined.nii.gz",
        "sample_t1_head_lesion_scores.json",
    } <= names
    scores = json.loads((out / "sample_t1_head_lesion_scores.json").read_text())
    checks = [c["name"] for c in scores["preparation"]["checks"]]
    assert checks[-3:] == ["modality", "contrast", "contrast agent"]
    assert main(["demo", "--out", str(out), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["demo", "--out", str(out), "--quiet", "--overwrite"]) == 0


def test_demo_counts_mask_parts_away_from_the_lesion(tmp_path, capsys):
    """The demo's mask line gives the mask's parts and those that do not touch the lesion (false
    positives), counted on the mask it wrote; on the T2 sample (no preparation steps but bias
    correction: a few seconds)."""
    out = tmp_path / "demo"
    argv = ["demo", "--sample", "t2-lesion", "--out", str(out), "--quiet", "--device", "cpu"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.startswith("mask: "))
    line = lines[i] + lines[i + 1]  # the mask's own line, then how it meets the lesion
    mask = np.asarray(nib.load(out / "sample_t2_lesion_mask.nii.gz").dataobj) > 0
    truth = np.asarray(nib.load(sample_path("t2-lesion-truth")).dataobj) > 0
    labels, n = mask_parts(mask)
    stray = [k for k in range(1, n + 1) if not (truth & (labels == k)).any()]
    stray_ml = sum(int((labels == k).sum()) for k in stray) * 0.008  # 2 mm voxels
    s = "" if n == 1 else "s"
    assert f"mask: {mask.sum() * 0.008:.1f} ml in {n} part{s} (" in line, line
    assert f"; {len(stray)} part{'' if len(stray) == 1 else 's'} ({stray_ml:.1f} ml) not " in line
    assert n >= 1 and n > len(stray)  # the lesion is found


def test_mask_parts_are_26_connected():
    mask = np.zeros((6, 6, 6), np.uint8)
    mask[0, 0, 0] = mask[1, 1, 1] = 1  # corners touch: one part
    mask[4, 4, 4] = 1
    labels, n = mask_parts(mask)
    assert n == 2 and labels[0, 0, 0] == labels[1, 1, 1] != labels[4, 4, 4]


def test_count_parts_counts_within_the_bounding_box():
    from napari_vaeloc.demo import count_parts

    mask = np.zeros((30, 40, 20), np.uint8)
    assert count_parts(mask) == 0
    mask[3:6, 30:33, 2:4] = 1
    mask[10, 10, 10] = 1
    mask[11, 11, 11] = 1  # touches the voxel before at a corner: one part (26-connected)
    mask[20:22, 5, 15:18] = 1
    assert count_parts(mask) == mask_parts(mask)[1] == 3
    assert count_parts(mask[..., 10:12]) == mask_parts(mask[..., 10:12])[1] == 1
