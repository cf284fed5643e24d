"""Synthetic individuals: new healthy "subjects" made from one source brain (3D, seeded).

A template is one smooth, noise-free anatomy. :func:`make_individual` turns a skull-stripped
source brain (a :class:`Volume` and its brain mask, on a template grid) into another plausible
individual on the same grid, in this order:

1. **tissue contrast**: three tissue classes of the brain (CSF, grey and white matter) by 1D
   k-means on its intensities; a random piecewise-linear intensity curve through the class
   centres (class intensities drawn around a T1, T2 or PD profile) is mixed into the original
   contrast, or replaces it when another contrast is asked (a T1 source gives T2-like or
   PD-like brains); partial volume between classes is kept by the curve;
2. **ventricles** (off by default): the ventricles, the CSF class deeper than
   ``VENTRICLE_DEPTH_MM`` inside the brain, grown by up to ``ventricles_mm`` into the tissue
   around them at their own intensity, as they widen with age (on the real pycortex head,
   ventricles grown from 30 to 85 ml brought a false part along them: docs/results.md);
   then a gamma change of the brain's intensities (**contrast curve**);
3. **anatomy**: a large smooth diffeomorphic warp (scaling and squaring of a smooth random
   velocity field; several mm), applied to the image, the brain mask and the white-matter map;
4. **bias field**: a smooth multiplicative field ``exp(b)``;
5. **resolution**: thicker slices along a random axis and a lower in-plane resolution
   (slice profile blur, downsampling, linear upsampling back), then partial-volume blur;
6. **Rician noise** at a white-matter SNR drawn from the asked range; voxels outside the warped
   brain mask are set to 0, as brain extraction leaves them.

Everything random comes from one seed. :func:`individuals_for` makes (and caches on disk) the
individuals of one source for training.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np

from ..io import Volume, write_atomic

#: relative intensity (brain's bright end = 1) of CSF, grey and white matter per contrast
TISSUE_PROFILES: dict[str, tuple[float, float, float]] = {
    "T1": (0.25, 0.62, 0.9),
    "T2": (1.0, 0.6, 0.42),
    "PD": (0.95, 0.8, 0.65),
}
TISSUES = ("CSF", "GM", "WM")
#: bump when the generator changes what a seed gives (invalidates caches)
GENERATOR_VERSION = 1
#: the CSF deeper than this inside the brain (mm) is taken for the ventricles; they grow only
#: into brain deeper than ``VENTRICLE_GROW_DEPTH_MM``, never into the cortex
VENTRICLE_DEPTH_MM = 20.0
VENTRICLE_GROW_DEPTH_MM = 12.0

_PAIRS = (
    "mix", "warp_mm", "bias", "gamma", "slice_mm", "inplane_mm", "pv_sigma_mm", "snr",
    "ventricles_mm",
)  # fmt: skip


@dataclass(frozen=True)
class IndividualConfig:
    """Ranges of :func:`make_individual`; each (low, high) pair is sampled uniformly per
    individual (``gamma`` log-uniformly).

    Attributes:
        contrast: "T1", "T2" or "PD": the contrast of the individual; None keeps the source's.
        class_jitter: relative spread of the random class intensities around the contrast's
            :data:`TISSUE_PROFILES` (0.1: up to ±10 %).
        mix: weight of the class-intensity image against the original contrast when the
            contrast is the source's (another contrast always uses weight 1).
        warp_mm: largest displacement of the warp, mm.
        warp_smooth_mm: smoothness of the warp: std (mm) of the Gaussian that smooths its
            random velocity field.
        bias: largest |b| of the bias field ``exp(b)`` (0.2: about ±20 %).
        bias_smooth_mm: smoothness (mm) of the bias field.
        gamma: exponent of the contrast curve ``u ** g`` on the brain's [0, 1] range.
        slice_mm: slice thickness along one random axis, mm.
        inplane_mm: voxel size along the two other axes, mm.
        pv_sigma_mm: std (mm) of a final Gaussian partial-volume blur.
        snr: white-matter signal-to-noise ratio of the Rician noise (mean white-matter
            intensity / noise std); None adds no noise.
        ventricles_mm: how far (mm) the ventricles grow into the tissue around them, as in
            older brains; (0, 0), the default, leaves them (and draws nothing: an individual
            of a seed is the same as before this option existed).
    """

    contrast: str | None = None
    class_jitter: float = 0.1
    mix: tuple[float, float] = (0.3, 1.0)
    warp_mm: tuple[float, float] = (3.0, 8.0)
    warp_smooth_mm: float = 12.0
    bias: tuple[float, float] = (0.0, 0.2)
    bias_smooth_mm: float = 40.0
    gamma: tuple[float, float] = (0.75, 1.35)
    slice_mm: tuple[float, float] = (1.0, 4.0)
    inplane_mm: tuple[float, float] = (1.0, 1.5)
    pv_sigma_mm: tuple[float, float] = (0.0, 0.7)
    snr: tuple[float, float] | None = (10.0, 40.0)
    ventricles_mm: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        for name in _PAIRS:
            value = getattr(self, name)
            if value is None and name == "snr":
                continue
            value = tuple(float(v) for v in value)
            if len(value) != 2 or not value[0] <= value[1]:
                raise ValueError(f"{name} must be a (low, high) pair with low <= high")
            object.__setattr__(self, name, value)
        if self.contrast is not None and self.contrast not in TISSUE_PROFILES:
            raise ValueError(f"contrast must be one of {', '.join(TISSUE_PROFILES)} or None")
        checks = {
            "mix": 0 <= self.mix[0] and self.mix[1] <= 1,
            "warp_mm": self.warp_mm[0] >= 0,
            "warp_smooth_mm": self.warp_smooth_mm > 0,
            "bias": self.bias[0] >= 0,
            "bias_smooth_mm": self.bias_smooth_mm > 0,
            "gamma": self.gamma[0] > 0,
            "slice_mm": self.slice_mm[0] >= 0,
            "inplane_mm": self.inplane_mm[0] >= 0,
            "pv_sigma_mm": self.pv_sigma_mm[0] >= 0,
            "snr": self.snr is None or self.snr[0] > 0,
            "class_jitter": 0 <= self.class_jitter < 1,
            "ventricles_mm": self.ventricles_mm[0] >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid individual parameter(s): {', '.join(bad)}")

    @classmethod
    def warp_only(cls, warp_mm: tuple[float, float] = (3.0, 8.0)) -> IndividualConfig:
        """Only the warp: the original contrast, no bias, curve, resolution change or noise."""
        return cls(
            class_jitter=0.0,
            mix=(0.0, 0.0),
            warp_mm=warp_mm,
            bias=(0.0, 0.0),
            gamma=(1.0, 1.0),
            slice_mm=(0.0, 0.0),
            inplane_mm=(0.0, 0.0),
            pv_sigma_mm=(0.0, 0.0),
            snr=None,
        )

    def to_dict(self) -> dict:
        """JSON-serialisable dict (pairs as lists), the inverse of :meth:`from_dict`;
        ``ventricles_mm`` only when it grows them (so that the cache keys and training records
        of configurations made before it existed stay as they were)."""
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if not any(self.ventricles_mm):
            del out["ventricles_mm"]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> IndividualConfig:
        """Build from :meth:`to_dict` output; unknown keys raise ValueError."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown individual parameter(s): {', '.join(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass(frozen=True, eq=False)
class Individual:
    """One synthetic individual.

    Attributes:
        volume: the image, float32 (X, Y, Z) on the source's grid (affine), 0 outside the brain.
        brain_mask: bool (X, Y, Z), the source's brain mask warped with the image.
        params: the drawn parameters and measured values (seed, contrast, warp_mm, bias, gamma,
            slice axis and thickness, snr asked, snr measured, ...), JSON-serialisable.
    """

    volume: Volume
    brain_mask: np.ndarray
    params: dict


# ----------------------------------------------------------------------------- pieces


def tissue_classes(data: np.ndarray, mask: np.ndarray, n: int = 3, iters: int = 50) -> np.ndarray:
    """Sorted centres (n,) of a 1D k-means of the intensities inside ``mask`` (bool, same shape
    as ``data``), started at the (i + 0.5) / n quantiles; computed on a 1024-bin histogram."""
    values = data[mask]
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.full(n, lo)
    counts, edges = np.histogram(values, bins=1024, range=(lo, hi))
    mids = 0.5 * (edges[1:] + edges[:-1])
    centres = np.quantile(values, (np.arange(n) + 0.5) / n)
    for _ in range(iters):
        label = np.abs(mids[:, None] - centres[None, :]).argmin(axis=1)
        new = np.array(
            [
                np.average(mids[label == k], weights=counts[label == k])
                if counts[label == k].sum()
                else centres[k]
                for k in range(n)
            ]
        )
        if np.allclose(new, centres):
            break
        centres = new
    return np.sort(centres)


def class_names(modality: str) -> tuple[str, str, str]:
    """Tissue of each of the three k-means classes, darkest first, in a source of ``modality``
    (T1: CSF < GM < WM; T2 and PD: WM < GM < CSF)."""
    return ("CSF", "GM", "WM") if modality.upper() == "T1" else ("WM", "GM", "CSF")


def _smooth_noise(
    shape: tuple[int, ...],
    spacing: tuple[float, ...],
    smooth_mm: float,
    rng: np.random.Generator,
    channels: int,
):
    """(channels, X, Y, Z) torch float32 smooth random field on the grid ``shape``, each
    channel scaled to max |value| = 1: white noise on a coarse grid (about smooth_mm / 3
    apart), Gaussian-smoothed with std ``smooth_mm``, trilinearly upsampled."""
    import torch
    import torch.nn.functional as F
    from scipy.ndimage import gaussian_filter

    step = [max(1, int(smooth_mm / 3 / s)) for s in spacing]
    coarse = [math.ceil((n - 1) / k) + 1 for n, k in zip(shape, step, strict=True)]
    sigma = [smooth_mm / (s * k) for s, k in zip(spacing, step, strict=True)]
    noise = rng.standard_normal((channels, *coarse))
    field = np.stack([gaussian_filter(c, sigma, mode="reflect") for c in noise])
    t = torch.from_numpy(field.astype(np.float32))[None]
    # coarse index j sits at fine index j * step: sample it at fine positions i / step
    size = [(c - 1) * k + 1 for c, k in zip(coarse, step, strict=True)]
    up = F.interpolate(t, size=size, mode="trilinear", align_corners=True)[0]
    up = up[:, : shape[0], : shape[1], : shape[2]]
    peak = up.abs().flatten(1).amax(dim=1).clamp_min(1e-12)
    return up / peak.view(-1, 1, 1, 1)


def _sample(volume, disp):
    """Trilinear sampling of (C, X, Y, Z) torch ``volume`` at voxel positions identity +
    ``disp`` ((3, X', Y', Z') in voxels of ``volume``'s grid); 0 outside."""
    import torch
    import torch.nn.functional as F

    shape = volume.shape[1:]
    out_shape = disp.shape[1:]
    axes = [torch.arange(n, dtype=torch.float32) for n in out_shape]
    grid = []
    for a in range(3):
        pos = axes[a].view([-1 if i == a else 1 for i in range(3)]) + disp[a]
        grid.append(pos * (2.0 / max(shape[a] - 1, 1)) - 1.0)
    # grid_sample's last dim is (W, H, D) = our axes (2, 1, 0)
    g = torch.stack(grid[::-1], dim=-1)[None]
    out = F.grid_sample(volume[None], g, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0]


def velocity_field(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    max_mm: float,
    smooth_mm: float,
    rng: np.random.Generator,
):
    """A smooth random stationary velocity field, (3, X, Y, Z) torch float32 in voxels per unit
    time, whose longest vector is ``max_mm`` mm."""
    import torch

    v = _smooth_noise(shape, spacing, smooth_mm, rng, 3)
    sp = torch.tensor(spacing, dtype=torch.float32).view(3, 1, 1, 1)
    length = (v * sp).square().sum(0).sqrt().max().clamp_min(1e-12)
    return v * (max_mm / length)


def integrate_velocity(velocity, steps: int = 7):
    """Displacement (3, X, Y, Z) in voxels of the diffeomorphism exp(``velocity``), by scaling
    and squaring: phi = v / 2^steps, then ``steps`` times phi <- phi + phi(x + phi). The
    inverse is ``integrate_velocity(-velocity)``."""
    phi = velocity / (2**steps)
    for _ in range(steps):
        phi = phi + _sample(phi, phi)
    return phi


def random_diffeomorphism(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    max_mm: float,
    smooth_mm: float,
    rng: np.random.Generator,
    inverse: bool = True,
):
    """A random smooth diffeomorphism of the grid ``shape`` (``spacing`` mm per voxel) and its
    inverse: (forward, inverse) displacements, each (3, X, Y, Z) torch float32 in voxels
    (the map is x -> x + forward(x); inverse None unless ``inverse``). The velocity field
    (longest vector ``max_mm`` mm, smoothness ``smooth_mm``) is integrated on a grid about
    ``smooth_mm`` / 4 mm apart and the displacements upsampled trilinearly."""
    import torch.nn.functional as F

    k = max(1, int(smooth_mm / 4 / max(min(spacing), 1e-6)))
    coarse = tuple(math.ceil((n - 1) / k) + 1 for n in shape)
    v = velocity_field(coarse, tuple(s * k for s in spacing), max_mm, smooth_mm, rng)
    size = [(c - 1) * k + 1 for c in coarse]
    out = []
    for sign in (1.0, -1.0) if inverse else (1.0,):
        phi = integrate_velocity(sign * v) * k
        up = F.interpolate(phi[None], size=size, mode="trilinear", align_corners=True)[0]
        out.append(up[:, : shape[0], : shape[1], : shape[2]].contiguous())
    return out[0], (out[1] if inverse else None)


def jacobian_determinant(disp: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Jacobian determinant (X, Y, Z) of x -> x + ``disp`` ((3, X, Y, Z), voxels), by central
    differences; > 0 everywhere for an invertible, orientation-keeping map."""
    d = np.asarray(disp, dtype=np.float64)
    jac = np.empty((*d.shape[1:], 3, 3))
    for i in range(3):
        grads = np.gradient(d[i])
        for j in range(3):
            jac[..., i, j] = grads[j] + (1.0 if i == j else 0.0)
    return np.linalg.det(jac)


def _lower_resolution(img, factors):
    """Blur (C, X, Y, Z) torch ``img`` with the slice profile of voxels ``factors`` times
    larger (a Gaussian of std sqrt(f^2 - 1) / sqrt(12) voxels per axis, the extra width of a
    box of f voxels), resample to that coarser grid and back (trilinear)."""
    import torch
    import torch.nn.functional as F
    from scipy.ndimage import gaussian_filter

    if all(f <= 1.0 for f in factors):
        return img
    sigma = [math.sqrt(max(f * f - 1.0, 0.0) / 12.0) for f in factors]
    t = torch.from_numpy(gaussian_filter(img.numpy(), [0.0, *sigma], mode="nearest"))[None]
    shape = list(img.shape[1:])
    small = [max(2, round(n / max(f, 1.0))) for n, f in zip(shape, factors, strict=True)]
    t = F.interpolate(t, size=small, mode="trilinear", align_corners=True)
    return F.interpolate(t, size=shape, mode="trilinear", align_corners=True)[0]


def grow_ventricles(
    u: np.ndarray,
    mask: np.ndarray,
    csf: np.ndarray,
    spacing: tuple[float, ...],
    grow_mm: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Widen the ventricles of a brain image by ``grow_mm``, as they widen with age.

    The ventricles are the parts of ``csf`` deeper than :data:`VENTRICLE_DEPTH_MM` inside
    ``mask`` (after a one-voxel opening; parts under 0.5 ml dropped). Brain within ``grow_mm``
    of them and deeper than :data:`VENTRICLE_GROW_DEPTH_MM` takes their median intensity, with
    a 0.7 mm soft edge.

    Args:
        u: the image, float (X, Y, Z).
        mask: bool (X, Y, Z), the brain.
        csf: bool (X, Y, Z), the voxels of the CSF tissue class.
        spacing: voxel size, mm.
        grow_mm: how far they grow, mm.

    Returns:
        the new image (float32), and the voxels turned to ventricle (bool).
    """
    from scipy import ndimage as ndi

    sampling = [float(x) for x in spacing[:3]]
    depth = ndi.distance_transform_edt(mask, sampling=sampling)
    vent = ndi.binary_opening(csf & mask & (depth > VENTRICLE_DEPTH_MM))
    labels, n = ndi.label(vent)
    if n:
        sizes = np.asarray(ndi.sum(vent, labels, range(1, n + 1))) * float(np.prod(sampling))
        vent = np.isin(labels, 1 + np.flatnonzero(sizes >= 500.0))
    if grow_mm <= 0 or not vent.any():
        return np.asarray(u, np.float32), np.zeros(mask.shape, bool)
    near = ndi.distance_transform_edt(~vent, sampling=sampling) <= grow_mm
    grown = near & mask & (depth > VENTRICLE_GROW_DEPTH_MM) & ~csf
    soft = ndi.gaussian_filter(grown.astype(np.float32), [0.7 / s for s in sampling])
    level = float(np.median(u[vent]))
    return (u * (1 - soft) + level * soft).astype(np.float32), grown


def _uniform(rng: np.random.Generator, pair: tuple[float, float]) -> float:
    return float(rng.uniform(*pair)) if pair[1] > pair[0] else float(pair[0])


# ----------------------------------------------------------------------------- the generator


def make_individual(
    volume: Volume,
    brain_mask: np.ndarray,
    modality: str,
    seed: int,
    config: IndividualConfig | None = None,
) -> Individual:
    """Make one synthetic individual from a skull-stripped source brain (module docstring).

    Args:
        volume: the source, (X, Y, Z), any intensity scale.
        brain_mask: bool (X, Y, Z), the source's brain.
        modality: the source's contrast, "T1", "T2" or "PD" (names its tissue classes).
        seed: everything random comes from it; the same seed gives the same individual.
        config: the ranges (None: :class:`IndividualConfig` defaults).

    Returns:
        an :class:`Individual` on the source's grid.

    Raises:
        ValueError: the mask's shape differs from the volume's, or it is empty.
    """
    import torch
    from scipy.ndimage import gaussian_filter

    cfg = config or IndividualConfig()
    mask = np.asarray(brain_mask, bool)
    if mask.shape != volume.shape[:3] or not mask.any():
        raise ValueError("the brain mask must be a non-empty array of the volume's shape")
    rng = np.random.default_rng(seed)
    spacing = volume.spacing
    params: dict = {"seed": int(seed), "source_modality": modality}

    # 1. tissue contrast, on the brain's [0, 1] range (its 99.5th percentile = 1)
    data = np.asarray(volume.data, np.float32)
    top = float(np.percentile(data[mask], 99.5)) or 1.0
    u = np.clip(data / top, 0.0, None) * mask
    centres = tissue_classes(u, mask)
    names = class_names(modality)
    target = cfg.contrast or (modality.upper() if modality.upper() in TISSUE_PROFILES else "T1")
    profile = dict(zip(TISSUES, TISSUE_PROFILES[target], strict=True))
    jitter = 1 + cfg.class_jitter * rng.uniform(-1, 1, 3)
    values = np.array([profile[t] for t in names]) * jitter
    same = cfg.contrast is None or cfg.contrast.upper() == modality.upper()
    w = _uniform(rng, cfg.mix) if same else 1.0
    if w > 0:
        curve = np.interp(u, centres, values).astype(np.float32)
        u = (1 - w) * u + w * curve
    params.update(contrast=target, mix=w, class_values=[float(v) for v in values])

    # 2. ventricles (their own generator: the draws below stay those of a seed without them)
    labels = np.searchsorted(0.5 * (centres[1:] + centres[:-1]), data / top)
    if cfg.ventricles_mm[1] > 0:
        grow = _uniform(np.random.default_rng([int(seed), 2]), cfg.ventricles_mm)
        u, grown = grow_ventricles(u, mask, labels == names.index("CSF"), spacing, grow)
        labels[grown] = names.index("CSF")
        params.update(ventricles_mm=grow, ventricles_grown_ml=float(grown.sum()) *
                      float(np.prod(spacing)) / 1000)  # fmt: skip

    # 2b. contrast curve
    g = float(np.exp(rng.uniform(*np.log(cfg.gamma))))
    u = np.clip(u, 0.0, None) ** g
    params["gamma"] = g

    # 3. anatomy: warp image, mask and white matter together
    wm = np.zeros(u.shape, np.float32)
    wm[mask & (labels == names.index("WM"))] = 1.0
    stack = torch.from_numpy(np.stack([u, mask.astype(np.float32), wm]).astype(np.float32))
    warp_mm = _uniform(rng, cfg.warp_mm)
    shape = tuple(volume.shape[:3])
    if warp_mm > 0:
        smooth = cfg.warp_smooth_mm
        forward, _ = random_diffeomorphism(shape, spacing, warp_mm, smooth, rng, inverse=False)
        stack = _sample(stack, forward)
    img, new_mask, new_wm = stack[0], stack[1] > 0.5, stack[2] > 0.5
    params["warp_mm"] = warp_mm

    # 4. bias field
    b = _uniform(rng, cfg.bias)
    if b > 0:
        img = img * torch.exp(b * _smooth_noise(shape, spacing, cfg.bias_smooth_mm, rng, 1)[0])
    params["bias"] = b

    # 5. resolution: a thick-slice axis, lower in-plane resolution, partial-volume blur
    axis = int(rng.integers(3))
    thick, inplane = _uniform(rng, cfg.slice_mm), _uniform(rng, cfg.inplane_mm)
    factors = [max(inplane / s, 1.0) for s in spacing]
    factors[axis] = max(thick / spacing[axis], 1.0)
    img = _lower_resolution(img[None], factors)[0].numpy()
    pv = _uniform(rng, cfg.pv_sigma_mm)
    if pv > 0:
        img = gaussian_filter(img, [pv / s for s in spacing], mode="nearest")
    params.update(slice_axis=axis, slice_mm=thick, inplane_mm=inplane, pv_sigma_mm=pv)

    # 6. Rician noise at a white-matter SNR
    new_mask_np = new_mask.numpy()
    wm_np = new_wm.numpy() & new_mask_np
    wm_mean = float(img[wm_np].mean()) if wm_np.any() else float(img[new_mask_np].mean())
    if cfg.snr is not None:
        snr = _uniform(rng, cfg.snr)
        sigma = wm_mean / snr
        n1 = rng.standard_normal(img.shape, dtype=np.float32) * sigma
        n2 = rng.standard_normal(img.shape, dtype=np.float32) * sigma
        img = np.sqrt((img + n1) ** 2 + n2**2)
        params.update(snr=snr, noise_sigma=sigma)
    params["wm_mean"] = wm_mean
    out = np.where(new_mask_np, img, 0.0).astype(np.float32)
    return Individual(Volume(out, np.asarray(volume.affine).copy()), new_mask_np, params)


# ----------------------------------------------------------------------------- training sets


def individual_seed(source: str, seed: int, index: int) -> int:
    """The seed of individual ``index`` of ``source`` in a run seeded ``seed``."""
    ss = np.random.SeedSequence([int(seed), int(index), zlib.crc32(source.encode())])
    return int(ss.generate_state(1)[0])


def _cache_key(source: str, seed: int, volume: Volume, cfg: IndividualConfig, modality: str):
    meta = {
        "source": source,
        "seed": int(seed),
        "modality": modality,
        "shape": list(volume.shape),
        "affine": np.round(np.asarray(volume.affine), 6).tolist(),
        "config": cfg.to_dict(),
        "version": GENERATOR_VERSION,
    }
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in source)[:40]
    return f"{safe}-{digest}"


def save_individual(ind: Individual, path: Path) -> None:
    """Write ``ind`` to ``path`` (an uncompressed ``.npz``: data, mask, affine, params),
    atomically."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                data=ind.volume.data,
                mask=ind.brain_mask,
                affine=ind.volume.affine,
                params=np.array(json.dumps(ind.params)),
            )

    write_atomic(path, write, overwrite=True)


def load_individual(path: Path) -> Individual:
    """Read an :class:`Individual` written by :func:`save_individual`."""
    with np.load(path) as f:
        vol = Volume(f["data"].astype(np.float32), f["affine"].astype(np.float64), path=path)
        return Individual(vol, f["mask"].astype(bool), json.loads(str(f["params"])))


def individuals_for(
    source: str,
    volume: Volume,
    brain_mask: np.ndarray,
    modality: str,
    n: int,
    seed: int = 0,
    config: IndividualConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress=None,
) -> list[Individual]:
    """``n`` individuals of one source (individual i seeded by :func:`individual_seed`), read
    from ``cache_dir`` when made before with the same source, grid, seed and configuration,
    otherwise made and written there (one ``.npz`` each). ``progress(i, n)`` after each."""
    cfg = config or IndividualConfig()
    key = _cache_key(source, seed, volume, cfg, modality)
    folder = Path(cache_dir) if cache_dir is not None else None
    out = []
    for i in range(n):
        path = folder / f"{key}-{i:03d}.npz" if folder is not None else None
        if path is not None and path.is_file():
            ind = load_individual(path)
        else:
            ind = make_individual(
                volume, brain_mask, modality, individual_seed(source, seed, i), cfg
            )
            ind = replace(ind, params={**ind.params, "source": source, "index": i})
            if path is not None:
                folder.mkdir(parents=True, exist_ok=True)
                save_individual(ind, path)
        out.append(ind)
        if progress is not None:
            progress(i + 1, n)
    return out
