"""Brain benchmark: seeded synthetic anomalies in healthy anatomy the models did not train on.

- **T2**: the ICBM 2009c T2 template the bundled T2 models trained on, but only the slabs of
  slices their training held out for validation are scored (``Case.region``), and every test
  anatomy is warped by an unseen smooth 3D deformation (training only ever saw 2D slice
  augmentation).
- **T1**: the FSL MNI152 6th-generation T1 template (shipped by nimare), a different source than
  the ICBM 2009c templates the T1 models trained on, brain-masked and warped the same way; every
  slice is scored.

Test volumes are resampled to 2 mm, so one case takes about a second on a CPU. Every anomaly is
centred inside the scored region, well inside the brain; parts of it outside the region are not
scored. numpy/scipy only; the models run in :mod:`evaluate`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io import Volume, load_volume
from ..samples import TEMPLATES
from ..training.datasets import heldout_slab_mask, load_template
from .runner import Case
from .synthetic import ANOMALY_KINDS, synthesize_anomaly

#: test anatomy per modality: (template name, score only the training's held-out slabs)


@dataclass(frozen=True)
class HeldOutAnatomy:
    """The held-out anatomy of one modality: a template key (:data:`napari_vaeloc.samples.
    TEMPLATES`) and whether only the model's held-out training slabs of it may be scored."""

    template: str
    heldout_slabs: bool


TEST_ANATOMY = {
    "T2": HeldOutAnatomy("icbm-t2", heldout_slabs=True),
    "T1": HeldOutAnatomy("mni152-t1", heldout_slabs=False),
}
VOXEL_MM = 2.0
MIN_DEPTH_MM = 8.0  # anomaly centres lie at least this deep inside the brain


@dataclass
class Anatomy:
    """One warped healthy test volume with its brain mask and the voxels that are scored."""

    volume: Volume
    foreground: np.ndarray  # bool (X, Y, Z)
    region: np.ndarray | None  # bool (X, Y, Z); None: every voxel
    centres: np.ndarray  # (n, 3) int voxel indices allowed as anomaly centres
    name: str


def downsample(
    data: np.ndarray, affine: np.ndarray, factor: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """(data, affine) at ``factor`` times the voxel size (linear interpolation; the first
    coarse voxel's centre lies between the first ``factor`` fine voxels)."""
    from scipy.ndimage import zoom

    small = zoom(
        np.asarray(data, np.float32),
        1 / factor,
        order=1,
        prefilter=False,
        grid_mode=True,
        mode="grid-constant",
    )
    out = affine.copy()
    out[:3, :3] *= factor
    out[:3, 3] += affine[:3, :3] @ np.full(3, (factor - 1) / 2)
    return small, out


def warp_coordinates(
    shape: tuple[int, int, int],
    spacing: Sequence[float],
    rng: np.random.Generator,
    displacement_mm: float = 3.0,
    rotation_deg: float = 5.0,
    scale: tuple[float, float] = (0.95, 1.05),
    control_points: int = 5,
) -> np.ndarray:
    """Source voxel coordinates (3, X, Y, Z) float32 of a random smooth warp: a rotation of up to
    ``rotation_deg`` about each axis and an isotropic ``scale`` about the centre, plus a
    displacement field (std ``displacement_mm``) interpolated from a coarse random grid."""
    from scipy.ndimage import zoom
    from scipy.spatial.transform import Rotation

    sp = np.asarray(spacing, np.float64)
    centre = (np.asarray(shape) - 1) / 2
    rot = Rotation.from_euler("xyz", rng.uniform(-rotation_deg, rotation_deg, 3), degrees=True)
    a = rot.as_matrix() / rng.uniform(*scale)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    mm = (grid - centre.reshape(3, 1, 1, 1).astype(np.float32)) * sp.reshape(3, 1, 1, 1).astype(
        np.float32
    )
    src = np.einsum("ij,jxyz->ixyz", a.astype(np.float32), mm)
    coarse = rng.normal(0.0, displacement_mm, (3, *(control_points,) * 3))
    for i in range(3):
        field = zoom(
            coarse[i], np.asarray(shape) / control_points, order=3, grid_mode=True, mode="reflect"
        )
        src[i] += field[: shape[0], : shape[1], : shape[2]].astype(np.float32)
    src /= sp.reshape(3, 1, 1, 1).astype(np.float32)
    src += centre.reshape(3, 1, 1, 1).astype(np.float32)
    return src


def _warp(data: np.ndarray, coords: np.ndarray, order: int) -> np.ndarray:
    from scipy.ndimage import map_coordinates

    return map_coordinates(data, coords, order=order, mode="constant", cval=0.0, prefilter=False)


def _load_source(source: str) -> Volume:
    return load_template(source) if source in TEMPLATES else load_volume(Path(source))


def test_anatomies(
    modality: str,
    card,
    n: int = 5,
    seed: int = 0,
    source: str | None = None,
) -> list[Anatomy]:
    """``n`` warped 2 mm copies of the modality's test anatomy (:data:`TEST_ANATOMY`).

    ``card``: the model card whose recorded training split defines the held-out slabs (T2).
    ``source``: another template name or NIfTI file of the same anatomy (e.g. a compressed
    copy of the template).
    """
    from scipy.ndimage import distance_transform_edt

    if modality not in TEST_ANATOMY:
        raise ValueError(f"no test anatomy for modality {modality!r}; have {sorted(TEST_ANATOMY)}")
    template, heldout = TEST_ANATOMY[modality].template, TEST_ANATOMY[modality].heldout_slabs
    vol = _load_source(source or template)
    region1 = None
    if heldout:
        split = card.provenance.training.get("split", {})
        if split.get("by") != "slab":
            raise ValueError(
                f"the {modality} template benchmark scores only the slabs of {template} a "
                "model's training held out, and this model trained on all of it: judge it with "
                "`vaeloc evaluate individual`"
            )
        region1 = heldout_slab_mask(vol, card.axis, card.image_size, card.normalisation, split)
    factor = round(VOXEL_MM / float(np.mean(vol.spacing)))
    data, affine = (
        downsample(vol.data, vol.affine, factor) if factor > 1 else (vol.data, vol.affine)
    )
    data = np.clip(data, 0, None)
    region = None
    if region1 is not None:
        region = (
            downsample(region1.astype(np.float32), vol.affine, factor)[0] if factor > 1 else region1
        )
    spacing = tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(0)))
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, 7919, i])
        coords = warp_coordinates(data.shape, spacing, rng)
        warped = _warp(data, coords, 1).astype(np.float32)
        fg = warped > 0.05 * np.percentile(warped[warped > 0], 99)
        reg = None if region is None else (_warp(region.astype(np.float32), coords, 1) > 0.5)
        depth = distance_transform_edt(fg, sampling=spacing)
        ok = (depth >= MIN_DEPTH_MM) & (reg if reg is not None else True)
        if not ok.any():
            raise ValueError(
                f"anatomy {i}: no voxel {MIN_DEPTH_MM} mm inside the brain to centre on"
            )
        warped[~fg] = 0
        v = Volume(warped, affine, None, None, "float32")
        out.append(Anatomy(v, fg, reg, np.argwhere(ok), f"{modality}-{i}"))
    return out


def benchmark_cases(
    anatomies: Sequence[Anatomy],
    per_kind: int,
    kinds: Sequence[str] = ANOMALY_KINDS,
    seed: int = 0,
    healthy: int = 0,
) -> Iterator[Case]:
    """``per_kind`` cases of each anomaly kind (anatomies in turn), then ``healthy`` cases with
    no anomaly (info kind "healthy"). Case j of kind k depends only on (seed, k, j)."""
    for k_i, kind in enumerate(kinds):
        for j in range(per_kind):
            rng = np.random.default_rng([seed, k_i, j])
            a = anatomies[j % len(anatomies)]
            centre = a.centres[rng.integers(len(a.centres))]
            an = synthesize_anomaly(
                a.volume.data,
                kind,
                rng,
                foreground=a.foreground,
                spacing=a.volume.spacing,
                center=centre,
            )
            vol = Volume(an.volume, a.volume.affine, None, None, "float32")
            info = {**an.info, "case": j, "anatomy": a.name}
            yield Case(vol, an.mask, info, region=a.region)
    for j in range(healthy):
        a = anatomies[j % len(anatomies)]
        truth = np.zeros(a.volume.shape, np.uint8)
        yield Case(
            a.volume, truth, {"kind": "healthy", "case": j, "anatomy": a.name}, region=a.region
        )
