"""Healthy training data: NIfTI files a user gives, or templates shipped by other packages.

Every volume goes through :func:`preprocess.volume_to_slices`, the scoring engine's own
preprocessing. The validation split never puts neighbouring slices of one slab on both sides: it
holds out whole volumes when there are several, and otherwise contiguous slabs of slices with a
gap of excluded slices around each.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io import Volume, is_nifti_path, load_volume
from ..preprocess import Normalisation, volume_to_slices
from ..samples import TEMPLATES, template


def load_template(name: str) -> Volume:
    """A packaged template (:data:`napari_vaeloc.samples.TEMPLATES`) as a :class:`Volume`,
    skull-stripped with its brain mask when it has one (background set to 0) and resampled to
    the registry's voxel size when it names one."""
    return load_template_brain(name)[0]


def load_template_brain(name: str) -> tuple[Volume, np.ndarray]:
    """A packaged template and its brain mask (bool, same grid): the registry's mask when it
    has one (resampled in world coordinates when it lies on another grid; the template is set
    to 0 outside it), otherwise the template's nonzero voxels with holes filled.

    Raises:
        InputError: unknown template, or its package is not installed.
    """
    source = template(name)
    vol = load_volume(source.path)
    mask_path = source.brain_mask_path
    mask = None
    if mask_path is not None:
        mask = _on_grid(load_volume(mask_path, scorable=False), vol) > 0.5
    if source.voxel_mm is not None:
        data, affine = block_mean(vol.data, vol.affine, vol.spacing, source.voxel_mm)
        if mask is not None:
            small, _ = block_mean(mask.astype(np.float32), vol.affine, vol.spacing, source.voxel_mm)
            mask = small > 0.5
        vol = Volume(data, affine, path=vol.path)
    if mask is None:
        mask = nonzero_brain_mask(vol.data)
    data = np.where(mask, vol.data, 0).astype(np.float32) if mask_path is not None else vol.data
    return replace(vol, data=data), mask


def nonzero_brain_mask(data: np.ndarray) -> np.ndarray:
    """bool: the nonzero voxels of a skull-stripped brain, holes filled."""
    from ..preprocess import fill_holes

    return fill_holes(np.asarray(data) > 0)


def _on_grid(moving: Volume, fixed: Volume) -> np.ndarray:
    """``moving``'s data on ``fixed``'s grid (linear, in world coordinates; 0 outside)."""
    if moving.shape == fixed.shape and np.allclose(moving.affine, fixed.affine, atol=1e-4):
        return moving.data
    from scipy.ndimage import affine_transform

    m = np.linalg.inv(moving.affine) @ fixed.affine
    return affine_transform(moving.data, m[:3, :3], m[:3, 3], output_shape=fixed.shape, order=1)


def block_mean(data: np.ndarray, affine: np.ndarray, spacing, voxel_mm: float):
    """Average ``data`` over blocks of round(voxel_mm / spacing) voxels per axis; returns the
    smaller array and its affine (each new voxel centred on its block)."""
    k = [max(1, round(voxel_mm / s)) for s in spacing]
    shape = [n // f for n, f in zip(data.shape, k, strict=True)]
    cut = data[: shape[0] * k[0], : shape[1] * k[1], : shape[2] * k[2]]
    small = cut.reshape(shape[0], k[0], shape[1], k[1], shape[2], k[2]).mean(axis=(1, 3, 5))
    new = np.array(affine, dtype=np.float64)
    new[:3, 3] = affine[:3, :3] @ ((np.array(k) - 1) / 2.0) + affine[:3, 3]
    new[:3, :3] = affine[:3, :3] * np.array(k)[None, :]
    return small.astype(np.float32), new


def find_nifti(sources: list[str | os.PathLike]) -> list[Path]:
    """NIfTI files from a list of files, folders (searched recursively) and template names."""
    out: list[Path] = []
    for s in sources:
        if str(s) in TEMPLATES:
            out.append(template(str(s)).path)
            continue
        p = Path(s)
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file() and is_nifti_path(q)))
        elif p.is_file() and is_nifti_path(p):
            out.append(p)
        else:
            raise InputError(f"{s} is neither a NIfTI file, a folder nor a template name")
    if not out:
        raise InputError("no NIfTI files found in " + ", ".join(map(str, sources)))
    return out


@dataclass
class SliceDataset:
    """Model-space training and validation slices.

    ``train`` and ``val``: (N, 1, S, S) float32 tensors; ``val_foreground``: (N_val, S, S) bool
    foreground of the validation slices in model space; ``split`` describes the split.
    """

    train: object
    val: object
    val_foreground: object
    pad_value: float
    split: dict = field(default_factory=dict)


def _slab_split(n: int, rng: np.random.Generator, val_fraction: float, slab: int, gap: int):
    """Indices 0..n-1 split into (train, val) by contiguous slabs, with ``gap`` indices around
    every validation slab left out of both."""
    slabs = [np.arange(i, min(i + slab, n)) for i in range(0, n, slab)]
    n_val = max(1, round(len(slabs) * val_fraction)) if len(slabs) > 1 else 0
    val_ids = set(rng.choice(len(slabs), size=n_val, replace=False).tolist()) if n_val else set()
    val = np.concatenate([slabs[i] for i in sorted(val_ids)]) if val_ids else np.array([], int)
    blocked = np.zeros(n, bool)
    for i in val_ids:
        lo, hi = slabs[i][0] - gap, slabs[i][-1] + gap
        blocked[max(lo, 0) : hi + 1] = True
    train = np.flatnonzero(~blocked)
    return train, val


def _val_volume_ids(n: int, rng: np.random.Generator, val_fraction: float) -> set[int]:
    """The volumes a split by volume holds out (at least one)."""
    k = max(1, round(n * val_fraction))
    return set(rng.choice(n, size=k, replace=False).tolist())


def build_slice_dataset(
    volumes: list[Volume],
    axis: str,
    image_size: int,
    norm: Normalisation,
    val_fraction: float = 0.15,
    slab: int = 8,
    gap: int = 2,
    seed: int = 0,
    holdout: list[bool] | None = None,
    neighbours: int = 0,
) -> SliceDataset:
    """Slice healthy volumes with the engine's preprocessing and split them for validation.

    With ``holdout`` (one flag per volume), the flagged volumes are the validation set (the
    split records them as ``val_volumes``). Otherwise, three or more volumes: whole volumes are
    held out (``val_fraction`` of them, at least one). Fewer: each volume's foreground slices
    are cut into slabs of ``slab`` slices, a fraction of slabs is held out and ``gap`` slices
    on each side of a held-out slab are dropped. With ``neighbours`` k > 0 every slice comes
    with the k slices on each side as extra channels (:func:`preprocess.with_neighbours`), so
    the images are (N, 2k+1, S, S).
    """
    import torch

    from ..preprocess import canonical_slices, to_model_space, with_neighbours

    rng = np.random.default_rng(seed)
    by_volume = holdout is not None or len(volumes) >= 3
    if holdout is not None:
        val_volumes = {i for i, h in enumerate(holdout) if h}
    else:
        val_volumes = _val_volume_ids(len(volumes), rng, val_fraction) if by_volume else set()
    train, val, val_fg = [], [], []
    pad_values = []
    for vi, vol in enumerate(volumes):
        ms = volume_to_slices(vol.data, vol.affine, vol.spacing, axis, image_size, norm)
        pad_values.append(ms.pad_value)
        keep = np.flatnonzero(ms.foreground)
        images = with_neighbours(ms.images, neighbours)[torch.from_numpy(keep)]
        # foreground in model space: the volume's own mask, resized like the images
        fg_stack = canonical_slices(ms.foreground_mask.astype(np.float32), ms.geometry)[keep]
        fg = to_model_space(fg_stack, ms.geometry, 0.0)[:, 0] > 0.5
        if by_volume:
            if vi in val_volumes:
                val.append(images)
                val_fg.append(fg)
            else:
                train.append(images)
            continue
        tr, va = _slab_split(len(keep), rng, val_fraction, slab, gap)
        train.append(images[torch.from_numpy(tr)])
        val.append(images[torch.from_numpy(va)])
        val_fg.append(fg[torch.from_numpy(va)])
    s = image_size
    empty = torch.zeros((0, 2 * neighbours + 1, s, s))
    out_train = torch.cat(train) if train else empty
    out_val = torch.cat(val) if val else empty
    out_fg = torch.cat(val_fg) if val_fg else torch.zeros((0, s, s), dtype=torch.bool)
    if len(out_train) == 0:
        raise InputError("no training slices with foreground in the given volumes")
    return SliceDataset(
        out_train,
        out_val,
        out_fg,
        float(np.median(pad_values)),
        {
            "by": "volume" if by_volume else "slab",
            "n_volumes": len(volumes),
            "n_train": len(out_train),
            "n_val": len(out_val),
            "slab": slab,
            "gap": gap,
            "val_fraction": val_fraction,
            "seed": seed,
            **({"val_volumes": sorted(val_volumes)} if holdout is not None else {}),
        },
    )


def heldout_slab_mask(
    volume: Volume, axis: str, image_size: int, norm: Normalisation, split: dict
) -> np.ndarray:
    """bool (X, Y, Z): the voxels of ``volume`` on the slices a single-volume training run held
    out for validation (``split`` as recorded in a model card: seed, slab, gap, val_fraction)."""
    ms = volume_to_slices(volume.data, volume.affine, volume.spacing, axis, image_size, norm)
    keep = np.flatnonzero(ms.foreground)
    rng = np.random.default_rng(split.get("seed", 0))
    _, va = _slab_split(
        len(keep), rng, split.get("val_fraction", 0.15), split.get("slab", 8), split.get("gap", 2)
    )
    held = np.isin(ms.geometry.file_slice_order(), keep[va])
    shape = [1, 1, 1]
    shape[ms.geometry.file_axis] = -1
    return np.broadcast_to(held.reshape(shape), volume.shape).copy()


def heldout_masks(
    volumes: list[Volume], axis: str, image_size: int, norm: Normalisation, split: dict
) -> list[np.ndarray | None]:
    """Per volume, bool (X, Y, Z) of the voxels :func:`build_slice_dataset` held out under the
    recorded ``split`` (whole volumes, or slabs of one), or None for a volume used whole in
    training."""
    if "val_volumes" in split:
        val = set(split["val_volumes"])
        return [np.ones(v.shape, bool) if i in val else None for i, v in enumerate(volumes)]
    if split.get("by") == "volume":
        rng = np.random.default_rng(split.get("seed", 0))
        val = _val_volume_ids(len(volumes), rng, split.get("val_fraction", 0.15))
        return [np.ones(v.shape, bool) if i in val else None for i, v in enumerate(volumes)]
    return [heldout_slab_mask(v, axis, image_size, norm, split) for v in volumes]


def load_training_volumes(sources: list[str | os.PathLike]) -> tuple[list[Volume], list[str]]:
    """Load every NIfTI (3D; first volume of 4D) from ``sources`` (templates through
    :func:`load_template`); returns (volumes, names)."""
    vols, names = [], []
    for s in sources:
        if str(s) in TEMPLATES:
            vols.append(load_template(str(s)))
            names.append(str(s))
            continue
        for p in find_nifti([s]):
            vols.append(_load_file(p))
            names.append(p.name)
    return vols, names


def _load_file(p: Path) -> Volume:
    try:
        return load_volume(p)
    except InputError as exc:
        if "4D" not in str(exc):
            raise
        return load_volume(p, volume_index=0)
