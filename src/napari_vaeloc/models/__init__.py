"""VAE architectures and model folders (safetensors + JSON metadata)."""

from .store import (
    LoadedModel,
    ModelCard,
    bundled_models,
    load_model,
    read_card,
    resolve_model_path,
    save_model,
)

__all__ = [
    "LoadedModel",
    "ModelCard",
    "bundled_models",
    "load_model",
    "read_card",
    "resolve_model_path",
    "save_model",
]
