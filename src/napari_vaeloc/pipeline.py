"""The whole pipeline of one scan, as every front that writes a scan's results runs it: load
the file, choose the model, prepare and score it, combine, write (:func:`localize_scan`).

``vaeloc localize`` runs it for one scan and ``vaeloc screen`` (:mod:`napari_vaeloc.cohort`)
for every scan of a cohort on Dask workers, so both give the same files and numbers. What
decides a scan's result is one picklable :class:`ScanSettings`. Nothing here parses options or
prints: lines meant for the user go to a ``log`` callback.

The heavy modules (the engine, torch, nibabel) are imported inside the functions, so that the
command line can import this module to parse its arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .combine import CombineSettings, PostProcessor
    from .engine import LocalizationResult
    from .io import Volume
    from .prepare import PrepareSettings

#: the model request that asks for the bundled model of the modality the scan looks like
AUTO_MODEL = "auto"


@dataclass(frozen=True)
class ScanSettings:
    """Everything that decides how one scan is scored, combined and written. Picklable, so
    that it can travel to a Dask worker. The command line makes it from its options
    (``napari_vaeloc.cli.localize.scan_settings``, which checks the values).

    Attributes:
        model: :data:`AUTO_MODEL`, a bundled model's name or a model folder.
        prepare: the preparation (mode and step switches).
        axis: anatomical slicing axis (None: the model's).
        fuse: average in the companion models (None: as the card says).
        volume_index: which volume of a 4D file (None: the file must be 3D).
        device: "auto", "cpu", "cuda", "cuda:N" or "mps".
        batch_size: slices per batch.
        preset: the combination to start from ("default" or "paper").
        threshold, weights, smoothing, scan_normalise: changes to that combination (None:
            keep the preset's); threshold in combined-map units, weights map name -> weight,
            smoothing sigma in mm.
        outline: False masks the voxels above the threshold only (no outlined parts, whatever
            the preset's grow level).
        maps: the maps to compute and write (None: the model's default maps,
            :func:`napari_vaeloc.engine.maps_for`); the maps the combination weights are
            always computed, and written, too.
        map_dtype: "float32" or "float16": the precision the maps are kept in while the scan
            is processed (float16 halves their memory; the files are float32 either way).
    """

    model: str
    prepare: PrepareSettings
    axis: str | None = None
    fuse: bool | None = None
    volume_index: int | None = None
    device: str = "auto"
    batch_size: int = 64
    preset: str = "default"
    threshold: float | None = None
    outline: bool = True
    weights: dict[str, float] | None = None
    smoothing: float | None = None
    scan_normalise: bool | None = None
    maps: tuple[str, ...] | None = None
    map_dtype: str = "float32"

    def wanted_maps(self, card: Any, combine: CombineSettings) -> tuple[str, ...]:
        """The maps to compute for a model with ``card`` under the combination ``combine``:
        :attr:`maps` (or the model's defaults) and those the combination weights."""
        from .engine import maps_for

        used = combine.used_weights()
        if self.maps is None:
            return maps_for(card, used)
        return tuple(dict.fromkeys([*self.maps, *used]))

    def combine_settings(self, card: Any) -> CombineSettings:
        """The combination these settings ask for with the model whose card is ``card``
        (:meth:`napari_vaeloc.combine.CombineSettings.preset`, then the changes). A smoothing
        keeps the preset's levels' healthy false-positive rates where the card has levels at
        that smoothing (:func:`napari_vaeloc.combine.at_smoothing`); a threshold given is
        kept as given."""
        from .combine import CombineSettings, at_smoothing

        changes = {"weights": self.weights, "scan_normalise": self.scan_normalise}
        changed = {k: v for k, v in changes.items() if v is not None}
        settings = CombineSettings.preset(self.preset, card).replace(**changed)
        if self.smoothing is not None:
            settings = at_smoothing(settings, card, self.smoothing)
        if self.threshold is not None:
            settings = settings.replace(threshold=self.threshold)
        return settings if self.outline else settings.without_outline()

    def result_key(self) -> dict[str, Any]:
        """The settings that change a scan's outputs, as plain JSON values (the device and the
        batch size are left out: they change how fast, not what)."""
        return {
            "model": self.model,
            "prepare": list(self.prepare.key()),
            "axis": self.axis,
            "fuse": self.fuse,
            "volume_index": self.volume_index,
            "preset": self.preset,
            "threshold": self.threshold,
            "weights": self.weights,
            "smoothing": self.smoothing,
            "scan_normalise": self.scan_normalise,
            # only when set: the records of runs that predate these options stay valid
            **({"maps": list(self.maps)} if self.maps is not None else {}),
            **({"outline": False} if not self.outline else {}),
        }


@dataclass
class ScanOutputs:
    """What :func:`localize_scan` made: the engine's result, the post-processing that was
    written, and the files (name -> path, as :func:`napari_vaeloc.export.write_result`
    returns them; ``paths["scores"]`` is the scores JSON)."""

    result: LocalizationResult
    post: PostProcessor
    paths: dict[str, Path]

    def mask_volume_ml(self) -> float:
        """The written mask's volume in ml: the scores JSON's ``mask_volume_ml``.

        Raises:
            OSError, ValueError: the scores file cannot be read.
        """
        import json

        return float(json.loads(self.paths["scores"].read_text())["mask_volume_ml"])

    def mask_components(self) -> int:
        """The written mask's connected parts (26-connected in 3D,
        :func:`napari_vaeloc.demo.count_parts`)."""
        from .demo import count_parts

        return count_parts(self.post.mask())


def model_for_scan(
    request: str,
    volume: Volume,
    settings: PrepareSettings,
    *,
    stage: Callable[[str], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> str:
    """The model that scores ``volume``: ``request`` itself (a bundled model's name or a model
    folder), or for :data:`AUTO_MODEL` the bundled main model of the modality the scan looks
    like (:func:`napari_vaeloc.models.choice.guess_modality`, then
    :func:`~napari_vaeloc.models.choice.choose_model`); then ``log`` gets one line that says
    which and why, e.g. "model: t1-brain (the scan looks like T1, r = 0.58)".

    The guess prepares the scan with ``settings`` (with "auto" when they turn preparation
    off), cached, so a run with the same settings does not prepare it again; ``stage`` gets
    the preparation's stage names. The messages name the ``--model`` and ``--prepare``
    options that every command scoring a scan has.

    Raises:
        InputError: ``request`` is auto and the scan is too thin to prepare or cannot be
            prepared, or no bundled model learned its modality.
        MisfitError: ``request`` is auto and no modality is recognised (with the
            preparation's report).
    """
    if request != AUTO_MODEL:
        return request
    from .errors import InputError, MisfitError
    from .models.choice import bundled_cards, choose_model, guess_modality
    from .prepare import PrepareSettings, too_thin, too_thin_reason

    name_one = "name a model with --model (see `vaeloc models`)"
    if too_thin(volume.shape):
        raise InputError(
            "--model auto prepares the scan to tell its modality, and "
            f"{too_thin_reason(volume.shape)}; {name_one}"
        )
    guess = guess_modality(volume, settings if settings.enabled else PrepareSettings(), stage=stage)
    # a header without orientation explains every misfit; a slab misleads every later check
    for name in ("orientation", "template scaling"):
        check = guess.report.check(name)
        if check is not None and check.level == "fail":
            raise MisfitError(f"--model auto: {check.advice}", guess.report)
    if guess.modality is None:
        raise MisfitError(
            f"--model auto: {guess.describe()}; is it a brain MRI of a modality the bundled "
            "models know (T1, T2)? A skull-stripped brain already in a model's template space "
            "can be scored as given: name the model with --model and pass --prepare none",
            guess.report,
        )
    name = choose_model(guess.modality, bundled_cards())
    if name is None:
        raise InputError(
            f"--model auto: the scan looks like {guess.modality} (r = {guess.r:.2f}), but no "
            f"bundled model learned {guess.modality} scans; {name_one}"
        )
    if log is not None and guess.weak:
        log(
            f"model: {name} (the scan looks only weakly like {guess.modality}, r = "
            f"{guess.r:.2f}: it may be another modality; read the result with care)"
        )
    elif log is not None:
        log(f"model: {name} (the scan looks like {guess.modality}, r = {guess.r:.2f})")
    return name


def localize_scan(
    scan: str | Path,
    settings: ScanSettings,
    out: Path,
    *,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    stage: Callable[[str], None] | None = None,
    log: Callable[[str], None] | None = None,
    max_bytes: int | None = None,
) -> ScanOutputs:
    """The whole pipeline of one scan: load the file (:func:`napari_vaeloc.io.load_volume`),
    choose the model (:func:`model_for_scan`), refuse existing outputs, prepare and score it
    (:func:`napari_vaeloc.engine.localize`), combine (:class:`~napari_vaeloc.combine.
    PostProcessor`), and write every map, the combined map, the mask (in the scan's geometry)
    and the scores JSON into ``out`` (:func:`napari_vaeloc.export.write_result`).

    Args:
        scan: the NIfTI file.
        settings: how it is scored, combined and written.
        out: the output folder (made if missing).
        overwrite: replace existing outputs instead of refusing.
        progress: ``progress(done, total)`` with the slices scored (None: silent).
        stage: ``stage(name)`` as each stage begins: the modality guess's, the engine's, and
            the writing's (None: silent).
        log: gets the lines meant for the user (with ``--model auto``, the model chosen and
            why); None: nothing is said.
        max_bytes: refuse a scan whose float32 copy, or whose maps, would need more memory
            (bytes; None: half of what the system has free).

    Raises:
        InputError: the file cannot be read or scored (corrupt, 4D without a volume index,
            too large), or does not fit the model (``MisfitError`` with the preparation's
            report).
        ModelError: the model cannot be loaded.
        OutputExistsError: some outputs exist and ``overwrite`` is false (nothing written).
        OutputError: the output folder cannot be written.
    """
    from .combine import PostProcessor
    from .engine import EngineOptions, localize
    from .export import planned_paths, write_result
    from .io import load_volume, refuse_existing, scan_stem
    from .models.store import cached_model

    volume = load_volume(scan, volume_index=settings.volume_index, max_bytes=max_bytes)
    model = cached_model(
        model_for_scan(settings.model, volume, settings.prepare, stage=stage, log=log)
    )
    combine = settings.combine_settings(model.card)
    maps = settings.wanted_maps(model.card, combine)  # the model's may add costly maps
    planned = planned_paths(Path(scan), out, maps=maps)
    refuse_existing(planned.values(), overwrite, "output file")
    engine = EngineOptions(
        device=settings.device,
        batch_size=settings.batch_size,
        progress=progress,
        stage=stage,
        max_bytes=max_bytes,
        map_dtype=settings.map_dtype,
        defer_maps=True,  # written one by one: only a few at full size at once
    )
    result = localize(
        volume,
        model,
        engine,
        axis=settings.axis,
        fuse=settings.fuse,
        prepare=settings.prepare,
        maps=maps,
    )
    post = PostProcessor(result, combine)
    if stage is not None:  # the maps are mapped back and compressed now, one by one
        stage("writing the maps and the mask")
    paths = write_result(result, post, out, stem=scan_stem(scan), overwrite=overwrite)
    return ScanOutputs(result, post, paths)
