"""Model folders: ``weights.safetensors`` plus ``model.json`` (the typed card of ``card.py``,
with the weights' sha256).

Weights are never unpickled. Loading checks the checksum, then that every tensor's name and shape
matches the architecture the metadata describes.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError
from ..io import write_atomic, write_folder_atomic
from .card import Architecture, ModelCard

WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "model.json"
#: a model folder's registration template, its brain mask, and the MNI notice beside them
TEMPLATE_FILE = "template.nii.gz"
TEMPLATE_MASK_FILE = "template_brain_mask.nii.gz"
MNI_NOTICE_FILE = "MNI-COPYING"
BUNDLED_DIR = Path(__file__).parent / "weights"


@dataclass
class LoadedModel:
    """A network in eval mode with its card and where it came from."""

    network: object  # torch.nn.Module
    card: ModelCard
    path: Path | None = None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_model(
    network,
    card: ModelCard,
    directory: str | os.PathLike,
    overwrite: bool = False,
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Write ``directory/weights.safetensors`` and ``directory/model.json`` (and a copy of each
    of ``extra_files``, name in the folder -> file, e.g. the registration template the card
    names) as one folder that appears whole or not at all
    (:func:`napari_vaeloc.io.write_folder_atomic`). The card's architecture and checksum are
    filled in from the network.

    Raises:
        OutputExistsError: the folder exists and ``overwrite`` is false.
    """
    import shutil

    from safetensors.torch import save_file

    from .. import __version__

    def fill(tmp: Path) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
        write_atomic(
            tmp / WEIGHTS_FILE,
            lambda f: save_file(state, str(f), metadata={"format": "pt"}),
            suffix=".safetensors",
        )
        card.architecture = Architecture.from_dict(network.config(), "network config")
        card.weights_sha256 = sha256_file(tmp / WEIGHTS_FILE)
        card.provenance.package_version = card.provenance.package_version or __version__
        card.save(tmp / CARD_FILE)
        for name, source in (extra_files or {}).items():
            shutil.copyfile(source, tmp / name)

    return write_folder_atomic(directory, fill, overwrite)


def read_card(directory: str | os.PathLike) -> ModelCard:
    """The validated card of a model folder.

    Raises:
        ModelError: no ``model.json``, invalid JSON, or an invalid card (the field is named).
    """
    return ModelCard.load(Path(directory) / CARD_FILE)


def bundled_models() -> dict[str, Path]:
    """Name -> folder of the models that ship with the package."""
    if not BUNDLED_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(BUNDLED_DIR.iterdir()) if (p / CARD_FILE).is_file()}


def copy_model(
    source: str | os.PathLike,
    out: str | os.PathLike,
    edit: Callable[[ModelCard], None] | None = None,
) -> Path:
    """A copy of the model folder ``source`` (a bundled name or a folder) as the new folder
    ``out``, its card named after ``out`` and changed by ``edit``, written whole or not at all
    (:func:`napari_vaeloc.io.write_folder_atomic`). The weights, and so their checksum, are
    copied unchanged.

    Raises:
        OutputExistsError: ``out`` exists.
        ModelError: ``source`` is no model folder.
    """
    src, target = resolve_model_path(source), Path(out)

    def fill(tmp: Path) -> None:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        card = read_card(tmp)
        card.name = target.name
        if edit is not None:
            edit(card)
        card.save(tmp / CARD_FILE, overwrite=True)

    return write_folder_atomic(target, fill)


def resolve_model_path(source: str | os.PathLike) -> Path:
    """A bundled model's name or a model folder -> the folder."""
    p = Path(source)
    if p.is_dir():
        return p
    bundled = bundled_models()
    if str(source) in bundled:
        return bundled[str(source)]
    names = ", ".join(bundled) or "none bundled yet"
    raise ModelError(f"no model named or found at {source!r} (bundled models: {names})")


def load_model(source: str | os.PathLike, device: str = "cpu", verify: bool = True) -> LoadedModel:
    """Load a bundled model by name, or a model folder, onto ``device`` in eval mode.

    Raises:
        ModelError: missing files, checksum mismatch (tampered or corrupted weights), or tensors
            that do not fit the architecture named in the metadata.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .vae import build_model

    folder = resolve_model_path(source)
    card = read_card(folder)
    wpath = folder / WEIGHTS_FILE
    if not wpath.is_file():
        raise ModelError(f"{folder} has no {WEIGHTS_FILE}")
    if verify:
        if not card.weights_sha256:
            raise ModelError(f"{folder / CARD_FILE} has no weights_sha256 to verify the weights")
        digest = sha256_file(wpath)
        if digest != card.weights_sha256:
            raise ModelError(
                f"the weights of model {card.name!r} do not match their checksum "
                f"({digest[:12]}... != {card.weights_sha256[:12]}...): the file was modified or "
                "corrupted; reinstall or retrain the model"
            )
    try:
        network = build_model(card.architecture.config())
    except (TypeError, ValueError) as exc:
        raise ModelError(f"model {card.name!r}: bad architecture in metadata: {exc}") from exc
    try:
        state = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"cannot read {wpath.name} of model {card.name!r}: {exc}") from exc
    expected = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        parts = [
            f"missing {missing[:3]}" if missing else "",
            f"unexpected {extra[:3]}" if extra else "",
            "shape mismatch " + ", ".join(f"{k}: {found[k]} vs {expected[k]}" for k in wrong[:3])
            if wrong
            else "",
        ]
        raise ModelError(
            f"the weights of model {card.name!r} do not fit its metadata's architecture: "
            + "; ".join(p for p in parts if p)
        )
    network.load_state_dict({k: v.float() for k, v in state.items()})
    network.eval().requires_grad_(False)
    network.to(device)
    return LoadedModel(network, card, folder)


def cached_model(source: str | os.PathLike) -> LoadedModel:
    """:func:`load_model` with a cache shared by every front (the command line, the widget and
    the engine's companion models): a model folder is read once per process while its files
    are unchanged (the key holds their modification times)."""
    folder = resolve_model_path(source).resolve()
    stamps = tuple(
        (folder / f).stat().st_mtime_ns if (folder / f).exists() else 0
        for f in (CARD_FILE, WEIGHTS_FILE)
    )
    return _load_cached(str(folder), stamps)


@functools.lru_cache(maxsize=8)
def _load_cached(folder: str, stamps: tuple[int, int]) -> LoadedModel:
    return load_model(folder)
