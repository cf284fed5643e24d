"""Synthetic data with ground truth: head-like phantoms and inserted lesions (numpy, seeded)."""

from __future__ import annotations

import numpy as np


def _grid(shape: tuple[int, ...]) -> list[np.ndarray]:
    """Coordinates in [-1, 1] along each axis, broadcastable to ``shape``."""
    return list(np.ogrid[tuple(slice(-1.0, 1.0, complex(0, n)) for n in shape)])


def head_phantom(shape: tuple[int, int, int] = (48, 56, 48), seed: int = 0) -> np.ndarray:
    """A healthy-looking head phantom, float32 (X, Y, Z) in [0, ~1].

    Skull shell, brain ellipsoid with two ventricles, and smooth random texture; ``seed`` varies
    the size, position and texture a little, like different subjects.
    """
    rng = np.random.default_rng(seed)
    x, y, z = _grid(shape)
    s = 1 + 0.06 * rng.standard_normal(3)
    c = 0.03 * rng.standard_normal(3)
    r = (
        ((x - c[0]) / (0.78 * s[0])) ** 2
        + ((y - c[1]) / (0.88 * s[1])) ** 2
        + ((z - c[2]) / (0.80 * s[2])) ** 2
    )
    vol = np.zeros(shape, dtype=np.float32)
    vol[r < 1.0] = 0.9  # skull / scalp
    vol[r < 0.80] = 0.55  # brain
    for side in (-1, 1):
        v = (
            ((x - c[0] - side * 0.13) / 0.08) ** 2
            + ((y - c[1]) / 0.30) ** 2
            + ((z - c[2]) / 0.18) ** 2
        )
        vol[(v < 1.0) & (r < 0.8)] = 0.95  # ventricles (CSF-bright, T2-like)
    from scipy.ndimage import gaussian_filter

    tex = gaussian_filter(rng.standard_normal(shape).astype(np.float32), 2.0)
    tex /= tex.std() + 1e-8
    vol += np.where(r < 0.8, 0.05 * tex, 0).astype(np.float32)
    vol = gaussian_filter(vol, 0.7)
    vol += 0.01 * rng.standard_normal(shape).astype(np.float32)
    vol[r >= 1.0] = 0
    return np.clip(vol, 0, None).astype(np.float32)


def insert_sphere(
    data: np.ndarray,
    center: tuple[float, ...],
    radius: float,
    intensity: float,
    spacing: tuple[float, ...] = (1.0, 1.0, 1.0),
    mode: str = "add",
) -> tuple[np.ndarray, np.ndarray]:
    """Copy of ``data`` with a sphere (radius in mm, centre in voxels) shifted by ``intensity``
    (``mode="add"``) or set to it (``mode="set"``); returns (volume, uint8 ground-truth mask)."""
    idx = np.ogrid[tuple(slice(0, n) for n in data.shape)]
    d2 = sum(((i - c) * sp) ** 2 for i, c, sp in zip(idx, center, spacing, strict=False))
    mask = d2 <= radius**2
    out = np.array(data, dtype=np.float32, copy=True)
    if mode == "add":
        out[mask] += np.float32(intensity)
    elif mode == "set":
        out[mask] = np.float32(intensity)
    else:
        raise ValueError(f"mode must be 'add' or 'set', not {mode!r}")
    return out, mask.astype(np.uint8)
