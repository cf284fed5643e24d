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
from .hostmem import host_array
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


#: voxels the intensity decisions (outlier range, Otsu threshold) look at, evenly strided
SAMPLE_VOXELS = 1_000_000


def intensity_sample(data: np.ndarray) -> np.ndarray:
    """About :data:`SAMPLE_VOXELS` of ``data``'s voxels, evenly strided over its memory, 1D."""
    flat = data.ravel(order="K")  # a view of a C- or Fortran-ordered volume
    return flat[:: max(1, flat.size // SAMPLE_VOXELS)]


def outlier_mask(data: np.ndarray) -> np.ndarray:
    """Boolean mask, shape of ``data``: voxels that are not finite, or are isolated extremes far
    outside the scan's own intensity range (saturated or dropped-out voxels, hot pixels).

    The range comes from percentiles (:data:`OUTLIER_PERCENTILES`, :data:`OUTLIER_SPANS`), so up
    to 1 % of all voxels below it and up to 5 % of the object's voxels above it are found.
    Clean scans have none: bright vessels or fat lie well within the range.
    """
    lo, hi = float(data.min()), float(data.max())
    finite = None if np.isfinite(lo) and np.isfinite(hi) else np.isfinite(data)
    flat = intensity_sample(data) if finite is None else data[finite]
    none = np.zeros(data.shape, bool) if finite is None else ~finite
    if flat.size == 0:
        return none
    flat = flat[:: max(1, flat.size // SAMPLE_VOXELS)]
    p_low, p_high = OUTLIER_PERCENTILES
    low = float(np.percentile(flat, p_low))
    above = flat[flat > low]
    if above.size == 0:
        return none
    high = float(np.percentile(above, p_high))
    margin = OUTLIER_SPANS * (high - low)
    if finite is None and lo >= low - margin and hi <= high + margin:
        return none  # the usual case: no voxel beyond the range (no full-size comparison)
    return none | (data < low - margin) | (data > high + margin)


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

        t = float(threshold_otsu(intensity_sample(data)))
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
    if axis is None:
        return fill_holes(mask)
    if not mask.any():
        return mask.copy()
    box = bounding_box(mask)  # background beyond the object's box is outside anyway
    out = np.zeros(mask.shape, bool)
    inner, filled = mask[box], out[box]
    # slices are filled independently: a chunk of them at a time keeps the labels small
    step = max(1, CHUNK_VOXELS // max(1, inner.size // inner.shape[axis]))
    for start in range(0, inner.shape[axis], step):
        index = [slice(None)] * 3
        index[axis] = slice(start, start + step)
        filled[tuple(index)] = _fill_slices(inner[tuple(index)], axis)
    return out


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` (any shape, 2D or 3D) as bool with every hole filled: each background region
    that does not reach the array's border (regions connected through faces, as
    ``scipy.ndimage.binary_fill_holes`` defines them; equal to it, voxel for voxel).

    SimpleITK's ``BinaryFillhole`` does the work on the object's bounding box: it releases
    Python's GIL (scipy's version holds it for seconds on a large scan, freezing a viewer that
    waits on the same interpreter) and is about twice as fast.
    """
    import SimpleITK as sitk

    mask = np.asarray(mask, dtype=bool)
    out = mask.copy()
    if not mask.any() or mask.ndim not in (2, 3):
        return out
    # the bounding box with one voxel of background around it: every background voxel outside
    # the box reaches the border, so filling the box fills the whole
    box = bounding_box(mask, margin=1)
    image = sitk.GetImageFromArray(np.ascontiguousarray(mask[box], dtype=np.uint8))
    filled = sitk.BinaryFillhole(image, fullyConnected=False, foregroundValue=1)
    out[box] = sitk.GetArrayViewFromImage(filled).astype(bool)
    return out


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    """One slice per axis: the smallest box holding every True voxel of ``mask`` (which must
    hold one), grown by ``margin`` voxels on each side within the array."""
    box = []
    for a in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(b for b in range(mask.ndim) if b != a)))
        box.append(slice(max(int(hit[0]) - margin, 0), int(hit[-1]) + 1 + margin))
    return tuple(box)


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
    labels, n = label(~mask, structure=structure)
    touching = [labels.take(i, axis=a) for a in range(3) if a != axis for i in (0, -1)]
    inside = np.ones(n + 1, bool)  # label -> part of the filled object
    inside[np.concatenate([t.ravel() for t in touching])] = False
    inside[0] = True  # the object itself
    return inside[labels]


def normalisation_stats(data: np.ndarray, foreground: np.ndarray) -> dict:
    """{"mean", "std"} (float, scan intensity units) of ``data`` over ``foreground`` (both
    (X, Y, Z)); over the whole volume when fewer than two voxels are foreground, std 1 when the
    values are constant.

    One pass, slab by slab along the axis outermost in memory (no copy of the foreground's
    values at full size), in float64 around a shift ``c`` (the mean of a sparse subsample):
    ``mean = c + S1 / n``, ``var = S2 / n - (S1 / n)^2`` with ``S1 = sum(x - c)`` and
    ``S2 = sum((x - c)^2)``; shifting by a value near the mean keeps the difference exact to
    float64 precision (Chan, Golub & LeVeque 1983)."""
    count = int(np.count_nonzero(foreground))
    use_fg = count >= 2
    where = foreground
    n = count if use_fg else data.size
    sub = (slice(None, None, 4),) * data.ndim
    probe = data[sub][foreground[sub]] if use_fg else data[sub]
    shift = float(probe.mean(dtype=np.float64)) if probe.size else 0.0
    outer = int(np.argmax(np.abs(data.strides)))  # slabs contiguous in memory
    step = max(1, (1 << 20) // max(1, data.size // data.shape[outer]))
    s1 = s2 = 0.0
    for i in range(0, data.shape[outer], step):
        slab = (slice(None),) * outer + (slice(i, i + step),)
        block = data[slab]
        values = block[np.broadcast_to(where[slab] if use_fg else True, block.shape)]
        centred = values.astype(np.float64) - shift
        s1 += float(centred.sum())
        s2 += float(np.square(centred, out=centred).sum())  # not np.dot: BLAS threads would
        # then spin beside torch's
    mean = shift + s1 / n
    var = max(s2 / n - (s1 / n) ** 2, 0.0)
    std = float(np.sqrt(var))
    if not std > 0:
        std = float(data.std(dtype=np.float64)) or 1.0
    return {"mean": float(mean), "std": std}


def normalise(
    data: np.ndarray, foreground: np.ndarray, norm: Normalisation
) -> tuple[np.ndarray, dict]:
    """Z-score over the foreground, then clip. Returns (float32 array, {"mean", "std"})."""
    stats = normalisation_stats(data, foreground)
    out = (data - np.float32(stats["mean"])) / np.float32(stats["std"])
    np.clip(out, norm.clip[0], norm.clip[1], out=out)
    return out.astype(np.float32, copy=False), stats


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


#: Voxels per chunk of slices that is resized at once (16 Mi float32 voxels: 64 MiB); the
#: volume's slices are prepared and mapped back chunk by chunk, never all at once.
CHUNK_VOXELS = 1 << 24


def canonical_slices(data: np.ndarray, geom: SliceGeometry) -> np.ndarray:
    """View of ``data`` (file order) as (N, A, B) slices in canonical order."""
    canon = apply_orientation(data, geom.to_canon)
    return np.moveaxis(canon, geom.axis, 0)


def stack_layout(geom: SliceGeometry) -> tuple[tuple[int, int, int], tuple[int, ...]]:
    """How the file's (X, Y, Z) array holds the canonical (N, A, B) slice stack: ``perm[k]`` is
    the file axis of stack dimension k (0: slices, 1 and 2: in-plane), and ``flips`` lists the
    stack dimensions that run backwards in the file. ``file.permute(perm)`` flipped along
    ``flips`` is :func:`canonical_slices`."""
    file_of_canon = np.argsort(geom.to_canon[:, 0])  # canonical axis j <- file axis
    plane = [a for a in range(3) if a != geom.axis]
    perm = tuple(int(file_of_canon[a]) for a in (geom.axis, *plane))
    flips = tuple(k for k in range(3) if geom.to_canon[perm[k], 1] < 0)
    return perm, flips  # type: ignore[return-value]


def _chunk_slices(geom: SliceGeometry, plane_voxels: int, chunk_voxels: int | None) -> int:
    return max(1, (CHUNK_VOXELS if chunk_voxels is None else int(chunk_voxels)) // plane_voxels)


def _file_rows(geom: SliceGeometry, flips: tuple[int, ...], start: int, stop: int) -> slice:
    """The file's indices along the slicing axis of canonical slices ``start:stop``."""
    n = geom.n_slices
    return slice(n - stop, n - start) if 0 in flips else slice(start, stop)


def as_device_volume(data: np.ndarray, device=None):
    """(X, Y, Z) float32 torch tensor of ``data`` on ``device`` (None: the CPU, sharing
    ``data``'s memory when it is float32 and native-endian; one copy on an accelerator)."""
    import warnings

    import torch

    arr = np.asarray(data, dtype=np.float32)
    if not arr.dtype.isnative:
        arr = arr.astype(np.float32)
    with warnings.catch_warnings():  # a read-only array is only ever read here
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(arr)
    return t if device is None else t.to(device)


def slices_to_model_space(
    volume,
    geom: SliceGeometry,
    stats: dict,
    clip: tuple[float, float],
    pad_value: float,
    chunk_voxels: int | None = None,
):
    """Normalise, resize and pad every slice of a volume, on the volume's device.

    Args:
        volume: (X, Y, Z) float32 torch tensor in file order (:func:`as_device_volume`).
        geom: the slicing plan (:func:`make_geometry`).
        stats: {"mean", "std"} of the z-score (scan units); clip: (low, high) in z-units.
        pad_value: the normalised background value the padding takes.
        chunk_voxels: volume voxels handled at once (default :data:`CHUNK_VOXELS`).
    Returns:
        (N, 1, S, S) float32 tensor on the volume's device, canonical slice order.
    """
    import torch

    n, s = geom.n_slices, geom.image_size
    out = torch.full((n, 1, s, s), float(pad_value), dtype=torch.float32, device=volume.device)
    (oa, ob), (fa, fb) = geom.offset, geom.fit_shape
    mean, std = float(np.float32(stats["mean"])), float(np.float32(stats["std"]))
    for start, stop, chunk in _canonical_chunks(volume, geom, chunk_voxels):
        chunk.sub_(mean).div_(std).clamp_(clip[0], clip[1])
        out[start:stop, 0, oa : oa + fa, ob : ob + fb] = _resize(chunk, geom.fit_shape)
    return out


def excess_slices(
    volume,
    foreground,
    geom: SliceGeometry,
    stats: dict,
    bounds: tuple[float, float],
    chunk_voxels: int | None = None,
):
    """How far each foreground voxel's z-score lies outside the healthy range ``bounds`` (low,
    high; z-units), in model space: ``max(z - high, 0) + max(low - z, 0)`` inside
    ``foreground``, 0 elsewhere and in the padding, resized as :func:`slices_to_model_space`
    resizes the slices. The network sees intensities clipped to the card's range, so a lesion
    brighter (or darker) than any healthy tissue looks to it like the brightest tissue; this
    is the part of its contrast that the clip removes.

    Args:
        volume: (X, Y, Z) float32 torch tensor in file order (:func:`as_device_volume`).
        foreground: (X, Y, Z) torch tensor (bool viewed as uint8, or float), 1 inside the
            foreground, 0 outside, same device.
        geom, stats, chunk_voxels: as :func:`slices_to_model_space`.
    Returns:
        (N, 1, S, S) float32 tensor on the volume's device, canonical slice order.
    """
    import torch

    n, s = geom.n_slices, geom.image_size
    out = torch.zeros((n, 1, s, s), dtype=torch.float32, device=volume.device)
    (oa, ob), (fa, fb) = geom.offset, geom.fit_shape
    mean, std = float(np.float32(stats["mean"])), float(np.float32(stats["std"]))
    low, high = float(bounds[0]), float(bounds[1])
    chunks = zip(
        _canonical_chunks(volume, geom, chunk_voxels),
        _canonical_chunks(foreground, geom, chunk_voxels),
        strict=True,
    )
    for (start, stop, chunk), (_, _, inside) in chunks:
        z = chunk.sub_(mean).div_(std)
        excess = (z - high).clamp_(min=0.0) + (low - z).clamp_(min=0.0)
        excess.mul_(inside)
        out[start:stop, 0, oa : oa + fa, ob : ob + fb] = _resize(excess, geom.fit_shape)
    return out


def _canonical_chunks(volume, geom: SliceGeometry, chunk_voxels: int | None):
    """(start, stop, chunk) for the canonical slices ``start:stop`` of a file-order (X, Y, Z)
    tensor: ``chunk`` a new contiguous float32 (n, A, B) tensor (the volume is never written)."""
    import torch

    perm, flips = stack_layout(geom)
    view = volume.permute(perm)
    n = geom.n_slices
    step = _chunk_slices(geom, geom.plane_shape[0] * geom.plane_shape[1], chunk_voxels)
    for start in range(0, n, step):
        stop = min(n, start + step)
        rows = view[_file_rows(geom, flips, start, stop)]
        if flips:  # a new tensor, in canonical order
            chunk = rows.flip(flips).to(torch.float32).contiguous()
        else:  # one contiguous copy
            chunk = torch.empty(rows.shape, dtype=torch.float32, device=rows.device)
            chunk.copy_(rows)
        yield start, stop, chunk


def to_model_space(stack: np.ndarray, geom: SliceGeometry, pad_value: float):
    """(N, A, B) numpy slices in canonical order -> (N, 1, S, S) float32 torch tensor (resized
    and padded, values unchanged)."""
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

    ``images``: (N, 1, S, S) float32 torch tensor (on the device asked for); ``foreground``:
    (N,) bool, slices holding any foreground; ``stats``: the normalisation's mean and std (scan
    intensity units); ``pad_value``: the normalised background value used for padding;
    ``foreground_mask``: (X, Y, Z) bool in file order; ``n_outliers``: voxels clipped by
    :func:`clip_outliers`.
    """

    images: object
    foreground: np.ndarray
    geometry: SliceGeometry
    stats: dict
    pad_value: float
    foreground_mask: np.ndarray
    n_outliers: int = 0


def foreground_slices(mask: np.ndarray, geom: SliceGeometry) -> np.ndarray:
    """(N,) bool in canonical slice order: slices of ``mask`` (X, Y, Z) holding any voxel."""
    fa = geom.file_axis
    per_file = mask.any(axis=tuple(a for a in range(3) if a != fa))
    return per_file[::-1].copy() if geom.flipped else per_file


def normalisation_of(
    data: np.ndarray, norm: Normalisation
) -> tuple[np.ndarray, np.ndarray, int, dict]:
    """The intensity decisions of the z-score, made once for scoring, training and the healthy
    range: (data with outliers clipped (:func:`clip_outliers`), its foreground
    (:func:`foreground_mask`, outliers left out), the number of outliers, {"mean", "std"} over
    the foreground (:func:`normalisation_stats`))."""
    data, outliers = clip_outliers(data)
    fg = foreground_mask(data, norm.foreground)
    n_out = int(np.count_nonzero(outliers))
    if n_out:
        fg &= ~outliers
    del outliers
    return data, fg, n_out, normalisation_stats(data, fg)


def volume_to_slices(
    data: np.ndarray,
    affine: np.ndarray,
    spacing: tuple[float, ...],
    axis: str | int,
    image_size: int,
    norm: Normalisation,
    device=None,
    chunk_voxels: int | None = None,
) -> ModelSlices:
    """Preprocess one (X, Y, Z) volume into model-space slices (training and scoring): outliers
    clipped (:func:`clip_outliers`), foreground (:func:`foreground_mask`, outliers left out),
    z-score over it (:func:`normalisation_stats`), slicing along ``axis``, resizing and padding
    to ``image_size`` squares. ``spacing`` in mm per voxel axis.

    The intensity decisions (outliers, foreground, mean and std) are made in numpy on the host;
    the reorientation, z-score, clipping, resizing and padding run in torch on ``device``
    (None: the CPU, working on ``data`` itself), chunk by chunk of slices
    (:func:`slices_to_model_space`), with no normalised copy of the volume.

    Raises:
        InputError: unknown axis, or no voxel with a finite intensity.
    """
    ax = resolve_axis(axis)
    geom = make_geometry(data.shape, affine, spacing, ax, image_size)
    data, fg, n_out, stats = normalisation_of(data, norm)
    pad_value = float(np.clip((float(data.min()) - stats["mean"]) / stats["std"], *norm.clip))
    vol = as_device_volume(data, device)
    images = slices_to_model_space(vol, geom, stats, norm.clip, pad_value, chunk_voxels)
    del vol
    return ModelSlices(images, foreground_slices(fg, geom), geom, stats, pad_value, fg, n_out)


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


def slices_to_volume(
    maps,
    geom: SliceGeometry,
    out: np.ndarray | None = None,
    *,
    scale: float = 1.0,
    offset: float = 0.0,
    accumulate: bool = False,
    dtype=np.float32,
    span: tuple[int, int] | None = None,
    chunk_voxels: int | None = None,
) -> np.ndarray:
    """Map (N, S, S) model-space maps back onto the file's exact (X, Y, Z) grid.

    Chunk by chunk of slices: crop the padding, resize to the slice plane, ``* scale + offset``
    (float32, on the maps' device), undo the reorientation, and write (or, with
    ``accumulate``, add) into ``out`` on the host; only ``out`` is ever of the volume's size.

    Args:
        maps: (N, S, S) numpy array or torch tensor (any device), canonical slice order.
        geom: the slicing plan the maps came from.
        out: (X, Y, Z) numpy array to fill (default: a new ``dtype`` array).
        scale, offset: applied to the resized values (e.g. back to scan intensity units).
        accumulate: add into ``out`` instead of overwriting it.
        dtype: of a new ``out``: float32 (default) or float16.
        span: (start, stop): map only canonical slices ``start:stop``; ``out`` keeps its values
            on the others (a new ``out`` is then zero there). Default: every slice.
        chunk_voxels: output voxels handled at once (default :data:`CHUNK_VOXELS`).
    Returns:
        ``out``.

    Raises:
        ValueError: not N slices of S x S, or ``out`` not of the file's shape.
    """
    import torch

    t = maps if isinstance(maps, torch.Tensor) else torch.from_numpy(np.asarray(maps))
    t = t.reshape(-1, geom.image_size, geom.image_size)
    if t.shape[0] != geom.n_slices:
        raise ValueError(f"expected {geom.n_slices} slices, got {t.shape[0]}")
    first, last = (0, geom.n_slices) if span is None else (max(0, span[0]), min(span[1], len(t)))
    if out is None:  # zeros where nothing is mapped (one contiguous fill, not strided ones)
        partial = accumulate or (first, last) != (0, geom.n_slices)
        out = host_array(geom.file_shape, dtype, zero=partial)
    if tuple(out.shape) != tuple(geom.file_shape):
        raise ValueError(f"out has shape {out.shape}, not the file's {geom.file_shape}")
    perm, flips = stack_layout(geom)
    view = torch.from_numpy(out).permute(perm)
    (oa, ob), (fa, fb) = geom.offset, geom.fit_shape
    scale32, offset32 = float(np.float32(scale)), float(np.float32(offset))
    step = _chunk_slices(geom, geom.plane_shape[0] * geom.plane_shape[1], chunk_voxels)
    for start in range(first, last, step):
        stop = min(last, start + step)
        chunk = t[start:stop, oa : oa + fa, ob : ob + fb].to(torch.float32).contiguous()
        chunk = _resize(chunk, geom.plane_shape)
        if scale != 1.0:
            chunk = chunk * scale32
        if offset != 0.0:
            chunk = chunk + offset32
        if flips:
            chunk = chunk.flip(flips)
        chunk = chunk.to(device="cpu", dtype=view.dtype)
        target = view[_file_rows(geom, flips, start, stop)]
        if accumulate:
            target += chunk
        else:
            target.copy_(chunk)
    return out
