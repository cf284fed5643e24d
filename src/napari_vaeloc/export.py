"""Writing a localization result: one NIfTI per map, the combined map, the mask (all in the
scan's own geometry) and a JSON of scores and settings."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict
from functools import partial
from pathlib import Path

from .combine import Combination, CombineSettings, PostProcessor
from .engine import LocalizationResult
from .io import Volume, WriteSet, check_output_folder, refuse_existing, scan_stem
from .mapnames import DEFAULT_MAPS, OUTPUT_MAPS

#: deferred maps (:class:`~napari_vaeloc.mapset.MapSet`) made and compressed side by side while
#: a result is written; each holds one full-size map until its file is written
STREAM_WORKERS = 2


def output_paths(out_dir: Path, stem: str, maps: Sequence[str] = DEFAULT_MAPS) -> dict[str, Path]:
    """Every file a result writes: one per map, the combined map, the mask, the scores."""
    paths = {k: out_dir / f"{stem}_{k}.nii.gz" for k in maps}
    paths["combined"] = out_dir / f"{stem}_combined.nii.gz"
    paths["mask"] = out_dir / f"{stem}_mask.nii.gz"
    paths["scores"] = out_dir / f"{stem}_scores.json"
    return paths


def planned_paths(
    volume_or_path: Volume | str | os.PathLike | None,
    out_dir: str | os.PathLike,
    stem: str | None = None,
    maps: Sequence[str] = DEFAULT_MAPS,
) -> dict[str, Path]:
    """The files :func:`write_result` will write for a scan (a :class:`Volume` or its file),
    known before it is scored, so that a front can check them first (with
    :func:`napari_vaeloc.io.check_output_folder` and :func:`napari_vaeloc.io.refuse_existing`)."""
    src = volume_or_path.path if isinstance(volume_or_path, Volume) else volume_or_path
    return output_paths(Path(out_dir), stem or scan_stem(src), maps)


def write_result(
    result: LocalizationResult,
    settings: CombineSettings | PostProcessor | None,
    out_dir: str | os.PathLike,
    stem: str | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write all maps, the combined map, the mask and the scores JSON into ``out_dir``.

    ``settings``: the combination to write (None: the model's defaults), or a
    :class:`PostProcessor` whose cached combination is written as it stands. Every target is
    checked before anything is written, and the files are staged in a hidden folder beside
    them and moved into place together (:class:`napari_vaeloc.io.WriteSet`), so a refused or
    failed run leaves none of the new files (and gives back those ``overwrite`` replaced), and
    what a killed run left is rolled back before the check. Returns name -> path.

    Raises:
        OutputExistsError: some targets exist and ``overwrite`` is false (nothing written).
        OutputError: the folder cannot be used, a target is a folder, or writing failed (disk
            full); nothing of the set is written.
    """
    volume = result.volume
    post = settings if isinstance(settings, PostProcessor) else PostProcessor(result, settings)
    out = check_output_folder(out_dir)
    maps = [k for k in OUTPUT_MAPS if k in result.maps]
    paths = output_paths(out, stem or scan_stem(volume.path), maps)
    refuse_existing(paths.values(), overwrite, "output file")
    # a deferred map the combination does not read is made, written and let go first, before
    # the combination holds its own memory: at most STREAM_WORKERS of them at full size at once
    used = post.settings.used_weights()
    streamed = [k for k in maps if result.maps.is_deferred(k) and k not in used]
    with WriteSet(overwrite) as files:
        made = [(partial(result.maps.peek, k), volume, paths[k], "map") for k in streamed]
        files.add_niftis(made, STREAM_WORKERS)
        c = post.combination()
        images = [(result.maps[k], volume, paths[k], "map") for k in maps if k not in streamed]
        images += [(c.combined, volume, paths["combined"], "map")]
        images += [(c.mask, volume, paths["mask"], "mask")]
        files.add_niftis(images)  # compressed side by side
        files.add_json(_report(result, post, c, paths), paths["scores"])
    return paths


def _report(
    result: LocalizationResult, post: PostProcessor, c: Combination, paths: dict[str, Path]
) -> dict:
    """The scores JSON of a written result."""
    volume = result.volume
    return {
        "scan": str(volume.path) if volume.path else None,
        "shape": list(volume.shape),
        "model": result.model_name,
        "axis": result.axis,
        "fused_axes": list(result.fused_axes),
        # with preparation the slices scored are the template's, not the file's
        "slice_scores_of": "template" if result.prepared is not None else "scan",
        "slice_axis_in_file": result.slice_axis,
        "device": result.device,
        "seconds": result.seconds,
        "notes": result.notes,
        "preparation": result.preparation.to_dict() if result.preparation else None,
        # "calibrated": the component scales are the model's; "healthy_fpr": the threshold's
        # healthy false-positive rate, null when the settings are not the calibrated combination;
        # "outlined": whether the mask's parts were outlined (a grow level below the threshold);
        # "mask_healthy_fpr": the default mask's own rate (outlined parts reach below the
        # threshold), null for other settings
        "combination": {
            **asdict(post.settings),
            "scales": c.scales,
            "calibrated": c.calibrated,
            "healthy_fpr": post.fpr_for_threshold(post.settings.threshold),
            "outlined": post.settings.grow_level() is not None,
            "mask_healthy_fpr": post.mask_fpr(),
        },
        "mask_voxels": post.mask_voxels(c.mask),
        "mask_volume_ml": post.mask_volume_ml(c.mask),
        "volume_scores": result.volume_scores,
        "slice_scores": result.slice_scores,
        "files": {k: p.name for k, p in paths.items() if k != "scores"},
    }
