"""Run a VAE over a whole volume: device choice, batching, progress, cancel.

:func:`localize` is the expensive step; it returns a :class:`LocalizationResult` whose component
maps lie on the scan's own voxel grid, so that combining and thresholding (``combine``) can be
re-run cheaply.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .errors import Cancelled, InputError
from .io import Volume, available_memory_bytes
from .mapnames import AXES, DEFAULT_MAPS, OUTPUT_MAPS, SLICE_SCORES, SMOOTHGRAD_MAPS
from .models.store import LoadedModel
from .preprocess import Normalisation, resolve_axis, slices_to_volume, volume_to_slices

#: progress(done_slices, total_slices)
ProgressCallback = Callable[[int, int], None]
#: cancel() -> True to stop
CancelFlag = Callable[[], bool]


def available_devices() -> list[str]:
    """Devices torch can use here, best first, always ending in "cpu"."""
    import torch

    devs = []
    if torch.cuda.is_available():
        devs.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devs.append("mps")
    return [*devs, "cpu"]


def resolve_device(device: str = "auto") -> str:
    """ "auto" -> cuda > mps > cpu; an explicit choice is checked to exist."""
    avail = available_devices()
    if device in (None, "", "auto"):
        return avail[0]
    base = str(device).split(":")[0]
    if base not in ("cpu", "cuda", "mps"):
        raise InputError(f"unknown device {device!r}; choose auto, cpu, cuda or mps")
    if base not in avail:
        raise InputError(f"device {device!r} is not available here (available: {', '.join(avail)})")
    return str(device)


@dataclass
class LocalizationResult:
    """Component maps and scores of one volume.

    Attributes:
        maps: name -> float32 (X, Y, Z) on the scan's voxel grid, for each map asked for
            (default ``DEFAULT_MAPS``).
            ``reconstruction`` is in the scan's intensity units; the others in model units
            (nats per pixel for rec_error, nats per z-unit for the gradients).
        foreground: bool (X, Y, Z), the object: the voxels the normalisation counted as
            foreground, with enclosed holes (dark lesion cores, ventricles) filled.
        slice_scores: name -> (n,) float32 per slice along the file's axis ``slice_axis``
            (index i = file slice i); NaN for slices without foreground, which are not scored.
        volume_scores: aggregates over scored slices (means, and the worst slice's ELBO).
        axis: anatomical slicing axis; slice_axis: the file's voxel axis it runs along.
    """

    maps: dict[str, np.ndarray]
    foreground: np.ndarray
    slice_scores: dict[str, np.ndarray]
    volume_scores: dict[str, float]
    axis: str
    slice_axis: int
    model_name: str
    device: str
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.foreground.shape


def estimate_bytes(shape: tuple[int, ...], n_maps: int = len(DEFAULT_MAPS)) -> int:
    """Peak bytes the result maps of a volume of ``shape`` need (float32 maps + working copies)."""
    return int(np.prod(shape)) * 4 * (n_maps + 4)


def localize(
    volume: Volume,
    model: LoadedModel,
    *,
    axis: str | None = None,
    device: str = "auto",
    batch_size: int = 64,
    amp: bool | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelFlag | None = None,
    max_bytes: int | None = None,
    maps: tuple[str, ...] | None = None,
    fuse: bool | None = None,
) -> LocalizationResult:
    """Score every slice of ``volume`` with ``model`` and map the results back to its grid;
    with companion models for the other slicing axes, average their maps in.

    ``fuse``: True averages in the companions the card names (``defaults["fuse_with"]``: models
    of the same kind trained on other slicing axes; bundled names, or folders relative to the
    model's) and fails without any; False scores along one axis; None follows the card
    (``defaults["fuse"]``, default true when companions are named). Fusion is skipped when
    ``axis`` asks for another axis than the model's. Each companion's maps are divided by its
    own calibrated scale and multiplied by the model's, so the average stays in the model's
    units; the reconstruction and the slice scores are the model's own. Other arguments:
    :func:`localize_axis`.
    """
    defaults = model.card.defaults or {}
    names = list(defaults.get("fuse_with", []))
    if fuse and not names:
        raise InputError(f"model {model.card.name!r} has no companion models to fuse with")
    use = bool(defaults.get("fuse", True)) if fuse is None else fuse
    if not use or (axis is not None and axis.lower() != model.card.axis):
        names = []
    if not names:
        return localize_axis(
            volume, model, axis=axis, device=device, batch_size=batch_size, amp=amp,
            progress=progress, cancel=cancel, max_bytes=max_bytes, maps=maps,
        )  # fmt: skip
    models = [model, *(_companion(model, n) for n in names)]
    runs = len(models)

    def part(i: int) -> ProgressCallback | None:
        if progress is None:
            return None
        return lambda done, total: progress(i * 1000 + (1000 * done) // max(total, 1), 1000 * runs)

    t0 = time.perf_counter()
    wanted = DEFAULT_MAPS if maps is None else tuple(maps)
    kw = dict(device=device, batch_size=batch_size, amp=amp, cancel=cancel, max_bytes=max_bytes)
    res = localize_axis(volume, model, maps=wanted, progress=part(0), **kw)
    fused = [k for k in wanted if k != "reconstruction"]
    own = (model.card.calibration or {}).get("scales", {})
    for i, other in enumerate(models[1:], start=1):
        r = localize_axis(volume, other, maps=tuple(fused), progress=part(i), **kw)
        theirs = (other.card.calibration or {}).get("scales", {})
        for k in fused:
            ratio = own.get(k, 1.0) / theirs.get(k, 1.0) if theirs.get(k) else 1.0
            res.maps[k] += r.maps[k] * np.float32(ratio)
    for k in fused:
        res.maps[k] /= np.float32(runs)
    res.notes.append(
        "maps averaged over the " + ", ".join(m.card.axis for m in models) + " models ("
        + ", ".join(m.card.name for m in models) + "), each on its calibrated scale"
    )  # fmt: skip
    res.seconds = time.perf_counter() - t0
    return res


def _companion(model: LoadedModel, name: str) -> LoadedModel:
    from pathlib import Path

    from .models.store import bundled_models

    if name not in bundled_models() and model.path is not None:
        local = Path(model.path).parent / name
        if local.is_dir():
            return _cached_model(str(local))
    return _cached_model(name)


@functools.lru_cache(maxsize=8)
def _cached_model(source: str) -> LoadedModel:
    from .models.store import load_model

    return load_model(source)


def localize_axis(
    volume: Volume,
    model: LoadedModel,
    *,
    axis: str | None = None,
    device: str = "auto",
    batch_size: int = 64,
    amp: bool | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelFlag | None = None,
    max_bytes: int | None = None,
    maps: tuple[str, ...] | None = None,
) -> LocalizationResult:
    """Score every slice of ``volume`` with ``model`` along one axis and map the results back
    to its grid.

    Args:
        axis: "axial", "coronal" or "sagittal" (default: the model's training axis). A scan with
            one slice (a 2D image) is scored along its single-slice axis whatever is asked.
        device: "auto" (cuda > mps > cpu), or an explicit device.
        batch_size: slices per forward/backward pass; the last, smaller batch is scored too.
        amp: mixed precision (default: on for CUDA only).
        progress: called with (slices done, slices total) after each batch.
        cancel: polled before each batch; when it returns True, :class:`Cancelled` is raised.
        max_bytes: refuse volumes whose maps need more memory (default: half of what is free).
        maps: which of ``OUTPUT_MAPS`` to map back to the volume (default: ``DEFAULT_MAPS``, all
            but the SmoothGrad maps, which cost two extra gradient passes); fewer maps need
            less memory and time.
    """
    import torch

    from .scoring import gaussian_kernel, score_batch

    t0 = time.perf_counter()
    card = model.card
    notes = list(volume.notes)
    wanted = DEFAULT_MAPS if maps is None else tuple(maps)
    unknown = set(wanted) - set(OUTPUT_MAPS)
    if unknown:
        raise InputError(f"unknown maps {sorted(unknown)}; choose from {', '.join(OUTPUT_MAPS)}")
    need = estimate_bytes(volume.shape, len(wanted))
    limit = available_memory_bytes() // 2 if max_bytes is None else max_bytes
    if need > limit:
        raise InputError(
            f"scoring a {'x'.join(map(str, volume.shape))} volume needs about "
            f"{need / 2**30:.1f} GiB "
            f"for its maps, more than the {limit / 2**30:.1f} GiB available; crop or downsample it"
        )
    axis_name = (axis or card.axis).lower()
    ax = resolve_axis(axis_name)
    dev = torch.device(resolve_device(device))
    use_amp = (dev.type == "cuda") if amp is None else bool(amp)
    network = model.network
    network.to(dev)

    # a single-slice scan can only be scored along its flat axis
    from .preprocess import fill_object, make_geometry

    geom0 = make_geometry(volume.shape, volume.affine, volume.spacing, ax, card.image_size)
    if 1 in geom0.canon_shape and geom0.canon_shape[ax] != 1:
        ax = geom0.canon_shape.index(1)
        new_name = next(k for k, v in AXES.items() if v == ax)
        notes.append(f"single-slice image: scored as one {new_name} slice instead of {axis_name}")
        axis_name = new_name

    norm = Normalisation.from_dict(card.normalisation)
    ms = volume_to_slices(volume.data, volume.affine, volume.spacing, ax, card.image_size, norm)
    geom = ms.geometry
    n = geom.n_slices
    todo = np.flatnonzero(ms.foreground)
    s = card.image_size
    model_maps = {k: torch.zeros((n, s, s), dtype=torch.float32) for k in wanted}
    if "reconstruction" in model_maps:
        model_maps["reconstruction"].fill_(ms.pad_value)
    scores = {k: np.full(n, np.nan, dtype=np.float32) for k in SLICE_SCORES}
    calib = card.calibration or {}
    kl_scale = float(calib.get("kl_grad_scale", 1.0))
    kernel = gaussian_kernel().to(dev)
    smoothgrad = any(k in SMOOTHGRAD_MAPS for k in wanted)
    done = 0
    if progress:
        progress(0, len(todo))
    for start in range(0, len(todo), batch_size):
        if cancel is not None and cancel():
            raise Cancelled("localization cancelled")
        idx = todo[start : start + batch_size]
        x = ms.images[idx].to(dev)
        out = score_batch(
            network, x, card.likelihood_log_std, kernel, kl_scale, use_amp, smoothgrad
        )
        tidx = torch.from_numpy(idx)
        for k in wanted:
            model_maps[k][tidx] = out[k].cpu()
        for k in SLICE_SCORES:
            scores[k][idx] = out[k].cpu().numpy()
        done += len(idx)
        if progress:
            progress(done, len(todo))
    if cancel is not None and cancel():
        raise Cancelled("localization cancelled")

    volume_maps = {}
    for k in wanted:
        volume_maps[k] = slices_to_volume(model_maps.pop(k), geom)
    if "reconstruction" in volume_maps:
        rec = volume_maps["reconstruction"]
        rec *= np.float32(ms.stats["std"])
        rec += np.float32(ms.stats["mean"])

    order = geom.file_slice_order()
    slice_scores = {k: v[order] for k, v in scores.items()}
    scored = {k: v[todo] for k, v in scores.items()}
    volume_scores: dict[str, float] = {"n_slices_scored": float(len(todo))}
    for k, v in scored.items():
        volume_scores[f"{k}_mean"] = float(v.mean()) if v.size else float("nan")
    volume_scores["elbo_max"] = float(scored["elbo"].max()) if len(todo) else float("nan")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return LocalizationResult(
        maps=volume_maps,
        foreground=fill_object(ms.foreground_mask, geom.file_axis),
        slice_scores=slice_scores,
        volume_scores=volume_scores,
        axis=axis_name,
        slice_axis=geom.file_axis,
        model_name=card.name,
        device=str(dev),
        seconds=time.perf_counter() - t0,
        notes=notes,
    )
