"""The README's main command (`vaeloc demo`) on the bundled sample scan, shortened."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from napari_vaeloc.cli import main
from napari_vaeloc.demo import sample_path
from napari_vaeloc.models.store import load_model


def test_sample_scan_is_real_anatomy_in_mni_space():
    img = nib.load(sample_path())
    assert img.shape == (96, 114, 96)
    assert np.allclose(img.header.get_zooms(), 2.0)
    assert int(img.header["sform_code"]) == 4
    data = img.get_fdata()
    assert 0.15 < (data > 0).mean() < 0.4  # a skull-stripped brain, not noise
    assert sample_path("MNI-COPYING").is_file()


def test_demo_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--seconds", "4", "--quiet", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    for k in ("rec_error", "kl_grad", "elbo_grad", "combi"):
        assert k in text
    names = {p.name for p in out.iterdir()}
    assert {
        "sample_t2_lesion.nii.gz",
        "sample_t2_lesion_truth.nii.gz",
        "demo-model",
        "sample_t2_lesion_mask.nii.gz",
        "sample_t2_lesion_scores.json",
    } <= names
    model = load_model(out / "demo-model")  # the saved demo model passes the checksum
    assert "DEMO MODEL" in model.card.description
    truth = nib.load(out / "sample_t2_lesion_truth.nii.gz").get_fdata()
    assert 100 < truth.sum() < 2000
    # a second run refuses to overwrite, a run with --overwrite succeeds
    assert main(["demo", "--out", str(out), "--seconds", "1", "--quiet"]) == 2
    assert main(["demo", "--out", str(out), "--seconds", "1", "--quiet", "--overwrite"]) == 0
