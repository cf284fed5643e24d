"""A prepared training set in one file: the model-space slices a run trains and validates on,
with what the model card must record about them.

``vaeloc train SOURCES --export-slices --out FILE`` writes one where the sources are (it needs
the template packages, the individuals' cache and the registration library); ``vaeloc train
--slices FILE`` trains from it anywhere torch runs (a GPU machine without the sources, say).
The slices are stored as float16 (relative rounding at most 2**-11, about 0.001 z-units near
the clip bounds) in a compressed ``.npz``, so a run from the file is not bit-identical to the
same run from the sources, though it is seeded and reproducible from the file itself.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..preprocess import Normalisation
from .datasets import SliceDataset

#: the format this module writes; a file of another version is refused
FORMAT = "napari-vaeloc slice set 1"


@dataclass
class SliceSet:
    """A prepared training set.

    Attributes:
        data: the slices (:class:`datasets.SliceDataset`, float32 tensors).
        axis: anatomical slicing axis.
        image_size: model input size S (pixels per side).
        neighbours: k, the neighbouring slices on each side stacked as channels (2k+1 in all).
        modality: the model's modality label.
        normalisation: how the slices were normalised.
        records: one card record per source (name, modality, description, origin, licence,
            individuals, role).
        sources: the sources as the card names them.
        individuals: None, or {"per_source": N, "config": IndividualConfig fields}.
    """

    data: SliceDataset
    axis: str
    image_size: int
    neighbours: int
    modality: str
    normalisation: Normalisation
    records: list[dict]
    sources: list[str]
    individuals: dict | None = None

    def meta(self) -> dict:
        return {
            "format": FORMAT,
            "axis": self.axis,
            "image_size": self.image_size,
            "neighbours": self.neighbours,
            "modality": self.modality,
            "normalisation": self.normalisation.to_dict(),
            "records": self.records,
            "sources": self.sources,
            "individuals": self.individuals,
            "pad_value": self.data.pad_value,
            "split": self.data.split,
        }


def write_slices(sset: SliceSet, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``sset`` to ``path`` (a compressed ``.npz``: ``train`` (N, C, S, S) and ``val``
    (M, C, S, S) float16, ``val_foreground`` (M, S, S) bool, ``meta`` JSON text), whole or not
    at all.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is false.
        OutputError: ``path`` cannot be written.
    """
    from ..io import write_atomic

    arrays = {
        "train": sset.data.train.numpy().astype(np.float16),
        "val": sset.data.val.numpy().astype(np.float16),
        "val_foreground": sset.data.val_foreground.numpy().astype(bool),
        "meta": np.array(json.dumps(sset.meta())),
    }

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    return write_atomic(path, write, overwrite)


def _open(p: Path):
    hint = "write one with `vaeloc train SOURCES --export-slices --out FILE`"
    if not p.is_file():
        what = "a folder" if p.is_dir() else "missing"
        raise InputError(f"cannot read the slice set {p}: it is {what}; {hint}")
    z = None
    try:
        z = np.load(p, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        meta = json.loads(str(z["meta"]))
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else None
            raise InputError(f"{p} is a slice set of another format ({got}), not {FORMAT!r}")
    except (OSError, KeyError, ValueError, EOFError, InputError) as exc:
        if isinstance(z, np.lib.npyio.NpzFile):
            z.close()  # nothing of a file that is refused stays open
        if isinstance(exc, InputError):
            raise
        raise InputError(
            f"{p} is not a slice set (the .npz that --export-slices writes); {hint}"
        ) from None
    return z, meta


def read_meta(path: str | os.PathLike) -> dict:
    """The description stored with a slice set (:meth:`SliceSet.meta`), without its slices.

    Raises:
        InputError: ``path`` is missing, unreadable, or not a slice set of this format.
    """
    z, meta = _open(Path(path))
    z.close()
    return meta


def read_slices(path: str | os.PathLike) -> SliceSet:
    """The slice set written by :func:`write_slices`, its slices as float32 tensors.

    Raises:
        InputError: ``path`` is missing, unreadable, or not a slice set of this format.
    """
    import torch

    p = Path(path)
    z, meta = _open(p)
    try:
        train = torch.from_numpy(z["train"].astype(np.float32))
        val = torch.from_numpy(z["val"].astype(np.float32))
        fg = torch.from_numpy(z["val_foreground"].astype(bool))
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(
            f"cannot read the slice set {p}: {exc.__class__.__name__}: {exc}"
        ) from None
    finally:
        z.close()
    return SliceSet(
        data=SliceDataset(train, val, fg, float(meta["pad_value"]), dict(meta["split"])),
        axis=meta["axis"],
        image_size=int(meta["image_size"]),
        neighbours=int(meta["neighbours"]),
        modality=meta["modality"],
        normalisation=Normalisation.from_dict(meta["normalisation"]),
        records=list(meta["records"]),
        sources=list(meta["sources"]),
        individuals=meta.get("individuals"),
    )


def check_matches(
    meta: dict,
    path: str | os.PathLike,
    axis: str,
    image_size: int,
    neighbours: int,
    modality: str,
    normalisation: Normalisation,
) -> None:
    """Refuse training settings that contradict those of the slice set ``meta``
    (:func:`read_meta`) read from ``path``.

    Raises:
        InputError: the axis, input size, neighbour count, modality or normalisation differs
            from the file's.
    """

    def clip(n: Normalisation) -> str:
        return ",".join(f"{v:g}" for v in n.clip)

    stored_norm = Normalisation.from_dict(meta["normalisation"])
    for what, given, stored in (
        ("--axis", axis, meta["axis"]),
        ("--image-size", image_size, int(meta["image_size"])),
        ("--neighbours", neighbours, int(meta["neighbours"])),
        ("--modality", modality.upper(), str(meta["modality"]).upper()),
        ("--clip", clip(normalisation), clip(stored_norm)),
        ("--foreground", normalisation.foreground, stored_norm.foreground),
    ):
        if given != stored:
            raise InputError(
                f"{path} holds slices made with {what} {stored}, not {given}: train with "
                f"{what} {stored} or export the slices again"
            )
