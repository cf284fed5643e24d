"""Writing a localization result as NIfTI maps, a mask and a JSON of scores."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .combine import Combination, CombineSettings, apply_settings
from .engine import OUTPUT_MAPS, LocalizationResult
from .errors import OutputExistsError
from .io import Volume, make_readable, save_nifti, scan_stem
from .mapnames import DEFAULT_MAPS


def output_paths(out_dir: Path, stem: str, maps: Sequence[str] = DEFAULT_MAPS) -> dict[str, Path]:
    """Every file a result writes: one per map, the combined map, the mask, the scores."""
    paths = {k: out_dir / f"{stem}_{k}.nii.gz" for k in maps}
    paths["combined"] = out_dir / f"{stem}_combined.nii.gz"
    paths["mask"] = out_dir / f"{stem}_mask.nii.gz"
    paths["scores"] = out_dir / f"{stem}_scores.json"
    return paths


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple | np.ndarray):
        return [_jsonable(x) for x in (v.tolist() if isinstance(v, np.ndarray) else v)]
    if isinstance(v, float | np.floating):
        return None if not math.isfinite(float(v)) else float(v)
    if isinstance(v, np.integer):
        return int(v)
    return v


def refuse_existing(paths: Iterable[Path], overwrite: bool, what: str = "files") -> None:
    """Raise :class:`OutputExistsError` naming the existing ones of ``paths`` unless
    ``overwrite``: checked before a set of files is written, so a refusal writes none."""
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        names = ", ".join(p.name for p in existing[:4]) + (" ..." if len(existing) > 4 else "")
        raise OutputExistsError(
            f"{len(existing)} {what} exist in {existing[0].parent} ({names}); "
            "pass --overwrite to replace them"
        )


def write_atomic(
    path: Path, write: Callable[[str], None], overwrite: bool = False, suffix: str = ""
) -> Path:
    """Create ``path`` whole or not at all: ``write(tmp)`` fills a temporary file beside it,
    which then replaces ``path``; refuses to replace an existing file unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        make_readable(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text_atomic(text: str, path: Path, overwrite: bool = False) -> Path:
    """Write a text file whole or not at all, refusing to replace one unless ``overwrite``."""
    return write_atomic(path, lambda tmp: Path(tmp).write_text(text), overwrite)


def write_json_atomic(obj: dict, path: Path, overwrite: bool = False) -> Path:
    """Write JSON whole or not at all; NaN becomes null."""
    return write_text_atomic(json.dumps(_jsonable(obj), indent=2) + "\n", path, overwrite)


def write_result(
    result: LocalizationResult,
    volume: Volume,
    out_dir: str | os.PathLike,
    settings: CombineSettings,
    calibration: dict | None = None,
    stem: str | None = None,
    overwrite: bool = False,
    combination: Combination | None = None,
) -> dict[str, Path]:
    """Write all maps, the combined map, the mask and the scores JSON into ``out_dir``.

    ``combination`` is the result of :func:`combine.apply_settings` when the caller has it
    already; otherwise it is computed here. Every target is checked before anything is written,
    so a refused run leaves no partial set.
    """
    out = Path(out_dir)
    maps = [k for k in OUTPUT_MAPS if k in result.maps]
    paths = output_paths(out, stem or scan_stem(volume.path), maps)
    refuse_existing(paths.values(), overwrite, "output files")
    c = combination or apply_settings(
        result.maps, result.foreground, volume.spacing, settings, calibration
    )
    combined, mask = c.combined, c.mask
    for k in maps:
        save_nifti(result.maps[k], volume, paths[k], "map", overwrite)
    save_nifti(combined, volume, paths["combined"], "map", overwrite)
    save_nifti(mask, volume, paths["mask"], "mask", overwrite)
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    report = {
        "scan": str(volume.path) if volume.path else None,
        "shape": list(volume.shape),
        "model": result.model_name,
        "axis": result.axis,
        "slice_axis_in_file": result.slice_axis,
        "device": result.device,
        "seconds": result.seconds,
        "notes": result.notes,
        "combination": {**asdict(settings), "scales": c.scales, "calibrated": c.calibrated},
        "mask_voxels": int(mask.sum()),
        "mask_volume_ml": float(mask.sum()) * voxel_ml,
        "volume_scores": result.volume_scores,
        "slice_scores": result.slice_scores,
        "files": {k: p.name for k, p in paths.items() if k != "scores"},
    }
    write_json_atomic(report, paths["scores"], overwrite)
    return paths
