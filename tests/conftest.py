"""Shared fixtures: tiny random VAEs saved as real model folders, phantom volumes, real NIfTI
files from nibabel's test data."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import pytest
import torch

from napari_vaeloc.evaluation.synthetic import head_phantom
from napari_vaeloc.io import Volume
from napari_vaeloc.models.store import LoadedModel, load_model, save_model
from napari_vaeloc.models.vae import ConvVAE

from .helpers import tiny_card

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


@pytest.fixture(scope="session")
def tiny_network() -> ConvVAE:
    torch.manual_seed(0)
    return ConvVAE(image_size=16, widths=(8, 16), z_dim=8).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_network) -> Path:
    return save_model(tiny_network, tiny_card(tiny_network), tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture
def tiny_model(tiny_model_dir) -> LoadedModel:
    return load_model(tiny_model_dir)


@pytest.fixture(scope="session")
def phantom() -> Volume:
    return Volume.from_array(head_phantom((20, 24, 18), seed=1), spacing=(1.5, 1.25, 2.0))


@pytest.fixture(scope="session")
def anatomical_path() -> Path:
    p = NIBABEL_DATA / "anatomical.nii"
    assert p.is_file(), "nibabel's test data (anatomical.nii) is missing"
    return p


@pytest.fixture(scope="session")
def example4d_path() -> Path:
    p = NIBABEL_DATA / "example4d.nii.gz"
    assert p.is_file(), "nibabel's test data (example4d.nii.gz) is missing"
    return p
