"""Helpers shared by the tests (imported explicitly; fixtures live in conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from napari_vaeloc.engine import LocalizationResult
from napari_vaeloc.io import Volume
from napari_vaeloc.models.card import (
    Architecture,
    Calibration,
    ModelCard,
    PostProcessingDefaults,
    Preprocessing,
    Provenance,
)
from napari_vaeloc.models.vae import ConvVAE


def tiny_card(net: ConvVAE, name: str = "tiny") -> ModelCard:
    return ModelCard(
        name=name,
        architecture=Architecture.from_dict(net.config()),
        preprocessing=Preprocessing(axis="axial", modality="T2"),
        provenance=Provenance(description="random weights for tests"),
    )


def card_with(calibration: dict | None = None, defaults: dict | None = None) -> ModelCard:
    """A card with the given calibration and defaults (JSON form), no network."""
    return ModelCard(
        name="x",
        architecture=Architecture(type="conv", image_size=16, z_dim=4),
        calibration=None if calibration is None else Calibration.from_dict(calibration),
        defaults=PostProcessingDefaults.from_dict(defaults or {}),
    )


def make_result(
    maps: dict[str, np.ndarray], foreground: np.ndarray, volume: Volume, card: ModelCard
) -> LocalizationResult:
    """A localization result made of given maps (for post-processing tests)."""
    return LocalizationResult(volume, card, maps, foreground, {}, {}, "axial", 2, "cpu", 0.0)


def oblique_affine(seed: int = 0) -> np.ndarray:
    """A rotated, permuted, flipped, anisotropic voxel-to-world matrix."""
    rng = np.random.default_rng(seed)
    from scipy.spatial.transform import Rotation

    rot = Rotation.from_euler("xyz", rng.uniform(-0.3, 0.3, 3)).as_matrix()
    perm = np.eye(3)[[2, 0, 1]] * np.array([-1, 1, -1])[:, None]
    aff = np.eye(4)
    aff[:3, :3] = rot @ perm @ np.diag([0.9, 1.3, 2.2])
    aff[:3, 3] = rng.uniform(-100, 100, 3)
    return aff


def listing(root: Path) -> dict[str, bytes | None]:
    """Every file and folder under ``root`` (hidden ones too) with the bytes of each file."""
    found: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            found[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = None
        for f in filenames:
            p = os.path.join(dirpath, f)
            found[os.path.relpath(p, root)] = Path(p).read_bytes()
    return found


def outline_reference(c, threshold, grow, fraction, n=0):
    """The outlined mask computed part by part, as :mod:`napari_vaeloc.combine` states step 5:
    the parts of ``c > grow`` (26 neighbours) whose peak passes the threshold and that have
    at least ``n`` voxels, each cut at max(grow, fraction * its peak)."""
    from scipy.ndimage import label

    labels, count = label(c > grow, structure=np.ones((3, 3, 3), bool))
    out = np.zeros(c.shape, np.uint8)
    for i in range(1, count + 1):
        part = labels == i
        peak = c[part].max()
        if peak > threshold and part.sum() >= n:
            out[part & (c >= max(grow, fraction * peak))] = 1
    return out
