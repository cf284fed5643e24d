"""Volume <-> model-space slices, the one preprocessing that training and scoring share.

Forward (:func:`volume_to_slices`): reorient to the closest canonical (RAS+) voxel order, take
2D slices along an anatomical axis, clip outlying voxels (saturated, dropped out, non-finite) to
the scan's own range, normalise intensities over the foreground, resize each slice so its longer
physical side fills the model's square input (aspect and voxel size kept), and pad to a square.
Inverse (:func:`slices_to_volume`): crop the padding, resize back and return to the file's own
voxel order, giving exactly the input's shape.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from .errors import InputError
from .mapnames import AXES


@dataclass(frozen=True)
class Normalisation:
    """How intensities are brought to the model's range.

    Attributes:
        foreground: "otsu" (threshold of Otsu on the volume) or "nonzero" (voxels above the
            minimum, for skull-stripped scans with a flat background).
        clip: (low, high) bounds in z-units after the foreground z-score.
    """

    foreground: str = "otsu"
    clip: tuple[float, float] = (-1.5, 1.5)

    def to_dict(self) -> dict:
        return {"method": "zscore-foreground", **asdict(self), "clip": list(self.clip)}

    @classmethod
    def from_dict(cls, d: dict) -> Normalisation:
        method = d.get("method", "zscore-foreground")
        if method != "zscore-foreground":
            raise ValueError(f"unknown normalisation method {method!r}")
        return cls(foreground=d.get("foreground", "otsu"), clip=tuple(d.get("clip", (-1.5, 1.5))))


@dataclass(frozen=True)
class SliceGeometry:
    """What :func:`slices_to_volume` needs to undo :func:`volume_to_slices`.

    ``file_shape`` is the scan's (X, Y, Z); ``canon_shape`` the same in RAS+ order;
    ``plane_shape`` the in-plane (A, B) of one canonical slice; ``fit_shape`` its size after
    resizing, placed at ``offset`` inside the ``image_size`` square.
    """

    file_shape: tuple[int, int, int]
    canon_shape: tuple[int, int, int]
    to_canon: np.ndarray
    from_canon: np.ndarray
    axis: int
    plane_shape: tuple[int, int]
    fit_shape: tuple[int, int]
    offset: tuple[int, int]
    image_size: int

    @property
    def n_slices(self) -> int:
        return self.canon_shape[self.axis]

    @property
    def file_axis(self) -> int:
        """The file's voxel axis that the slicing axis runs along."""
        return int(np.flatnonzero(self.to_canon[:, 0] == self.axis)[0])

    @property
    def flipped(self) -> bool:
        """True when canonical slice k is file slice n-1-k."""
        return bool(self.to_canon[self.file_axis, 1] < 0)

    def file_slice_order(self) -> np.ndarray:
        """Index i of the result is the canonical slice for file slice i along ``file_axis``."""
        idx = np.arange(self.n_slices)
        return idx[::-1].copy() if self.flipped else idx


def resolve_axis(axis: str | int) -> int:
    if isinstance(axis, str):
        key = axis.lower()
        if key not in AXES:
            raise InputError(f"unknown axis {axis!r}; choose one of {', '.join(AXES)}")
        return AXES[key]
    if axis not in (0, 1, 2):
        raise InputError(f"axis must be 0, 1 or 2 (RAS+ order), not {axis}")
    return int(axis)


#: Percentiles behind :func:`outlier_mask`: the background level is the 1st percentile of all
#: voxels, the object's bright level the 95th percentile of the voxels above it; their
#: difference is the span.
OUTLIER_PERCENTILES = (1.0, 95.0)
#: Voxels more than this many spans below the background level or above the bright level are
#: outliers (every voxel of the bundled samples and templates lies within 1.1 spans).
OUTLIER_SPANS = 3.0


def outlier_mask(data: np.ndarray) -> np.ndarray:
    """Boolean mask, shape of ``data``: voxels that are not finite, or are isolated extremes far
    outside the scan's own intensity range (saturated or dropped-out voxels, hot pixels).

    The range comes from percentiles (:data:`OUTLIER_PERCENTILES`, :data:`OUTLIER_SPANS`), so up
    to 1 % of all voxels below it and up to 5 % of the object's voxels above it are found.
    Clean scans have none: bright vessels or fat lie well within the range.
    """
    finite = np.isfinite(data)
    flat = data[finite] if not finite.all() else data.ravel()
    if flat.size == 0:
        return ~finite
    flat = flat[:: max(1, flat.size // 1_000_000)]
    p_low, p_high = OUTLIER_PERCENTILES
    low = float(np.percentile(flat, p_low))
    above = flat[flat > low]
    if above.size == 0:
        return ~finite
    high = float(np.percentile(above, p_high))
    margin = OUTLIER_SPANS * (high - low)
    return ~finite | (data < low - margin) | (data > high + margin)


def clip_outliers(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``data`` with every voxel of :func:`outlier_mask` clipped to the range of the other
    voxels (NaN to their minimum), and that mask. Returns ``data`` itself (not a copy) when
    there is no outlier, so clean scans are processed exactly as before."""
    bad = outlier_mask(data)
    if not bad.any():
        return data, bad
    if bad.all():
        raise InputError("no voxel has a usable intensity: nothing to score")
    good = data[~bad]
    low, high = float(good.min()), float(good.max())
    out = np.clip(data, low, high)
    out[np.isnan(out)] = low
    return out, bad


def outlier_note(n: int) -> str:
    """The note a result carries when :func:`clip_outliers` clipped ``n`` voxels."""
    return (
        f"{n} voxels with extreme intensities (saturated, dropped out or not finite) were "
        "clipped to the scan's range"
    )


def foreground_mask(data: np.ndarray, method: str = "otsu") -> np.ndarray:
    """Boolean mask of the object (head or brain), shape of ``data``. ``data`` should hold no
    outliers (see :func:`clip_outliers`): the threshold uses its minimum and its whole range."""
    lo = float(data.min())
    if method == "nonzero":
        return data > lo
    if method == "otsu":
        from skimage.filters import threshold_otsu

        flat = data.ravel()
        t = float(threshold_otsu(flat[:: max(1, flat.size // 1_000_000)]))
        mask = data > t
        if not mask.any():
            mask = data > lo
        return mask
    raise ValueError(f"unknown foreground method {method!r}")


def fill_object(mask: np.ndarray, axis: int | None = None) -> np.ndarray:
    """``mask`` (X, Y, Z) bool with enclosed holes filled: in every 2D slice along ``axis``
    (which also fills every hole enclosed in 3D), or in 3D when ``axis`` is None. Dark structures
    inside the object (a necrotic lesion core, ventricles) then belong to it even where the
    intensity threshold left them out."""
    from scipy.ndimage import binary_fill_holes

    if axis is None:
        return binary_fill_holes(mask)
    if not mask.any():
        return mask.copy()
    # work inside the object's bounding box: background beyond it is outside anyway
    spans = []
    for a in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(b for b in range(3) if b != a)))
        spans.append(slice(int(hit[0]), int(hit[-1]) + 1))
    box = tuple(spans)
    out = np.zeros(mask.shape, bool)
    out[box] = _fill_slices(mask[box], axis)
    return out


def _fill_slices(mask: np.ndarray, axis: int) -> np.ndarray:
    from scipy.ndimage import label

    # one labelling of the background, connected within slices only (4-connected in-plane)
    structure = np.zeros((3, 3, 3), bool)
    centre = [1, 1, 1]
    structure[tuple(centre)] = True
    for a in range(3):
        if a != axis:
            for d in (0, 2):
                idx = list(centre)
                idx[a] = d
                structure[tuple(idx)] = True
    labels, _ = label(~mask, structure=structure)
    touching = [labels.take(i, axis=a) for a in range(3) if a != axis for i in (0, -1)]
    outside = np.unique(np.concatenate([t.ravel() for t in touching]))
    return ~np.isin(labels, outside[outside > 0])


def normalise(
    data: np.ndarray, foreground: np.ndarray, norm: Normalisation
) -> tuple[np.ndarray, dict]:
    """Z-score over the foreground, then clip. Returns (float32 array, {"mean", "std"})."""
    values = data[foreground]
    if values.size < 2:
        values = data.ravel()
    mean = float(values.mean(dtype=np.float64))
    std = float(values.std(dtype=np.float64))
    if not std > 0:
        std = float(data.std(dtype=np.float64)) or 1.0
    out = (data - np.float32(mean)) / np.float32(std)
    np.clip(out, norm.clip[0], norm.clip[1], out=out)
    return out.astype(np.float32, copy=False), {"mean": mean, "std": std}


def _canonical_transforms(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ornt = io_orientation(affine)
    ras = axcodes2ornt("RAS")
    return ornt_transform(ornt, ras), ornt_transform(ras, ornt)


def make_geometry(
    file_shape: tuple[int, ...],
    affine: np.ndarray,
    spacing: tuple[float, ...],
    axis: int,
    image_size: int,
) -> SliceGeometry:
    """Plan the slicing of a (X, Y, Z) volume; see :class:`SliceGeometry`."""
    to_canon, from_canon = _canonical_transforms(affine)
    perm = to_canon[:, 0].astype(int)  # file axis i -> canonical axis perm[i]
    canon_shape = [0, 0, 0]
    canon_spacing = [0.0, 0.0, 0.0]
    for i in range(3):
        canon_shape[perm[i]] = int(file_shape[i])
        canon_spacing[perm[i]] = float(spacing[i])
    plane_axes = [a for a in range(3) if a != axis]
    plane = (canon_shape[plane_axes[0]], canon_shape[plane_axes[1]])
    extent = [plane[k] * canon_spacing[plane_axes[k]] for k in range(2)]
    longest = max(extent)
    fit = tuple(max(1, min(image_size, round(image_size * e / longest))) for e in extent)
    offset = tuple((image_size - f) // 2 for f in fit)
    return SliceGeometry(
        tuple(int(s) for s in file_shape),
        tuple(canon_shape),
        to_canon,
        from_canon,
        axis,
        plane,
        fit,
        offset,
        image_size,
    )


def _resize(stack, size: tuple[int, int]):
    """Bilinear resize of a (N, H, W) float tensor, antialiased when shrinking."""
    import torch.nn.functional as F

    if tuple(stack.shape[-2:]) == tuple(size):
        return stack
    shrink = size[0] < stack.shape[-2] or size[1] < stack.shape[-1]
    return F.interpolate(
        stack[:, None], size=size, mode="bilinear", align_corners=False, antialias=shrink
    )[:, 0]


def canonical_slices(data: np.ndarray, geom: SliceGeometry) -> np.ndarray:
    """View of ``data`` (file order) as (N, A, B) slices in canonical order."""
    canon = apply_orientation(data, geom.to_canon)
    return np.moveaxis(canon, geom.axis, 0)


def to_model_space(stack: np.ndarray, geom: SliceGeometry, pad_value: float):
    """(N, A, B) numpy slices -> (N, 1, S, S) float32 torch tensor."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))
    t = _resize(t, geom.fit_shape)
    s = geom.image_size
    out = torch.full((t.shape[0], 1, s, s), float(pad_value), dtype=torch.float32)
    (oa, ob), (fa, fb) = geom.offset, geom.fit_shape
    out[:, 0, oa : oa + fa, ob : ob + fb] = t
    return out


@dataclass
class ModelSlices:
    """Slices of one volume in model space.

    ``images``: (N, 1, S, S) float32 torch tensor; ``foreground``: (N,) bool, slices holding any
    foreground; ``stats``: the normalisation's mean and std (scan intensity units);
    ``pad_value``: the normalised background value used for padding; ``foreground_mask``:
    (X, Y, Z) bool in file order; ``n_outliers``: voxels clipped by :func:`clip_outliers`.
    """

    images: object
    foreground: np.ndarray
    geometry: SliceGeometry
    stats: dict
    pad_value: float
    foreground_mask: np.ndarray
    n_outliers: int = 0


def volume_to_slices(
    data: np.ndarray,
    affine: np.ndarray,
    spacing: tuple[float, ...],
    axis: str | int,
    image_size: int,
    norm: Normalisation,
) -> ModelSlices:
    """Preprocess one (X, Y, Z) volume into model-space slices (training and scoring): outliers
    clipped (:func:`clip_outliers`), foreground (:func:`foreground_mask`, outliers left out),
    z-score over it (:func:`normalise`), slicing along ``axis``, resizing and padding to
    ``image_size`` squares. ``spacing`` in mm per voxel axis.

    Raises:
        InputError: unknown axis, or no voxel with a finite intensity.
    """
    ax = resolve_axis(axis)
    geom = make_geometry(data.shape, affine, spacing, ax, image_size)
    data, outliers = clip_outliers(data)
    fg = foreground_mask(data, norm.foreground) & ~outliers
    normed, stats = normalise(data, fg, norm)
    pad_value = float(np.clip((float(data.min()) - stats["mean"]) / stats["std"], *norm.clip))
    images = to_model_space(canonical_slices(normed, geom), geom, pad_value)
    fg_slices = canonical_slices(fg, geom).reshape(geom.n_slices, -1).any(axis=1)
    n_out = int(np.count_nonzero(outliers))
    return ModelSlices(images, np.asarray(fg_slices), geom, stats, pad_value, fg, n_out)


def with_neighbours(images, neighbours: int):
    """Model-space slices with their neighbours as extra channels: (N, 1, S, S) in slice order
    -> (N, 2k+1, S, S) with ``k = neighbours``, channel ``j`` of slice ``i`` holding slice
    ``i + j - k`` (the slice itself in the middle channel); beyond the first and last slice the
    edge slice is repeated. ``neighbours`` 0 returns ``images`` unchanged.

    Raises:
        ValueError: ``neighbours`` < 0 or ``images`` not (N, 1, S, S).
    """
    import torch

    if neighbours < 0:
        raise ValueError(f"neighbours must be >= 0, got {neighbours}")
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"expected (N, 1, S, S) slices, got {tuple(images.shape)}")
    if neighbours == 0:
        return images
    n = images.shape[0]
    offsets = torch.arange(-neighbours, neighbours + 1)
    index = (torch.arange(n)[:, None] + offsets[None, :]).clamp_(0, n - 1)
    return images[:, 0][index]


def slices_to_volume(maps, geom: SliceGeometry) -> np.ndarray:
    """(N, S, S) maps in model space -> float32 array of the file's exact (X, Y, Z) shape."""
    import torch

    t = maps if isinstance(maps, torch.Tensor) else torch.from_numpy(np.asarray(maps))
    t = t.reshape(-1, geom.image_size, geom.image_size).to(torch.float32)
    if t.shape[0] != geom.n_slices:
        raise ValueError(f"expected {geom.n_slices} slices, got {t.shape[0]}")
    (oa, ob), (fa, fb) = geom.offset, geom.fit_shape
    t = _resize(t[:, oa : oa + fa, ob : ob + fb].contiguous(), geom.plane_shape)
    canon = np.moveaxis(t.numpy(), 0, geom.axis)
    out = apply_orientation(canon, geom.from_canon)
    return np.ascontiguousarray(out, dtype=np.float32)
