"""Run a VAE over a whole volume: device choice, batching, progress, cancel.

:func:`localize` is the expensive step; it returns a :class:`LocalizationResult` whose component
maps lie on the scan's own voxel grid, so that combining and thresholding
(:class:`~napari_vaeloc.combine.PostProcessor`) can be re-run cheaply.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import Cancelled, InputError
from .io import Volume, available_memory_bytes
from .mapnames import (
    AXES,
    COMBINABLE_MAPS,
    DEFAULT_MAPS,
    MAP_DTYPES,
    OUTPUT_MAPS,
    RESTORATION_MAPS,
    SLICE_SCORES,
    SMOOTHGRAD_MAPS,
    check_names,
)
from .mapset import MapSet
from .models.card import ModelCard
from .models.store import LoadedModel, bundled_models, cached_model
from .prepare import PrepareSettings
from .preprocess import resolve_axis

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


#: The precisions :class:`EngineOptions` can return maps in.
#: Working memory of a run beyond its maps, bytes per voxel of the volume: the foreground mask
#: and its filled copy, the hole filling's labels, a clipped copy of a scan with outliers
#: (the slices themselves are prepared and mapped back in chunks of
#: ``preprocess.CHUNK_VOXELS`` voxels).
WORKING_BYTES_PER_VOXEL = 8


#: Full-size maps a front holds at once when the engine defers them: the writer
#: (:func:`napari_vaeloc.export.write_result`) holds the map its combination weights, or the
#: maps it compresses side by side (:data:`napari_vaeloc.export.STREAM_WORKERS`).
DEFERRED_MAPS_HELD = 3


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
        map_dtype: "float32" (default) or "float16": the precision the maps are returned in
            (float16 halves their memory; relative rounding 2**-11, ample for display and
            thresholding, values beyond 65504 become inf). Everything is computed in float32.
        defer_maps: return the maps deferred (:class:`~napari_vaeloc.mapset.MapSet`): each is
            kept as its model-space stack and mapped back onto the scan's grid when first
            used, so a front that writes them one by one or shows only some holds only those
            at full size. The values are the same either way.
    """

    device: str = "auto"
    batch_size: int = 64
    amp: bool | None = None
    progress: ProgressCallback | None = None
    cancel: CancelFlag | None = None
    max_bytes: int | None = None
    stage: Callable[[str], None] | None = None
    map_dtype: str = "float32"
    defer_maps: bool = False

    def __post_init__(self) -> None:
        if int(self.batch_size) < 1:
            raise InputError(f"batch size must be at least 1, not {self.batch_size}")
        if str(self.map_dtype) not in MAP_DTYPES:
            raise InputError(
                f"map precision must be one of {', '.join(MAP_DTYPES)}, not {self.map_dtype!r}"
            )

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
        maps: name -> float32 (X, Y, Z) on the scan's voxel grid (float16 with
            ``EngineOptions(map_dtype="float16")``), for each map asked for (default
            :func:`maps_for` the model); a :class:`~napari_vaeloc.mapset.MapSet` (a dict given
            is wrapped in one), whose maps are mapped back on first use with
            ``EngineOptions(defer_maps=True)``.
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
        fused_axes: the slicing axes whose models' maps were averaged (the model's first);
            empty when one axis was scored.
        missing_ml: volume (ml) of the extracted brain (unprepared: the foreground) that the
            file held no number for, left out of every map and the mask; 0.0 without a gap.
    """

    volume: Volume
    card: ModelCard
    maps: MapSet
    foreground: np.ndarray
    slice_scores: dict[str, np.ndarray]
    volume_scores: dict[str, float]
    axis: str
    slice_axis: int
    device: str
    seconds: float
    notes: list[str] = field(default_factory=list)
    prepared: Prepared | None = None
    fused_axes: tuple[str, ...] = ()
    missing_ml: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.maps, MapSet):  # a plain dict of arrays: every map held
            self.maps = MapSet(self.maps)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.foreground.shape

    @property
    def model_name(self) -> str:
        return self.card.name

    @property
    def slices(self) -> str:
        """What was scored, for the fronts: "axial slices", or with fusion "axial, coronal and
        sagittal slices fused"."""
        if not self.fused_axes:
            return f"{self.axis} slices"
        *first, last = self.fused_axes
        return f"{', '.join(first)} and {last} slices fused"

    @property
    def preparation(self) -> PreparationReport | None:
        """What preparation did and found (None: the scan was scored as given)."""
        return self.prepared.report if self.prepared is not None else None


def estimate_bytes(
    shape: tuple[int, ...], n_maps: int = len(DEFAULT_MAPS), map_bytes: int = 4
) -> int:
    """Peak host bytes a localization of a volume of ``shape`` (voxels) needs beyond the loaded
    volume: ``n_maps`` maps of ``map_bytes`` bytes per voxel (4: float32, 2: float16), and the
    working memory (:data:`WORKING_BYTES_PER_VOXEL`, plus two chunks of slices)."""
    from .preprocess import CHUNK_VOXELS

    voxels = int(np.prod(shape))
    return voxels * (n_maps * map_bytes + WORKING_BYTES_PER_VOXEL) + 2 * 4 * CHUNK_VOXELS


def maps_for(card, weights: Iterable[str] = ()) -> tuple[str, ...]:
    """The maps a localization computes by default: ``DEFAULT_MAPS``, plus any map the model's
    default combination (``card.defaults.weights``) or ``weights`` (names) need beyond them
    (e.g. ``restoration``, which costs extra gradient passes and is otherwise left out)."""
    extra = [*(card.defaults.weights or {}), *weights]
    return DEFAULT_MAPS + tuple(k for k in dict.fromkeys(extra) if k not in DEFAULT_MAPS)


def warm_up(model: LoadedModel, device: str = "auto", batch_size: int = 64) -> float:
    """Score a small synthetic volume (a cylinder of noise, ``batch_size`` + 6 slices along the
    model's axis) with ``model`` and every map it computes by default, and keep nothing: the
    first real run then no longer pays torch's first-call costs (the convolution primitives of
    a full batch, the kernels' set-up, on CUDA the context), about a quarter of a 1 mm scan's
    first run on 2 CPU cores. For a front to call in the background before the user's first run.
    Returns the seconds it took.

    Raises:
        InputError: ``device`` is not available.
    """
    t0 = time.perf_counter()
    axis = AXES.get(model.card.axis, 2)
    shape = [40, 48, 40]
    shape[axis] = int(batch_size) + 6
    grid = np.meshgrid(*(np.linspace(-1, 1, k, dtype=np.float32) for k in shape), indexing="ij")
    inside = sum(g * g for i, g in enumerate(grid) if i != axis) < 0.8  # in every slice
    noise = np.random.default_rng(0).random(shape, dtype=np.float32)
    options = EngineOptions(device=device, batch_size=batch_size, defer_maps=True)
    res = _localize_axis(Volume.from_array(inside * (1 + noise)), model, options)  # no fusion
    for name in res.maps:
        res.maps.peek(name)
    return time.perf_counter() - t0


def localize(
    volume: Volume,
    model: LoadedModel,
    options: EngineOptions | None = None,
    *,
    axis: str | None = None,
    maps: tuple[str, ...] | None = None,
    fuse: bool | None = None,
    prepare: PrepareSettings | str | None = "auto",
    slab_plane: str | None = None,
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
    (``defaults.fuse``, default true when companions are named). Fusion is skipped, with a
    note, when ``axis`` asks for another axis than the model's (and refused when ``fuse`` is
    True); a card that fuses by default scored along one axis gets a note that its calibrated
    threshold and rates were measured fused. Each companion's maps are divided by its
    own calibrated scale and multiplied by the model's, so the average stays in the model's
    units; the reconstruction and the slice scores are the model's own. A companion that
    slices along the plane of the scan's thick slabs is left out, with a note
    (:func:`napari_vaeloc.prepare.slab_plane`: slices over 3 mm; ``slab_plane`` gives that
    plane for a ``volume`` resampled from the scan, None reads it from ``volume``): each of its
    slices would be an average of 4-6 mm of anatomy, thicker than any it learned, and on a
    real head in 4-6 mm coronal slices it alone raised the fused map into false parts of
    4.6-13 ml (docs/results.md). Other arguments: :func:`localize_axis`.

    Raises:
        InputError: unknown maps, no companions for ``fuse=True``, too little memory.
        Cancelled: ``options.cancel`` returned True.
    """
    opts = options or EngineOptions()
    settings = PrepareSettings(prepare) if isinstance(prepare, str) else prepare
    wanted = maps_for(model.card) if maps is None else tuple(maps)
    fused = [k for k in wanted if k != "reconstruction"]
    from .prepare import slab_plane as thick_plane

    plane = slab_plane or thick_plane(volume)
    # refused before any work
    companions = _fusion_companions(model, fuse, axis, fused, volume.shape)
    if settings is not None and settings.enabled:
        res = _localize_prepared(
            volume, model, opts, settings, axis=axis, maps=maps, fuse=fuse, slab_plane=plane
        )
        return _leave_out_missing(res, volume)
    companions, left_out = _outside_slabs(companions, plane)
    off_grid = _off_grid_note(volume, model)
    if not companions:
        res = localize_axis(volume, model, opts, axis=axis, maps=maps)
        res.notes.extend([*_one_axis_note(model, res.axis, _single_slice(volume.shape)),
                          *left_out, *off_grid])  # fmt: skip
        return _leave_out_missing(res, volume)
    models = [model, *companions]
    runs = len(models)
    # the sum is kept in float32 and held (the companions are added into it); the maps come
    # back in the precision asked for
    acc = opts.replace(map_dtype="float32", defer_maps=False)
    progress = opts.progress

    part = _fused_progress(volume, models, acc, progress)

    t0 = time.perf_counter()
    own = _scales(model)
    res = localize_axis(volume, model, part(0), maps=wanted)
    for i, other in enumerate(models[1:], start=1):
        theirs = _scales(other)
        ratios = {k: own.get(k, 1.0) / theirs.get(k, 1.0) if theirs.get(k) else 1.0 for k in fused}
        # each companion's maps are added into the model's chunk by chunk: no second set of
        # full-size maps
        _localize_axis(
            volume, other, part(i), maps=tuple(fused), add_to=res.maps, ratios=ratios,
            excess_of=model,
        )  # fmt: skip
    for k in fused:
        res.maps[k] /= np.float32(runs)
    dtype = np.dtype(opts.map_dtype)
    if dtype != np.float32:
        for k in list(res.maps):
            res.maps[k] = res.maps.pop(k).astype(dtype)
    res.fused_axes = tuple(m.card.axis for m in models)
    res.notes.append(
        "maps averaged over the " + ", ".join(res.fused_axes) + " models ("
        + ", ".join(m.card.name for m in models) + "), each on its calibrated scale"
    )  # fmt: skip
    res.notes.extend([*left_out, *off_grid])
    res.seconds = time.perf_counter() - t0
    return _leave_out_missing(res, volume)


#: the words of the note on voxels without data inside the brain (the panel shows it as a
#: warning), and the least volume (ml) it is given for: a NaN background export leaves a few
#: such voxels on the extracted brain's edge
MISSING_NOTE = "has no data in the file"
MISSING_NOTE_ML = 0.1


def _leave_out_missing(res: LocalizationResult, volume: Volume) -> LocalizationResult:
    """``res`` with the voxels the file held no number for (``volume.missing``: NaN or
    infinite, read as the smallest finite value) taken out of its foreground, so that the
    combined map and the mask leave them out (:mod:`napari_vaeloc.combine`, step 4), with a
    note giving their volume inside the foreground from :data:`MISSING_NOTE_ML` on."""
    missing = volume.missing
    fg = res.foreground
    if missing is None or fg is None or missing.shape != fg.shape:
        return res
    if np.any(fg & missing):
        res.foreground = fg & ~missing
    # counted in the brain as extracted (a prepared scan's brain mask leaves them out already)
    region = res.prepared.extracted_mask if res.prepared is not None else fg
    ml = int(np.count_nonzero(region & missing)) * float(np.prod(volume.spacing)) / 1000.0
    res.missing_ml = ml
    if ml >= MISSING_NOTE_ML:  # a few voxels on the brain's edge need no word
        where = "extracted brain" if res.prepared is not None else "scan's foreground"
        res.notes.append(
            f"{ml:.3g} ml of the {where} {MISSING_NOTE} (NaN or infinite values): "
            "left out of the anomaly map and the mask, so a lesion there cannot be found"
        )
    return res


def _fused_progress(
    volume: Volume,
    models: Sequence[LoadedModel],
    options: EngineOptions,
    progress: ProgressCallback | None,
) -> Callable[[int], EngineOptions]:
    """The options of each axis's run in a fused localization, reporting slices done out of
    every axis's slices: the total is fixed from the start, and the empty slices an axis skips
    count as done when that axis finishes, so the count only rises and ends at the total. Only
    the first axis's run names the "scoring slices" stage."""
    # one "scoring slices" stage: the companions' runs do not announce it again
    quiet = options.replace(stage=None)
    if progress is None:
        return lambda i: quiet if i else options
    from .preprocess import make_geometry

    extent = [
        make_geometry(
            volume.shape, volume.affine, volume.spacing, resolve_axis(m.card.axis),
            m.card.image_size,
        ).n_slices
        for m in models
    ]  # fmt: skip
    whole = sum(extent)

    def part(i: int) -> EngineOptions:
        before = sum(extent[:i])

        def report(done: int, total: int) -> None:
            progress(before + (extent[i] if done >= total else done), whole)

        return (quiet if i else options).replace(progress=report)

    return part


def _localize_prepared(
    volume: Volume,
    model: LoadedModel,
    opts: EngineOptions,
    settings: PrepareSettings,
    **kwargs,
) -> LocalizationResult:
    """Prepare (cached), score in the template's space, and map the result back."""
    from .prepare import model_template, prepare_cached, too_thin, too_thin_reason

    t0 = time.perf_counter()
    template = model_template(model.path, model.card)
    if template is None or too_thin(volume.shape):
        why = (
            f"model {model.card.name!r} ships no template to register scans to"
            if template is None
            else too_thin_reason(volume.shape)
        )
        if settings.mode == "full":
            raise InputError(f"{why}; it can only be scored as given, without preparation")
        res = localize(volume, model, opts, prepare=None, **kwargs)
        res.notes.append(f"{why}: {UNPREPARED_NOTE}")
        return res
    prepared = prepare_cached(
        volume, template, settings, stage=opts.stage, cancel=opts.cancel,
        device=resolve_device(opts.device),
    )  # fmt: skip
    res = localize(prepared.volume, model, opts, prepare=None, **kwargs)
    if opts.stage is not None:
        opts.stage("mapping back to the scan")
    maps = MapSet()
    dtype = np.dtype(opts.map_dtype)  # on the scan's grid in the precision asked for, too
    for k in list(res.maps):
        if opts.defer_maps or res.maps.is_deferred(k):  # onto the scan's grid when first used
            make = functools.partial(_to_scan, prepared, res.maps, k, dtype)
            maps.defer(k, make, volume.shape, dtype, region=make)  # make(index): a part alone
        else:
            maps[k] = _to_scan(prepared, res.maps, k, dtype, pop=True, cancel=opts.cancel)
    foreground = prepared.to_scan(res.foreground, "mask", cancel=opts.cancel)
    foreground &= prepared.brain_mask
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
        fused_axes=res.fused_axes,
    )


#: ends the notes of a result scored with fewer slicing axes than its card's rates were
#: measured with (fusion off, a single slice, a companion left out for thick slices)
APPROXIMATE_NOTE = "so here they hold only approximately"
#: what a front adds to a calibrated rate it states for such a result
APPROXIMATE_RATES = "these rates were measured with every slicing axis fused, see the note"

#: ends the note of a result scored as given where preparation was wanted: "auto" preparation
#: with a model without a template or an image too thin to register, or preparation turned
#: off for a scan that is not on the model's template grid
UNPREPARED_NOTE = "it was scored as given"


def _off_grid_note(volume: Volume, model: LoadedModel) -> list[str]:
    """The note for a scan scored without preparation although its model ships a template and
    the scan is not on that template's grid (empty otherwise, and for an image too thin to
    register): only a skull-stripped brain already in the model's space suits that, and a raw
    head scored so gets a mask on healthy tissue."""
    from .prepare import model_template, too_thin

    template = model_template(model.path, model.card)
    if template is None or too_thin(volume.shape) or template.holds(volume):
        return []
    shape = "x".join(map(str, volume.shape))
    return [
        f"preparation is off and the scan ({shape}) is not on the grid of the template of "
        f"{model.card.name!r}: it is taken for a skull-stripped brain already in the model's "
        "space. A head with skull, or a scan in its own position, needs preparation; "
        f"{UNPREPARED_NOTE}"
    ]


_NETWORK_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def _network_lock(network: object) -> threading.Lock:
    """The lock a run holds while it moves ``network`` to its device and scores with it."""
    with _LOCKS_LOCK:
        lock = _NETWORK_LOCKS.get(network)
        if lock is None:
            lock = _NETWORK_LOCKS[network] = threading.Lock()
        return lock


def _to_scan(
    prepared: Prepared,
    maps: MapSet,
    name: str,
    dtype: np.dtype,
    index: tuple[slice, ...] | None = None,
    pop: bool = False,
    cancel: CancelFlag | None = None,
) -> np.ndarray:
    """A map of the template's grid (made first when deferred, and let go; taken out of
    ``maps`` with ``pop``) put onto the scan's grid, as ``dtype``: the whole grid, or only its
    voxels ``index`` (one slice per axis, :meth:`Prepared.to_scan`); ``cancel`` polled
    between its slabs."""
    values = maps.pop(name) if pop else maps.peek(name)
    return prepared.to_scan(values, "map", index, dtype=dtype, cancel=cancel)


def _add_excess(restoration, volume: Volume, model: LoadedModel, ms, todo, kernel) -> None:
    """Add to the restoration map of the scored slices ``todo`` (model space, (N, S, S)) how far
    each voxel's intensity lies outside the model's healthy range
    (:func:`~napari_vaeloc.preprocess.excess_slices`, smoothed with the maps' ``kernel``): the
    contrast of a lesion brighter than the brightest (or darker than the darkest) healthy
    tissue, which the input's clip hides from the network. The range is the model template's
    (:meth:`~napari_vaeloc.prepare.Template.healthy_range`); a model without a template gets
    nothing added. Only for a card with ``preprocessing.intensity_excess``."""
    import torch

    from .prepare import model_template
    from .preprocess import as_device_volume, excess_slices
    from .scoring import smooth

    template = model_template(model.path, model.card)
    if template is None:
        return
    bounds = template.healthy_range(model.card.normalisation)
    dev = restoration.device
    data = as_device_volume(volume.data, dev)
    inside = torch.from_numpy(ms.foreground_mask.view(np.uint8)).to(dev)
    excess = excess_slices(data, inside, ms.geometry, ms.stats, bounds)
    restoration[todo] += smooth(excess[todo], kernel)[:, 0]


def _scales(model: LoadedModel) -> dict[str, float]:
    return model.card.calibration.scales if model.card.calibration is not None else {}


def _single_slice(shape: tuple[int, ...]) -> bool:
    """Whether an image of ``shape`` is one slice (2D, or one voxel thick along an axis)."""
    return len(shape) < 3 or 1 in shape[:3]


def _one_axis_note(model: LoadedModel, axis: str, single: bool = False) -> list[str]:
    """A note for a model whose card fuses its slicing axes by default, scored along one axis
    (fusion turned off, another axis asked for, or a ``single`` slice): its threshold and
    claimed rates were measured on the fused map."""
    d = model.card.defaults
    if not d.fuses:
        return []
    how = (
        f"this single {axis} slice with its {model.card.axis} network alone, which learned "
        f"{model.card.axis} slices (a single slice cannot be fused with the other axes' "
        "models)"
        if single and axis != model.card.axis
        else f"this single slice with its {model.card.axis} network alone (a single slice "
        "cannot be fused with the other axes' models)"
        if single
        else f"along its own {axis} axis alone (fusion off)"
        if axis == model.card.axis
        else f"along the {axis} axis by its {model.card.axis} network alone, which learned "
        f"{model.card.axis} slices (fusion needs the model's own axis)"
    )
    return [
        f"{model.card.name} scored {how}: its threshold and the healthy rates it claims were "
        f"measured with its slicing axes fused, {APPROXIMATE_NOTE}"
    ]


def _fusion_companions(
    model: LoadedModel,
    fuse: bool | None,
    axis: str | None,
    maps: Sequence[str],
    shape: tuple[int, ...] = (),
) -> list[LoadedModel]:
    """The companion models :func:`localize` averages in (empty: one axis), each checked by
    :func:`_check_companion` for ``maps``. A single-slice image of ``shape`` (a 2D image, or
    a volume one voxel thick) is scored along its own plane alone: the other axes' models
    would see slices one voxel wide.

    Raises:
        InputError: ``fuse`` is True and the card names no companions, ``axis`` is not the
            model's or the image is a single slice, or a companion cannot be fused for ``maps``.
    """
    defaults = model.card.defaults
    names = list(defaults.fuse_with or [])
    if fuse and not names:
        raise InputError(f"model {model.card.name!r} has no companion models to fuse with")
    single = bool(shape) and _single_slice(shape)
    if fuse and single:
        raise InputError(
            "a single-slice image is scored along its own plane alone: it cannot be fused "
            "with the other slicing axes' models; drop the fusion"
        )
    if single:
        return []
    use = defaults.fuses if fuse is None else fuse
    other_axis = axis is not None and axis.lower() != model.card.axis
    if fuse and other_axis:
        raise InputError(
            f"fusing averages {model.card.name!r}'s companions into its own "
            f"{model.card.axis} slices; it cannot fuse along the {axis.lower()} axis: drop "
            "the axis or the fusion"
        )
    if not use or other_axis:
        return []
    companions = [_companion(model, n) for n in names]
    for other in companions:
        _check_companion(model, other, maps)
    return companions


def _outside_slabs(
    companions: list[LoadedModel], plane: str | None
) -> tuple[list[LoadedModel], list[str]]:
    """``companions`` without the one that slices along ``plane`` (the plane of the scan's
    thick slabs, :func:`napari_vaeloc.prepare.slab_plane`; None keeps them all), and the note
    that says so (empty when none is left out)."""
    kept = [c for c in companions if plane is None or c.card.axis != plane]
    if len(kept) == len(companions):
        return companions, []
    names = ", ".join(c.card.name for c in companions if c not in kept)
    return kept, [
        f"{names} left out of the fusion: the scan's {plane} slices are thick, and each "
        f"{plane} slice would be an average of more anatomy than any it learned (such slices "
        "brought false parts on a real head); the threshold and the healthy rates were "
        f"measured with every axis fused, {APPROXIMATE_NOTE}"
    ]


def _check_companion(model: LoadedModel, other: LoadedModel, maps: Sequence[str]) -> None:
    """Refuse to fuse a map the companion cannot put on the model's scale: one the model has a
    calibrated scale for and the companion has not. (The healthy range's excess, where the
    model adds it to ``restoration``, is added to every companion's too, from the model's
    template.)

    Raises:
        InputError: naming the maps and the companion.
    """
    own, theirs = _scales(model), _scales(other)
    lacking = [k for k in maps if own.get(k) and not theirs.get(k)]
    if lacking:
        both = ", ".join(k for k in own if k in COMBINABLE_MAPS and theirs.get(k)) or "none"
        raise InputError(
            f"cannot fuse {', '.join(lacking)} with the companion {other.card.name!r}: it "
            f"was not calibrated for {'that map' if len(lacking) == 1 else 'those maps'} as "
            f"{model.card.name!r} was; score one axis (without fusing), or fuse maps both "
            f"know (--maps and --weights; both know {both})"
        )


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

    One device-resident pipeline (see docs/engine.md, "Data flow"): the outlier, foreground and
    z-score decisions are made once in numpy; the volume then goes to the device once (no copy
    on the CPU), where it is reoriented, normalised, resized and padded chunk by chunk of slices,
    scored batch by batch, and each map is resized back chunk by chunk straight into its own
    host array (float32, or float16 with ``EngineOptions(map_dtype="float16")``), its
    model-space stack freed as soon as it is mapped back.

    Args:
        options: device, batch size, precision, progress, cancel, memory budget, map precision
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
    return _localize_axis(volume, model, options, axis=axis, maps=maps)


def check_budget(
    shape: tuple[int, ...], names: tuple[str, ...], options: EngineOptions, model_name: str = ""
) -> int:
    """Refuse a run whose maps and working memory would not fit, before anything is computed.

    Returns the estimated peak bytes (:func:`estimate_bytes`); with deferred maps
    (``options.defer_maps``) at most :data:`DEFERRED_MAPS_HELD` of them count. The budget is
    ``options.max_bytes``, or half of the memory the system can still hand out.

    Raises:
        InputError: the estimate exceeds the budget; the message gives both in GiB, what the
            maps and the working memory take, and what to do (fewer maps, float16 maps, crop or
            downsample).
    """
    map_bytes = np.dtype(options.map_dtype).itemsize
    held = min(len(names), DEFERRED_MAPS_HELD) if options.defer_maps else len(names)
    need = estimate_bytes(shape, held, map_bytes)
    limit = available_memory_bytes() // 2 if options.max_bytes is None else options.max_bytes
    if need <= limit:
        return need
    voxels = int(np.prod(shape))
    maps_gib = voxels * map_bytes * held / 2**30
    where = "the budget given" if options.max_bytes is not None else "half of the free memory"
    advice = "ask for fewer maps"
    if map_bytes > 2:
        advice += ", keep them as float16"
    raise InputError(
        f"scoring a {'x'.join(map(str, shape))} volume"
        + (f" with {model_name}" if model_name else "")
        + f" needs about {need / 2**30:.1f} GiB ({held} "
        f"{np.dtype(options.map_dtype).name} maps: {maps_gib:.1f} GiB, working memory "
        f"{(need / 2**30 - maps_gib):.1f} GiB), more than the {limit / 2**30:.1f} GiB "
        f"available ({where}); {advice}, or crop or downsample the scan"
    )


def _localize_axis(
    volume: Volume,
    model: LoadedModel,
    options: EngineOptions | None = None,
    *,
    axis: str | None = None,
    maps: tuple[str, ...] | None = None,
    add_to: dict[str, np.ndarray] | None = None,
    ratios: dict[str, float] | None = None,
    excess_of: LoadedModel | None = None,
) -> LocalizationResult:
    """:func:`localize_axis`; with ``add_to``, each map (times ``ratios[name]``) is added into
    the given (X, Y, Z) array chunk by chunk instead of being kept (fusion), the result's
    ``maps`` is then empty and its foreground is not computed (``add_to`` 's owner has it).
    ``excess_of``: the model whose ``intensity_excess`` setting and template decide the healthy
    range's excess added to the restoration map (default: ``model``; a fused companion gets
    the main model's, so that every axis measures the same thing)."""
    import torch

    from .preprocess import (
        fill_object,
        make_geometry,
        outlier_note,
        slices_to_volume,
        volume_to_slices,
        with_neighbours,
    )
    from .scoring import gaussian_kernel, score_batch

    t0 = time.perf_counter()
    card = model.card
    notes = list(volume.notes)
    wanted = maps_for(card) if maps is None else tuple(maps)
    check_names(wanted, OUTPUT_MAPS, "maps")
    opts = options or EngineOptions()
    progress = opts.progress
    if add_to is None:
        check_budget(volume.shape, wanted, opts, card.name)
    axis_name = (axis or card.axis).lower()
    ax = resolve_axis(axis_name)
    dev = torch.device(resolve_device(opts.device))
    use_amp = (dev.type == "cuda") if opts.amp is None else bool(opts.amp)
    batch_size = int(opts.batch_size)
    network = model.network

    # a single-slice scan can only be scored along its flat axis
    geom0 = make_geometry(volume.shape, volume.affine, volume.spacing, ax, card.image_size)
    if 1 in geom0.canon_shape and geom0.canon_shape[ax] != 1:
        ax = geom0.canon_shape.index(1)
        new_name = next(k for k, v in AXES.items() if v == ax)
        notes.append(f"single-slice image: scored as one {new_name} slice instead of {axis_name}")
        axis_name = new_name

    ms = volume_to_slices(
        volume.data,
        volume.affine,
        volume.spacing,
        ax,
        card.image_size,
        card.normalisation,
        device=dev,
    )
    if ms.n_outliers:
        notes.append(outlier_note(ms.n_outliers))
    geom = ms.geometry
    n = geom.n_slices
    images = with_neighbours(ms.images, card.preprocessing.neighbours)
    ms.images = None  # the stacked images replace it (the same tensor without neighbours)
    todo = np.flatnonzero(ms.foreground)
    s = card.image_size
    model_maps = {k: torch.zeros((n, s, s), dtype=torch.float32, device=dev) for k in wanted}
    if "reconstruction" in model_maps:
        model_maps["reconstruction"].fill_(ms.pad_value)
    scores = {k: torch.full((n,), float("nan"), device=dev) for k in SLICE_SCORES}
    kl_scale = float(card.calibration.kl_grad_scale) if card.calibration is not None else 1.0
    kernel = gaussian_kernel().to(dev)
    smoothgrad = any(k in SMOOTHGRAD_MAPS for k in wanted)
    restoration = any(k in RESTORATION_MAPS for k in wanted)
    done = 0
    if opts.stage is not None:
        opts.stage("scoring slices")
    if progress:
        progress(0, len(todo))
    todo_dev = torch.from_numpy(todo).to(dev)
    # one run at a time per network: another thread's run (a front's warm-up, a threaded
    # Dask worker) may want it on another device
    with _network_lock(network):
        network.to(dev)
        for start in range(0, len(todo), batch_size):
            if opts.cancelled():
                raise Cancelled("localization cancelled")
            tidx = todo_dev[start : start + batch_size]
            out = score_batch(
                network,
                images[tidx],
                card.likelihood_log_std,
                kernel,
                kl_scale,
                use_amp,
                smoothgrad,
                restoration,
            )
            for k in wanted:
                model_maps[k][tidx] = out[k].float()
            for k in SLICE_SCORES:
                scores[k][tidx] = out[k].float()
            del out
            done += len(tidx)
            if progress:
                progress(done, len(todo))
    del images
    if opts.cancelled():
        raise Cancelled("localization cancelled")
    excess = model if excess_of is None else excess_of
    if (
        restoration
        and "restoration" in model_maps
        and len(todo)
        and excess.card.preprocessing.intensity_excess
    ):
        _add_excess(model_maps["restoration"], volume, excess, ms, todo_dev, kernel)

    # unscored slices are 0 in every map but the reconstruction: map back the scored span only
    span = (int(todo[0]), int(todo[-1]) + 1) if len(todo) else (0, 0)
    volume_maps = MapSet()
    for k in wanted:
        if opts.cancelled():
            raise Cancelled("localization cancelled")
        stack = model_maps.pop(k)  # freed once mapped back
        scale, offset, k_span = 1.0, 0.0, span
        if k == "reconstruction":
            scale, offset, k_span = ms.stats["std"], ms.stats["mean"], None
        if opts.defer_maps and add_to is None:
            volume_maps.defer(k, functools.partial(
                slices_to_volume, stack, geom, scale=scale, offset=offset,
                dtype=opts.map_dtype, span=k_span,
            ), geom.file_shape, opts.map_dtype)  # fmt: skip
        elif add_to is not None:
            ratio = (ratios or {}).get(k, 1.0)
            slices_to_volume(
                stack, geom, add_to[k], scale=ratio * scale, accumulate=True, span=k_span
            )
        else:
            volume_maps[k] = slices_to_volume(
                stack, geom, scale=scale, offset=offset, dtype=opts.map_dtype, span=k_span
            )
        del stack

    host_scores = {k: v.cpu().numpy() for k, v in scores.items()}
    order = geom.file_slice_order()
    slice_scores = {k: v[order] for k, v in host_scores.items()}
    scored = {k: v[todo] for k, v in host_scores.items()}
    volume_scores: dict[str, float] = {"n_slices_scored": float(len(todo))}
    for k, v in scored.items():
        volume_scores[f"{k}_mean"] = float(v.mean()) if v.size else float("nan")
    volume_scores["elbo_max"] = float(scored["elbo"].max()) if len(todo) else float("nan")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    fg_mask = ms.foreground_mask
    foreground = fill_object(fg_mask, geom.file_axis) if add_to is None else fg_mask
    return LocalizationResult(
        volume=volume,
        card=card,
        maps=volume_maps,
        foreground=foreground,
        slice_scores=slice_scores,
        volume_scores=volume_scores,
        axis=axis_name,
        slice_axis=geom.file_axis,
        device=str(dev),
        seconds=time.perf_counter() - t0,
        notes=notes,
    )
