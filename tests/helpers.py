"""Helpers shared by the tests (imported explicitly; fixtures live in conftest.py)."""

from __future__ import annotations

import numpy as np

from napari_vaeloc.models.store import ModelCard
from napari_vaeloc.models.vae import ConvVAE


def tiny_card(net: ConvVAE, name: str = "tiny") -> ModelCard:
    return ModelCard(
        name=name,
        architecture=net.config(),
        axis="axial",
        modality="T2",
        description="random weights for tests",
    )


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
