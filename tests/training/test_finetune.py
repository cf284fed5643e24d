"""Training options beyond the paper's input: a wider intensity clip, neighbouring slices as extra
input channels, and starting from a trained model's weights (`vaeloc train --clip, --neighbours,
--init`)."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import torch

from napari_vaeloc.cli import main
from napari_vaeloc.engine import localize
from napari_vaeloc.errors import ModelError
from napari_vaeloc.evaluation.synthetic import head_phantom
from napari_vaeloc.io import load_volume
from napari_vaeloc.models.card import ModelCard
from napari_vaeloc.models.store import load_model
from napari_vaeloc.models.vae import ConvVAE
from napari_vaeloc.preprocess import with_neighbours
from napari_vaeloc.scoring import score_batch
from napari_vaeloc.training.augment import AugmentConfig, Augmenter
from napari_vaeloc.training.builder import initial_weights, recalibrate

TINY = ["--image-size", "16", "--z-dim", "8", "--val-every", "4", "--batch-size", "16"]
TINY += ["--lr", "1e-3", "--quiet"]


@pytest.fixture(scope="module")
def healthy_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("healthy")
    for s in range(2):
        img = nib.Nifti1Image(head_phantom((24, 28, 24), seed=s), np.diag([2.0, 2, 2, 1]))
        nib.save(img, folder / f"healthy{s}.nii.gz")
    return folder


@pytest.fixture(scope="module")
def one_slice_model(healthy_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "plain"
    assert main(["train", str(healthy_dir), "--out", str(out), "--max-steps", "8", *TINY]) == 0
    return out


def test_with_neighbours_stacks_the_slices_on_each_side():
    images = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 1, 3, 3).clone()
    stacked = with_neighbours(images, 2)
    assert stacked.shape == (5, 5, 3, 3)
    # channel j of slice i holds slice i + j - 2, the edge slice repeated beyond the ends
    expected = np.clip(np.arange(5)[:, None] + np.arange(-2, 3)[None, :], 0, 4)
    assert np.array_equal(stacked[:, :, 0, 0].numpy(), expected)
    assert with_neighbours(images, 0) is images
    with pytest.raises(ValueError, match="neighbours must be"):
        with_neighbours(images, -1)


def test_augmentation_moves_neighbouring_slices_together():
    """Geometry and intensity changes are the same for every channel of a slice (only the
    noise is drawn per channel), so a stack stays a stack of neighbouring slices."""
    cfg = dataclasses.replace(AugmentConfig(), noise_p=0.0, elastic_p=1.0, bias_field_p=1.0)
    x = torch.randn(8, 1, 32, 32).clamp(-1.5, 1.5).repeat(1, 3, 1, 1)
    y = Augmenter(cfg)(x, torch.Generator().manual_seed(0))
    assert (y - x).abs().max() > 0.1  # it did change the slices
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])


def test_train_with_neighbours_and_a_wider_clip(healthy_dir, tmp_path):
    out = tmp_path / "stack"
    args = ["train", str(healthy_dir), "--out", str(out), "--max-steps", "8"]
    rc = main([*args, "--neighbours", "1", "--clip=-3,3", *TINY])
    assert rc == 0
    model = load_model(out)
    card = model.card
    assert card.preprocessing.neighbours == 1
    assert (card.architecture.in_channels, card.architecture.out_channels) == (3, 1)
    assert tuple(card.normalisation.clip) == (-3.0, 3.0)
    assert card.provenance.training["config"]["neighbours"] == 1
    res = localize(load_volume(healthy_dir / "healthy0.nii.gz"), model)
    assert res.maps["rec_error"].shape == (24, 28, 24)
    assert np.isfinite(res.maps["kl_grad"]).all()
    # recalibration rebuilds the held-out slices with their neighbours, as training did
    before = card.calibration.scales["rec_error"]
    recalibrate(out, {"rec_error": 1.0}, fpr=None, source_dir=healthy_dir.parent)
    assert load_model(out).card.calibration.scales["rec_error"] == pytest.approx(before, rel=1e-4)
    # a card whose channels do not match its neighbours is refused when read
    bad = card.to_dict()
    bad["neighbours"] = 2
    with pytest.raises(ModelError, match="5 input channels, not 3"):
        ModelCard.from_dict(bad)


def test_a_neighbours_model_started_from_a_one_slice_model_scores_like_it(one_slice_model):
    """The extra input channels start at zero weight: before any training step the new model's
    maps of the middle slice are those of the model it started from."""
    old = load_model(one_slice_model)
    net = ConvVAE(image_size=16, z_dim=8, in_channels=3, out_channels=1)
    record = initial_weights(net, one_slice_model)
    assert record["model"] == old.card.name and record["weights_sha256"]
    net.eval().requires_grad_(False)
    x = torch.randn(6, 1, 16, 16).clamp(-1.5, 1.5)
    stacked = torch.cat([torch.randn_like(x), x, torch.randn_like(x)], dim=1)
    a = score_batch(old.network, x, restoration=True, smoothgrad=False)
    b = score_batch(net, stacked, restoration=True, smoothgrad=False)
    for k in ("rec_error", "kl_grad", "elbo_grad", "restoration", "reconstruction", "kl"):
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_init_continues_from_the_model_and_records_it(healthy_dir, one_slice_model, tmp_path):
    out = tmp_path / "tuned"
    args = ["train", str(healthy_dir), "--out", str(out), "--max-steps", "4"]
    rc = main([*args, "--init", str(one_slice_model), *TINY])
    assert rc == 0
    start = load_model(one_slice_model).card
    tuned = load_model(out).card
    assert tuned.provenance.training["init_from"]["weights_sha256"] == start.weights_sha256
    # started from the trained weights: the first validation is already near the old best
    first = tuned.provenance.training["history"][0]["val_loss"]
    fresh = start.provenance.training["history"][0]["val_loss"]
    assert first < fresh


def test_bad_clip_and_mismatched_init_are_refused_in_one_line(
    healthy_dir, one_slice_model, tmp_path, capsys
):
    base = ["train", str(healthy_dir), "--out", str(tmp_path / "m"), "--max-steps", "2"]
    assert main([*base, "--clip=3,-3", *TINY]) == 2
    assert "--clip needs finite LOW < 0 < HIGH" in capsys.readouterr().err
    assert main([*base, "--clip", "wide", *TINY]) == 2
    assert "--clip takes LOW,HIGH" in capsys.readouterr().err
    assert main([*base, "--init", str(one_slice_model), *TINY[:2], "--z-dim", "4"]) == 2
    err = capsys.readouterr().err
    assert "architecture differs" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()
