"""Model folders: ``weights.safetensors`` plus ``model.json`` (metadata, the weights' sha256).

Weights are never unpickled. Loading checks the checksum, then that every tensor's name and shape
matches the architecture the metadata describes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ModelError, OutputExistsError
from ..io import make_readable

WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "model.json"
FORMAT_VERSION = 1
BUNDLED_DIR = Path(__file__).parent / "weights"


@dataclass
class ModelCard:
    """Everything needed to use a model besides its weights.

    Attributes:
        name: short identifier, e.g. "t2-brain".
        architecture: ``config()`` of the network (see :func:`build_model`).
        axis: slicing axis the model was trained on ("axial", "coronal", "sagittal").
        normalisation: :meth:`Normalisation.to_dict` of the preprocessing.
        likelihood_log_std: log sigma of the Gaussian likelihood (0 -> sigma = 1).
        modality: e.g. "T2"; description, provenance and licence are free text.
        calibration: per-map statistics on healthy foreground, or None (uncalibrated).
        defaults: combination weights, smoothing and threshold the plugin starts from.
        weights_sha256: checksum of the weights file, filled in on save.
    """

    name: str
    architecture: dict
    axis: str = "axial"
    normalisation: dict = field(
        default_factory=lambda: {
            "method": "zscore-foreground",
            "foreground": "otsu",
            "clip": [-1.5, 1.5],
        }
    )
    likelihood_log_std: float = 0.0
    modality: str = "T2"
    description: str = ""
    provenance: str = ""
    licence: str = ""
    calibration: dict | None = None
    defaults: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    package_version: str = ""
    weights_sha256: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def image_size(self) -> int:
        return int(self.architecture["image_size"])

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> ModelCard:
        known = set(cls.__dataclass_fields__)
        missing = {"name", "architecture"} - set(d)
        if missing:
            raise ModelError(f"model metadata lacks {', '.join(sorted(missing))}")
        if int(d.get("format_version", FORMAT_VERSION)) > FORMAT_VERSION:
            raise ModelError("model metadata is from a newer napari-vaeloc; upgrade the package")
        return cls(**{k: v for k, v in d.items() if k in known})


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
    network, card: ModelCard, directory: str | os.PathLike, overwrite: bool = False
) -> Path:
    """Write ``directory/weights.safetensors`` and ``directory/model.json`` (atomically, as one
    folder rename). The card's architecture and checksum are filled in from the network."""
    from safetensors.torch import save_file

    from .. import __version__

    dest = Path(directory)
    if dest.exists() and not overwrite:
        raise OutputExistsError(f"{dest} exists; pass overwrite=True to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        card.architecture = network.config()
        card.weights_sha256 = sha256_file(tmp / WEIGHTS_FILE)
        card.package_version = card.package_version or __version__
        (tmp / CARD_FILE).write_text(card.to_json() + "\n")
        for p in (tmp, tmp / WEIGHTS_FILE, tmp / CARD_FILE):
            make_readable(p)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return dest


def read_card(directory: str | os.PathLike) -> ModelCard:
    d = Path(directory)
    try:
        raw = json.loads((d / CARD_FILE).read_text())
    except FileNotFoundError as exc:
        raise ModelError(f"{d} is not a model folder: no {CARD_FILE}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{d / CARD_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelError(f"{d / CARD_FILE} must hold a JSON object")
    try:
        return ModelCard.from_dict(raw)
    except TypeError as exc:
        raise ModelError(f"{d / CARD_FILE} is malformed: {exc}") from exc


def bundled_models() -> dict[str, Path]:
    """Name -> folder of the models that ship with the package."""
    if not BUNDLED_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(BUNDLED_DIR.iterdir()) if (p / CARD_FILE).is_file()}


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
        network = build_model(card.architecture)
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
