"""Training: the data pipeline, resumable checkpoints, calibration and `vaeloc train`."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_vaeloc.cli import main
from napari_vaeloc.engine import localize
from napari_vaeloc.evaluation.synthetic import head_phantom
from napari_vaeloc.io import Volume, load_volume
from napari_vaeloc.models.store import load_model
from napari_vaeloc.models.vae import ConvVAE
from napari_vaeloc.preprocess import Normalisation, volume_to_slices
from napari_vaeloc.samples import sample_path
from napari_vaeloc.training.builder import OWN_DATA_LICENCE
from napari_vaeloc.training.datasets import _slab_split, build_slice_dataset
from napari_vaeloc.training.loop import (
    TrainConfig,
    calibrate,
    coarse_noise,
    context_boxes,
    fit,
)


def test_slab_split_never_mixes_neighbours():
    rng = np.random.default_rng(0)
    train, val = _slab_split(100, rng, 0.2, slab=8, gap=2)
    assert len(val) >= 8 and len(np.intersect1d(train, val)) == 0
    for v in val:  # no training slice within 2 of a validation slice
        assert np.abs(train - v).min() > 0 if v in (0, 99) else np.abs(train - v).min() >= 1
    dist = np.abs(train[:, None] - val[None, :]).min()
    assert dist >= 3


def test_dataset_uses_the_engine_preprocessing(phantom):
    data = build_slice_dataset(
        [phantom], "axial", 16, Normalisation(), val_fraction=0.3, slab=4, gap=1
    )
    ms = volume_to_slices(
        phantom.data, phantom.affine, phantom.spacing, "axial", 16, Normalisation()
    )
    fg_slices = ms.images[torch.from_numpy(np.flatnonzero(ms.foreground))]
    # every training and validation slice is one of the engine's slices, unchanged
    for s in torch.cat([data.train, data.val]):
        assert (fg_slices - s).abs().flatten(1).max(1).values.min() == 0
    assert data.split["by"] == "slab" and data.split["n_val"] > 0
    assert data.val_foreground.shape == (len(data.val), 16, 16)
    three = [Volume.from_array(head_phantom((16, 18, 14), seed=s)) for s in range(3)]
    by_vol = build_slice_dataset(three, "axial", 16, Normalisation())
    counts = [
        int(
            volume_to_slices(
                v.data, v.affine, v.spacing, "axial", 16, Normalisation()
            ).foreground.sum()
        )
        for v in three
    ]
    assert by_vol.split["by"] == "volume" and by_vol.split["n_val"] in counts
    assert by_vol.split["n_val"] + by_vol.split["n_train"] == sum(counts)


def _fit(images, val, steps, ckpt=None, resume=False, denoise_std=0.0, context_weight=0.0):
    torch.manual_seed(0)
    net = ConvVAE(image_size=16, widths=(8, 16), z_dim=8)
    cfg = TrainConfig(
        image_size=16, z_dim=8, lr=1e-3, batch_size=8, max_steps=steps, val_every=5, patience=100,
        denoise_std=denoise_std, denoise_cells=4, context_weight=context_weight,
    )  # fmt: skip
    return fit(net, images, val, cfg, checkpoint_dir=ckpt, resume=resume)


def test_coarse_noise_is_smooth_and_has_its_std():
    gen = torch.Generator().manual_seed(1)
    n = coarse_noise((64, 1, 32, 32), 0.2, 4, gen)
    assert n.shape == (64, 1, 32, 32)
    assert 0.12 < float(n.std()) < 0.22  # bilinear upsampling keeps most of the spread
    step = (n[..., 1:] - n[..., :-1]).abs().mean() / n.abs().mean()
    assert step < 0.25  # neighbours close: coarse, not white noise (which gives about 1.1)


def test_context_boxes_cover_a_random_box_per_image():
    gen = torch.Generator().manual_seed(2)
    box = context_boxes((50, 1, 32, 32), gen)
    frac = box.float().mean(dim=(1, 2, 3))
    assert box.dtype == torch.bool and (frac >= (4 / 32) ** 2 * 0.5).all()
    assert (frac <= 0.5**2 * 1.3).all() and frac.std() > 0  # sizes vary, up to half a side
    rows, cols = box[:, 0].any(2), box[:, 0].any(1)
    area = rows.sum(1) * cols.sum(1)
    assert torch.equal(area, box[:, 0].sum((1, 2)))  # one rectangle each


@pytest.mark.parametrize("variant", [{"denoise_std": 0.3}, {"context_weight": 1.0}])
def test_denoising_and_context_training_differ_and_are_reproducible(variant):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(40, 1, 16, 16, generator=gen).clamp(-1.5, 1.5)
    val = torch.randn(6, 1, 16, 16, generator=gen).clamp(-1.5, 1.5)
    plain = _fit(images, val, 10)
    a = _fit(images, val, 10, **variant)
    b = _fit(images, val, 10, **variant)
    sa, sb, sp = (r.network.state_dict() for r in (a, b, plain))
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k)
    assert any(not torch.equal(sa[k], sp[k]) for k in sa)  # the variant changed the training


def test_resumed_training_equals_uninterrupted(tmp_path):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(40, 1, 16, 16, generator=gen).clamp(-1.5, 1.5)
    val = torch.randn(6, 1, 16, 16, generator=gen).clamp(-1.5, 1.5)
    full = _fit(images, val, 20)
    _fit(images, val, 10, ckpt=tmp_path / "ck")
    resumed = _fit(images, val, 20, ckpt=tmp_path / "ck", resume=True)
    assert [h["step"] for h in resumed.history] == [5, 10, 15, 20]
    np.testing.assert_allclose(
        [h["val_loss"] for h in resumed.history], [h["val_loss"] for h in full.history], rtol=1e-5
    )
    for (k, a), b in zip(
        full.network.state_dict().items(), resumed.network.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, msg=k)


def test_calibration_percentiles_are_ordered(tiny_network):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10, 1, 16, 16, generator=gen)
    fg = torch.ones(10, 16, 16, dtype=torch.bool)
    cal = calibrate(tiny_network, x, fg, weights={"combi": 1.0, "elbo_grad": 1.0})
    for name, pct in cal.percentiles.items():
        vals = list(pct.values())
        assert vals == sorted(vals), name
        assert cal.scales[name] == pct["99.0"]
    fpr = cal.combined_fpr
    assert fpr["0.1"] <= fpr["0.01"] <= fpr["0.001"]
    assert cal.n_pixels == 10 * 16 * 16


def test_train_command_end_to_end(tmp_path, capsys):
    """`vaeloc train` on NIfTI files for a few steps; the model loads, is calibrated, and scores."""
    for s in range(2):
        img = nib.Nifti1Image(head_phantom((24, 28, 24), seed=s), np.diag([2.0, 2, 2, 1]))
        nib.save(img, tmp_path / f"healthy{s}.nii.gz")
    out = tmp_path / "model"
    rc = main(
        [
            "train",
            str(tmp_path),
            "--out",
            str(out),
            "--image-size",
            "16",
            "--z-dim",
            "8",
            "--max-steps",
            "12",
            "--val-every",
            "4",
            "--batch-size",
            "16",
            "--lr",
            "1e-3",
            "--quiet",
            "--name",
            "phantom-t2",
        ]
    )
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    model = load_model(out)
    card = model.card
    assert card.name == "phantom-t2"
    # the summary's numbers are rounded to 4 significant digits
    line = next(t for t in printed.out.splitlines() if t.strip().startswith("threshold:"))
    assert line.split(":")[1].strip() == f"{card.defaults.threshold:.4g}"
    assert card.calibration.kl_grad_scale > 0
    assert set(card.calibration.scales) >= {"rec_error", "kl_grad", "elbo_grad", "combi"}
    assert card.defaults.threshold == card.calibration.combined_fpr["0.01"]
    assert [h["step"] for h in card.provenance.training["history"]] == [4, 8, 12]
    assert card.provenance.training["split"]["by"] == "slab"
    assert "healthy0.nii.gz: NIfTI file" in card.provenance.sources
    assert "healthy1.nii.gz: NIfTI file" in card.provenance.sources
    assert card.provenance.licence == OWN_DATA_LICENCE
    assert not (tmp_path / ".model.checkpoint").exists()
    res = localize(load_volume(tmp_path / "healthy0.nii.gz"), model)
    assert res.maps["combi"].shape == (24, 28, 24)
    assert json.loads((out / "model.json").read_text())["training"]["augment"]["flip_p"] == 0.5
    assert main(["train", str(tmp_path / "healthy0.nii.gz"), "--out", str(out), "--quiet"]) == 2


def test_train_refuses_bad_sources(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nothing"), "--out", str(tmp_path / "m"), "--quiet"]) == 2
    assert "neither a NIfTI file" in capsys.readouterr().err
    with pytest.raises(Exception, match="unknown template"):
        from napari_vaeloc.samples import template

        template("icbm-t3")


def test_same_command_gives_the_same_weights_file(tmp_path):
    img = nib.Nifti1Image(head_phantom((24, 28, 24), seed=3), np.diag([2.0, 2, 2, 1]))
    nib.save(img, tmp_path / "healthy.nii.gz")
    args = [
        "train",
        str(tmp_path / "healthy.nii.gz"),
        "--image-size",
        "16",
        "--z-dim",
        "8",
        "--max-steps",
        "6",
        "--val-every",
        "3",
        "--batch-size",
        "8",
        "--quiet",
        "--seed",
        "5",
    ]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    a, b = load_model(tmp_path / "a").card, load_model(tmp_path / "b").card
    assert a.weights_sha256 == b.weights_sha256
    assert main([*args[:-1], "6", "--out", str(tmp_path / "c")]) == 0
    assert load_model(tmp_path / "c").card.weights_sha256 != a.weights_sha256


def test_a_model_trained_on_templates_ships_their_space_and_prepares_scans(
    tmp_path, capsys, monkeypatch
):
    """Trained on template names, a model learned the ICBM 2009c space: it ships the bundled
    T1 model's registration template, so a raw head is registered to it before scoring (a
    model of the user's own files ships none and scores scans as given)."""
    from collections import OrderedDict

    from napari_vaeloc import prepare

    # an empty preparation cache: the head prepared by an earlier test would skip the stages
    monkeypatch.setattr(prepare, "_CACHE", OrderedDict())
    out = tmp_path / "from-templates"
    args = ["train", "icbm-t1", "--out", str(out), "--modality", "T1", "--image-size", "16",
            "--z-dim", "8", "--max-steps", "8", "--val-every", "4", "--batch-size", "16",
            "--quiet"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    card = load_model(out).card
    assert card.preprocessing.template == "template.nii.gz"
    assert (out / "template.nii.gz").is_file() and (out / "template_brain_mask.nii.gz").is_file()
    bundled = load_model("t1-brain")
    same = (bundled.path / bundled.card.preprocessing.template).read_bytes()
    assert (out / "template.nii.gz").read_bytes() == same
    scan = tmp_path / "head_out"
    rc = main(["localize", str(sample_path("t1-head")), "--model", str(out), "--out", str(scan)])
    assert rc == 0
    err = capsys.readouterr().err
    assert "registration ..." in err and "scored as given" not in err
    report = json.loads(next(scan.glob("*_scores.json")).read_text())
    ran = {s["name"] for s in report["preparation"]["steps"] if s["ran"]}
    assert {"brain extraction", "registration"} <= ran
