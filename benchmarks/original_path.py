"""The frozen original scoring path: the baseline that engine speed-ups are measured against.

A plain, deliberately unoptimised reimplementation of what the code of Zimmerer et al. (2019)
does with a volume, end to end, written against numpy, scikit-image, nibabel and torch only. It
imports nothing from ``napari_vaeloc``: the benchmarks hand it a network (anything with
``encode(x) -> (mu, log_std)`` and ``decode(z) -> x_hat``) and the few numbers of the model card
it needs, so that making our preprocessing, scoring or mapping back faster never makes this
baseline faster too. Do not "improve" it; it is the fixed reference of ``bench_engine.py``.

Steps (one Python iteration per slice wherever the original loops over slices):

1. reorient to RAS+ voxel order (nibabel orientations) and cut axial (or other) slices;
2. foreground: Otsu's threshold over the whole volume (``skimage.filters.threshold_otsu``); its
   mean and standard deviation (float64, numpy);
3. per slice: z-score with those statistics and clip to ``clip`` (numpy), then
   ``skimage.transform.resize`` (bilinear, scikit-image's default anti-aliasing when shrinking)
   so that the longer physical side fills the model's square input, aspect kept, and pad to the
   square with the normalised background value;
4. per batch of slices that hold foreground: three separate forward+backward passes for
   |dKL/dx|, |dRec/dx| and |dELBO/dx| (z = mu, Gaussian likelihood), one more forward pass for
   the per-pixel Rec error, a 7x7 Gaussian (sigma 3 px, zero padding) on each gradient map and
   the paper's Combi = smooth(minmax(|dKL/dx|)) * RecError with a per-batch min-max;
5. per map and per slice: crop the padding, ``skimage.transform.resize`` back to the slice's
   shape, stack, and reorient to the file's voxel order.

Scans with outliers (saturated or non-finite voxels) are not cleaned first, and the object's
holes are not filled: the original did neither. Everything runs on the CPU in float32 (the
resizes in float64, as scikit-image does).

Run it alone on a NIfTI file (the model is loaded with napari-vaeloc's loader, the only use of
the package)::

    .venv/bin/python benchmarks/original_path.py SCAN.nii.gz --model t2-brain
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from skimage.filters import threshold_otsu
from skimage.transform import resize

#: the maps the original code produces, in the order it computes them
MAPS = ("kl_grad", "rec_grad", "elbo_grad", "rec_error", "combi")
#: slicing axis -> RAS+ voxel axis
AXES = {"sagittal": 0, "coronal": 1, "axial": 2}


@dataclass
class OriginalResult:
    """Maps (name -> float32 array of the file's shape), how many slices were scored, and the
    seconds each stage took."""

    maps: dict[str, np.ndarray]
    n_scored: int
    n_slices: int
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class Slices:
    """Model-space slices of one volume and what mapping back needs."""

    images: np.ndarray  # (N, S, S) float32
    foreground: np.ndarray  # (N,) bool: the slice holds foreground
    file_shape: tuple[int, ...]
    canon_shape: tuple[int, ...]
    from_canon: np.ndarray  # nibabel orientation transform RAS+ -> file order
    axis: int
    plane_shape: tuple[int, int]
    fit_shape: tuple[int, int]
    offset: tuple[int, int]


def load_nifti(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A 3D NIfTI file as (float32 data, 4x4 affine)."""
    img = nib.load(path)
    return np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine, dtype=np.float64)


def gaussian_kernel(size: int = 7, sigma: float = 3.0) -> torch.Tensor:
    """Normalised 2D Gaussian, shape (1, 1, size, size)."""
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(r**2) / (2 * sigma**2))
    k = np.outer(g, g)
    return torch.from_numpy((k / k.sum()).astype(np.float32))[None, None]


def preprocess(
    data: np.ndarray,
    affine: np.ndarray,
    axis: str = "axial",
    image_size: int = 64,
    clip: tuple[float, float] = (-1.5, 1.5),
) -> Slices:
    """Steps 1-3: the volume as model-space slices, one slice at a time."""
    ornt = io_orientation(affine)
    ras = axcodes2ornt("RAS")
    canon = apply_orientation(data, ornt_transform(ornt, ras))
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    spacing = [0.0, 0.0, 0.0]
    for i in range(3):
        spacing[int(ornt[i, 0])] = float(zooms[i])
    ax = AXES[axis]
    plane_axes = [a for a in range(3) if a != ax]
    plane = (canon.shape[plane_axes[0]], canon.shape[plane_axes[1]])
    extent = [plane[k] * spacing[plane_axes[k]] for k in range(2)]
    fit = tuple(max(1, min(image_size, round(image_size * e / max(extent)))) for e in extent)
    offset = tuple((image_size - f) // 2 for f in fit)

    threshold = threshold_otsu(canon)
    fg = canon > threshold
    if not fg.any():
        fg = canon > canon.min()
    values = canon[fg]
    mean, std = float(values.mean(dtype=np.float64)), float(values.std(dtype=np.float64))
    std = std if std > 0 else 1.0
    pad = float(np.clip((float(canon.min()) - mean) / std, *clip))

    n = canon.shape[ax]
    images = np.full((n, image_size, image_size), pad, dtype=np.float32)
    has_fg = np.zeros(n, dtype=bool)
    (oa, ob), (fa, fb) = offset, fit
    index: list[slice | int] = [slice(None)] * 3
    for k in range(n):
        index[ax] = k
        sl = canon[tuple(index)]
        has_fg[k] = bool(fg[tuple(index)].any())
        z = (sl - mean) / std
        z = np.clip(z, clip[0], clip[1])
        small = resize(z, (fa, fb), order=1, preserve_range=True)
        images[k, oa : oa + fa, ob : ob + fb] = small
    return Slices(
        images,
        has_fg,
        tuple(data.shape),
        tuple(canon.shape),
        ornt_transform(ras, ornt),
        ax,
        plane,
        (fa, fb),
        (oa, ob),
    )


def _kl(mu: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    return 0.5 * (mu.pow(2) + torch.exp(2 * log_std) - 1 - 2 * log_std).sum(dim=1)


def _nll(x: torch.Tensor, x_hat: torch.Tensor, log_std: float) -> torch.Tensor:
    return 0.5 * (x - x_hat).pow(2) * math.exp(-2 * log_std) + log_std + 0.5 * math.log(2 * math.pi)


def score_batch(
    network: torch.nn.Module, x: torch.Tensor, log_std: float, kernel: torch.Tensor
) -> dict[str, np.ndarray]:
    """Step 4 for one batch x (B, 1, S, S): maps (B, S, S) float32."""

    def input_grad(term: str) -> torch.Tensor:
        xx = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            mu, z_log_std = network.encode(xx)
            x_hat = network.decode(mu)
            kl = _kl(mu, z_log_std).sum()
            rec = _nll(xx, x_hat, log_std).sum()
            loss = {"kl": kl, "rec": rec, "elbo": kl + rec}[term]
            (g,) = torch.autograd.grad(loss, xx)
        return g.abs()

    def smooth(m: torch.Tensor) -> torch.Tensor:
        return F.conv2d(m, kernel, padding=kernel.shape[-1] // 2)

    g_kl, g_rec, g_elbo = input_grad("kl"), input_grad("rec"), input_grad("elbo")
    with torch.no_grad():
        mu, _ = network.encode(x)
        rec_error = _nll(x, network.decode(mu), log_std)
        lo, hi = g_kl.min(), g_kl.max()
        kl_mm = (g_kl - lo) / (hi - lo).clamp_min(1e-12)
        out = {
            "kl_grad": smooth(g_kl),
            "rec_grad": smooth(g_rec),
            "elbo_grad": smooth(g_elbo),
            "rec_error": rec_error,
            "combi": smooth(kl_mm) * rec_error,
        }
    return {k: v[:, 0].numpy() for k, v in out.items()}


def batches(slices: Slices, batch_size: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(slice indices, (B, 1, S, S) tensor) for every batch of slices holding foreground."""
    todo = np.flatnonzero(slices.foreground)
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        yield idx, torch.from_numpy(slices.images[idx][:, None].copy())


def map_back(maps: np.ndarray | None, slices: Slices) -> np.ndarray:
    """Step 5 for one map: (N, S, S) model-space maps (None: all zero) -> float32 volume of the
    file's shape, one slice at a time."""
    n = slices.images.shape[0]
    canon = np.zeros(slices.canon_shape, dtype=np.float32)
    (oa, ob), (fa, fb) = slices.offset, slices.fit_shape
    index: list[slice | int] = [slice(None)] * 3
    for k in range(n):
        if maps is None or not slices.foreground[k]:
            continue
        crop = maps[k, oa : oa + fa, ob : ob + fb]
        index[slices.axis] = k
        canon[tuple(index)] = resize(crop, slices.plane_shape, order=1, preserve_range=True)
    return np.ascontiguousarray(apply_orientation(canon, slices.from_canon), dtype=np.float32)


def localize_original(
    data: np.ndarray,
    affine: np.ndarray,
    network: torch.nn.Module,
    *,
    axis: str = "axial",
    image_size: int = 64,
    likelihood_log_std: float = 0.0,
    clip: tuple[float, float] = (-1.5, 1.5),
    batch_size: int = 64,
) -> OriginalResult:
    """The whole original path on one volume: ``data`` (X, Y, Z) in file order, ``affine`` its
    voxel-to-world matrix; ``network`` in eval mode. Returns the :data:`MAPS` on the file's grid.
    """
    t0 = time.perf_counter()
    slices = preprocess(data, affine, axis, image_size, clip)
    t1 = time.perf_counter()
    kernel = gaussian_kernel()
    n = slices.images.shape[0]
    per_slice: dict[str, list[np.ndarray | None]] = {k: [None] * n for k in MAPS}
    for idx, x in batches(slices, batch_size):
        out = score_batch(network, x, likelihood_log_std, kernel)
        for k, v in out.items():
            for j, i in enumerate(idx):
                per_slice[k][i] = v[j]
    t2 = time.perf_counter()
    blank = np.zeros((image_size, image_size), dtype=np.float32)
    maps = {}
    for k in MAPS:
        stack = np.stack([blank if m is None else m for m in per_slice[k]])
        maps[k] = map_back(stack, slices)
    t3 = time.perf_counter()
    seconds = {"preprocess": t1 - t0, "network": t2 - t1, "map back": t3 - t2, "total": t3 - t0}
    return OriginalResult(maps, int(slices.foreground.sum()), n, seconds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("scan", help="a 3D NIfTI file in the model's space")
    p.add_argument("--model", default="t2-brain", help="bundled model name or model folder")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from napari_vaeloc.models.store import load_model  # the network and its card only

    model = load_model(args.model)
    card = model.card
    data, affine = load_nifti(args.scan)
    res = localize_original(
        data,
        affine,
        model.network,
        axis=card.axis,
        image_size=card.image_size,
        likelihood_log_std=card.likelihood_log_std,
        clip=tuple(card.normalisation.clip),
        batch_size=args.batch_size,
    )
    stages = ", ".join(f"{k} {v:.2f} s" for k, v in res.seconds.items())
    print(f"{res.n_scored} of {res.n_slices} slices scored; {stages}")
    for k, v in res.maps.items():
        print(f"  {k:<10} max {float(v.max()):.4g}  mean {float(v.mean()):.4g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
