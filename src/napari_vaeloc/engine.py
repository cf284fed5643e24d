"""Run a VAE over a whole volume: device choice, batching, progress, cancel.

:func:`localize` is the expensive step; it returns a :class:`LocalizationResult` whose component
maps lie on the scan's own voxel grid, so that combining and thresholding
(:class:`~napari_vaeloc.combine.PostProcessor`) can be re-run cheaply.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import Cancelled, InputError
from .io import Volume, available_memory_bytes
from .mapnames import (
    AXES,
    DEFAULT_MAPS,
    OUTPUT_MAPS,
    RESTORATION_MAPS,
    SLICE_SCORES,
    SMOOTHGRAD_MAPS,
    check_names,
)
from .models.card import ModelCard
from .models.store import LoadedModel, bundled_models, cached_model
from .prepare import PrepareSettings
from .preprocess import resolve_axis, slices_to_volume, volume_to_slices

if TYPE_CHECKING:
    from .prepare import PreparationReport, Prepared

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


@dataclass(frozen=True)
class EngineOptions:
    """How the engine runs, the same for every front.

    Attributes:
        device: "auto" (cuda > mps > cpu), or an explicit "cpu", "cuda", "cuda:N", "mps".
        batch_size: slices per forward/backward pass; the last, smaller batch is scored too.
        amp: mixed precision (None: on for CUDA only).
        progress: called with (slices done, slices total) after each batch.
        cancel: polled before each batch; when it returns True, :class:`Cancelled` is raised.
        max_bytes: refuse volumes whose maps need more memory (None: half of what is free).
        stage: called with the name of each stage as it starts (preparation's steps, then
            "scoring slices"), for progress displays.
    """

    device: str = "auto"
    batch_size: int = 64
    amp: bool | None = None
    progress: ProgressCallback | None = None
    cancel: CancelFlag | None = None
    max_bytes: int | None = None
    stage: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        if int(self.batch_size) < 1:
            raise InputError(f"batch size must be at least 1, not {self.batch_size}")

    def replace(self, **changes) -> EngineOptions:
        return dataclasses.replace(self, **changes)

    def cancelled(self) -> bool:
        return self.cancel is not None and bool(self.cancel())


@dataclass
class LocalizationResult:
    """Component maps and scores of one volume, with the volume and the model card they came
    from (so that post-processing and writing need nothing else).

    Attributes:
        volume: the scan that was scored.
        card: the card of the model that scored it (for a fused run, the main model's).
        maps: name -> float32 (X, Y, Z) on the scan's voxel grid, for each map asked for
            (default :func:`maps_for` the model).
            ``reconstruction`` is in the scan's intensity units; the others in model units
            (nats per pixel for rec_error, nats per z-unit for the gradients).
        foreground: bool (X, Y, Z), the object: the voxels the normalisation counted as
            foreground, with enclosed holes (dark lesion cores, ventricles) filled.
        slice_scores: name -> (n,) float32 per slice along the file's axis ``slice_axis``
            (index i = file slice i); NaN for slices without foreground, which are not scored.
        volume_scores: aggregates over scored slices (means, and the worst slice's ELBO).
        axis: anatomical slicing axis; slice_axis: the file's voxel axis it runs along (with
            preparation: the template's, whose slices were scored).
        prepared: the preparation (steps and checks in ``prepared.report``, the brain mask and
            the bias-corrected brain on the scan's grid); None: the scan was scored as given.
    """

    volume: Volume
    card: ModelCard
    maps: dict[str, np.ndarray]
    foreground: np.ndarray
    slice_scores: dict[str, np.ndarray]
    volume_scores: dict[str, float]
    axis: str
    slice_axis: int
    device: str
    seconds: float
    notes: list[str] = field(default_factory=list)
    prepared: Prepared | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.foreground.shape

    @property
    def model_name(self) -> str:
        return self.card.name

    @property
    def preparation(self) -> PreparationReport | None:
        """What preparation did and found (None: the scan was scored as given)."""
        return self.prepared.report if self.prepared is not None else None


def estimate_bytes(shape: tuple[int, ...], n_maps: int = len(DEFAULT_MAPS)) -> int:
    """Peak bytes the result maps of a volume of ``shape`` need (float32 maps + working copies)."""
    return int(np.prod(shape)) * 4 * (n_maps + 4)


def maps_for(card, weights: Iterable[str] = ()) -> tuple[str, ...]:
    """The maps a localization computes by default: ``DEFAULT_MAPS``, plus any map the model's
    default combination (``card.defaults.weights``) or ``weights`` (names) need beyond them
    (e.g. ``restoration``, which costs extra gradient passes and is otherwise left out)."""
    extra = [*(card.defaults.weights or {}), *weights]
    return DEFAULT_MAPS + tuple(k for k in dict.fromkeys(extra) if k not in DEFAULT_MAPS)


def localize(
    volume: Volume,
    model: LoadedModel,
    options: EngineOptions | None = None,
    *,
    axis: str | None = None,
    maps: tuple[str, ...] | None = None,
    fuse: bool | None = None,
    prepare: PrepareSettings | str | None = "auto",
) -> LocalizationResult:
    """Score every slice of ``volume`` with ``model`` and map the results back to its grid;
    with companion models for the other slicing axes, average their maps in.

    ``prepare``: a preparation mode ("auto", the default as in every front; "full"; "none") or
    :class:`PrepareSettings`; None or "none" scores the scan as given (for scans already in the
    model's space, e.g. the benchmarks). With preparation the scan is bias-corrected,
    skull-stripped and registered to the model's template (:mod:`napari_vaeloc.prepare`,
    cached per scan), scored there, and every map, the foreground and the scores' report come
    back on the scan's own grid (0 outside the extracted brain); ``result.preparation`` holds
    the steps and the input-fit checks. A model without a template is scored as given in
    "auto" mode (with a note) and refused in "full" mode.

    ``fuse``: True averages in the companions the card names (``defaults.fuse_with``: models
    of the same kind trained on other slicing axes; bundled names, or folders relative to the
    model's) and fails without any; False scores along one axis; None follows the card
    (``defaults.fuse``, default true when companions are named). Fusion is skipped when
    ``axis`` asks for another axis than the model's. Each companion's maps are divided by its
    own calibrated scale and multiplied by the model's, so the average stays in the model's
    units; the reconstruction and the slice scores are the model's own. Other arguments:
    :func:`localize_axis`.

    Raises:
        InputError: unknown maps, no companions for ``fuse=True``, too little memory.
        Cancelled: ``options.cancel`` returned True.
    """
    opts = options or EngineOptions()
    settings = PrepareSettings(prepare) if isinstance(prepare, str) else prepare
    if settings is not None and settings.enabled:
        return _localize_prepared(volume, model, opts, settings, axis=axis, maps=maps, fuse=fuse)
    defaults = model.card.defaults
    names = list(defaults.fuse_with or [])
    if fuse and not names:
        raise InputError(f"model {model.card.name!r} has no companion models to fuse with")
    use = (defaults.fuse is not False) if fuse is None else fuse
    if not use or (axis is not None and axis.lower() != model.card.axis):
        names = []
    if not names:
        return localize_axis(volume, model, opts, axis=axis, maps=maps)
    models = [model, *(_companion(model, n) for n in names)]
    runs = len(models)

    progress = opts.progress

    def part(i: int) -> EngineOptions:
        if progress is None:
            return opts
        return opts.replace(
            progress=lambda done, total: progress(
                i * 1000 + (1000 * done) // max(total, 1), 1000 * runs
            )
        )

    t0 = time.perf_counter()
    wanted = maps_for(model.card) if maps is None else tuple(maps)
    res = localize_axis(volume, model, part(0), maps=wanted)
    fused = [k for k in wanted if k != "reconstruction"]
    own = _scales(model)
    for i, other in enumerate(models[1:], start=1):
        r = localize_axis(volume, other, part(i), maps=tuple(fused))
        theirs = _scales(other)
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


def _localize_prepared(
    volume: Volume,
    model: LoadedModel,
    opts: EngineOptions,
    settings: PrepareSettings,
    **kwargs,
) -> LocalizationResult:
    """Prepare (cached), score in the template's space, and map the result back."""
    from .prepare import model_template, prepare_cached, too_thin

    t0 = time.perf_counter()
    template = model_template(model.path, model.card)
    if template is None or too_thin(volume.shape):
        why = (
            f"model {model.card.name!r} ships no template to register scans to"
            if template is None
            else f"a {'x'.join(map(str, volume.shape))} image is too thin to prepare in 3D"
        )
        if settings.mode == "full":
            raise InputError(f"{why}; it can only be scored as given, without preparation")
        res = localize(volume, model, opts, prepare=None, **kwargs)
        res.notes.append(f"{why}: it was scored as given")
        return res
    prepared = prepare_cached(volume, template, settings, stage=opts.stage, cancel=opts.cancel)
    res = localize(prepared.volume, model, opts, prepare=None, **kwargs)
    if opts.stage is not None:
        opts.stage("mapping back to the scan")
    maps = {}
    for k in list(res.maps):
        maps[k] = prepared.to_scan(res.maps.pop(k), "map")
    foreground = prepared.to_scan(res.foreground, "mask") & prepared.brain_mask
    notes = [*volume.notes, *res.notes]  # the checks' warnings stay in the report
    return LocalizationResult(
        volume=volume,
        card=res.card,
        maps=maps,
        foreground=foreground,
        slice_scores=res.slice_scores,
        volume_scores=res.volume_scores,
        axis=res.axis,
        slice_axis=res.slice_axis,
        device=res.device,
        seconds=time.perf_counter() - t0,
        notes=notes,
        prepared=prepared,
    )


def _scales(model: LoadedModel) -> dict[str, float]:
    return model.card.calibration.scales if model.card.calibration is not None else {}


def _companion(model: LoadedModel, name: str) -> LoadedModel:
    if name not in bundled_models() and model.path is not None:
        local = Path(model.path).parent / name
        if local.is_dir():
            return cached_model(local)
    return cached_model(name)


def localize_axis(
    volume: Volume,
    model: LoadedModel,
    options: EngineOptions | None = None,
    *,
    axis: str | None = None,
    maps: tuple[str, ...] | None = None,
) -> LocalizationResult:
    """Score every slice of ``volume`` with ``model`` along one axis and map the results back
    to its grid.

    Args:
        options: device, batch size, precision, progress, cancel, memory budget
            (:class:`EngineOptions`).
        axis: "axial", "coronal" or "sagittal" (default: the model's training axis). A scan with
            one slice (a 2D image) is scored along its single-slice axis whatever is asked.
        maps: which of ``OUTPUT_MAPS`` to map back to the volume (default: :func:`maps_for`
            the model: all but the SmoothGrad and restoration maps, which cost extra gradient
            passes, unless its default combination uses them); fewer maps need less memory and
            time.

    Raises:
        InputError: unknown maps, or too little memory for the maps.
        Cancelled: ``options.cancel`` returned True.
    """
    import torch

    from .scoring import gaussian_kernel, score_batch

    t0 = time.perf_counter()
    card = model.card
    notes = list(volume.notes)
    wanted = maps_for(card) if maps is None else tuple(maps)
    check_names(wanted, OUTPUT_MAPS, "maps")
    opts = options or EngineOptions()
    progress = opts.progress
    need = estimate_bytes(volume.shape, len(wanted))
    limit = available_memory_bytes() // 2 if opts.max_bytes is None else opts.max_bytes
    if need > limit:
        raise InputError(
            f"scoring a {'x'.join(map(str, volume.shape))} volume needs about "
            f"{need / 2**30:.1f} GiB "
            f"for its maps, more than the {limit / 2**30:.1f} GiB available; crop or downsample it"
        )
    axis_name = (axis or card.axis).lower()
    ax = resolve_axis(axis_name)
    dev = torch.device(resolve_device(opts.device))
    use_amp = (dev.type == "cuda") if opts.amp is None else bool(opts.amp)
    batch_size = int(opts.batch_size)
    network = model.network
    network.to(dev)

    # a single-slice scan can only be scored along its flat axis
    from .preprocess import fill_object, make_geometry, outlier_note, with_neighbours

    geom0 = make_geometry(volume.shape, volume.affine, volume.spacing, ax, card.image_size)
    if 1 in geom0.canon_shape and geom0.canon_shape[ax] != 1:
        ax = geom0.canon_shape.index(1)
        new_name = next(k for k, v in AXES.items() if v == ax)
        notes.append(f"single-slice image: scored as one {new_name} slice instead of {axis_name}")
        axis_name = new_name

    ms = volume_to_slices(
        volume.data, volume.affine, volume.spacing, ax, card.image_size, card.normalisation
    )
    if ms.n_outliers:
        notes.append(outlier_note(ms.n_outliers))
    geom = ms.geometry
    n = geom.n_slices
    images = with_neighbours(ms.images, card.preprocessing.neighbours)
    todo = np.flatnonzero(ms.foreground)
    s = card.image_size
    model_maps = {k: torch.zeros((n, s, s), dtype=torch.float32) for k in wanted}
    if "reconstruction" in model_maps:
        model_maps["reconstruction"].fill_(ms.pad_value)
    scores = {k: np.full(n, np.nan, dtype=np.float32) for k in SLICE_SCORES}
    kl_scale = float(card.calibration.kl_grad_scale) if card.calibration is not None else 1.0
    kernel = gaussian_kernel().to(dev)
    smoothgrad = any(k in SMOOTHGRAD_MAPS for k in wanted)
    restoration = any(k in RESTORATION_MAPS for k in wanted)
    done = 0
    if opts.stage is not None:
        opts.stage("scoring slices")
    if progress:
        progress(0, len(todo))
    for start in range(0, len(todo), batch_size):
        if opts.cancelled():
            raise Cancelled("localization cancelled")
        idx = todo[start : start + batch_size]
        x = images[idx].to(dev)
        out = score_batch(
            network, x, card.likelihood_log_std, kernel, kl_scale, use_amp, smoothgrad, restoration
        )
        tidx = torch.from_numpy(idx)
        for k in wanted:
            model_maps[k][tidx] = out[k].cpu()
        for k in SLICE_SCORES:
            scores[k][idx] = out[k].cpu().numpy()
        done += len(idx)
        if progress:
            progress(done, len(todo))
    if opts.cancelled():
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
        volume=volume,
        card=card,
        maps=volume_maps,
        foreground=fill_object(ms.foreground_mask, geom.file_axis),
        slice_scores=slice_scores,
        volume_scores=volume_scores,
        axis=axis_name,
        slice_axis=geom.file_axis,
        device=str(dev),
        seconds=time.perf_counter() - t0,
        notes=notes,
    )
