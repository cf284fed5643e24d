"""One complete training run: healthy NIfTI sources -> a calibrated, checksummed model folder."""

from __future__ import annotations

import dataclasses
import os
import platform
from collections.abc import Callable
from pathlib import Path

from . import __version__
from .combine import DEFAULT_WEIGHTS
from .datasets import MNI_LICENCE, TEMPLATES, build_slice_dataset, load_training_volumes
from .errors import OutputExistsError
from .models.store import ModelCard, save_model
from .preprocess import Normalisation
from .train import TrainConfig, calibrate, fit

#: the default threshold: a healthy foreground voxel exceeds it with this probability
DEFAULT_FPR = 0.01


def checkpoint_dir_for(out: Path) -> Path:
    return out.parent / f".{out.name}.checkpoint"


def train_model(
    sources: list[str],
    out: str | os.PathLike,
    cfg: TrainConfig,
    *,
    name: str | None = None,
    modality: str = "T2",
    normalisation: Normalisation | None = None,
    augment: dict | None = None,
    device: str = "cpu",
    resume: bool = False,
    overwrite: bool = False,
    weights: dict[str, float] | None = None,
    progress: Callable[[dict], None] | None = None,
) -> tuple[Path, dict]:
    """Train a conv VAE on the healthy ``sources`` (files, folders or template names), calibrate
    it on the held-out slices and write the model folder ``out``.

    ``augment``: :class:`augment.AugmentConfig` fields (None: the defaults; ``{}`` would also be
    the defaults; pass ``{"enabled": False}`` for none). Checkpoints go to a hidden folder beside
    ``out`` and are removed once the model is written. Returns (model folder, training summary).
    """
    import torch

    from .augment import AugmentConfig, Augmenter
    from .models.vae import ConvVAE

    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists; pass --overwrite to replace it")
    norm = normalisation or Normalisation()
    volumes, names = load_training_volumes(sources)
    data = build_slice_dataset(volumes, cfg.axis, cfg.image_size, norm, seed=cfg.seed)
    aug_d = dict(augment or {})
    enabled = aug_d.pop("enabled", True)
    aug_cfg = AugmentConfig.from_dict(aug_d) if enabled else AugmentConfig.none()
    aug_cfg = dataclasses.replace(aug_cfg, background=data.pad_value, clip=tuple(norm.clip))
    torch.manual_seed(cfg.seed)
    net = ConvVAE(
        image_size=cfg.image_size, z_dim=cfg.z_dim, widths=tuple(cfg.widths) if cfg.widths else None
    )
    ckpt = checkpoint_dir_for(out)
    result = fit(
        net,
        data.train,
        data.val,
        cfg,
        augment=Augmenter(aug_cfg),
        checkpoint_dir=ckpt,
        resume=resume,
        device=device,
        progress=progress,
    )
    net = result.network.cpu()
    weights = dict(weights or DEFAULT_WEIGHTS)
    calibration = (
        calibrate(net, data.val, data.val_foreground, cfg.likelihood_log_std, weights=weights)
        if len(data.val)
        else None
    )
    threshold = (calibration or {}).get("combined_fpr", {}).get(str(DEFAULT_FPR), 1.0)
    templates = [s for s in sources if s in TEMPLATES]
    provenance = "; ".join(
        [TEMPLATES[t][3] for t in templates]
        + (
            [f"{len(names) - len(templates)} NIfTI file(s): " + ", ".join(names[:5])]
            if len(names) > len(templates)
            else []
        )
    )
    card = ModelCard(
        name=name or out.name,
        architecture=net.config(),
        axis=cfg.axis,
        normalisation=norm.to_dict(),
        likelihood_log_std=cfg.likelihood_log_std,
        modality=modality,
        description=f"conv VAE (Zimmerer et al. 2019) trained on healthy {modality} "
        f"{cfg.axis} slices",
        provenance=provenance,
        licence=MNI_LICENCE if templates else "as the training data",
        calibration=calibration,
        defaults={
            "weights": weights,
            "threshold": threshold,
            "threshold_fpr": DEFAULT_FPR,
            "smoothing_mm": 0.0,
            "min_size_mm3": 0.0,
        },
        training={
            "config": cfg.to_dict(),
            "augment": aug_cfg.to_dict(),
            "split": data.split,
            "history": result.history,
            "best_step": result.best_step,
            "best_val_loss": result.best_val,
            "stopped": result.stopped,
            "sources": [str(s) if s in TEMPLATES else Path(s).name for s in sources],
            "torch": torch.__version__,
            "python": platform.python_version(),
            "package_version": __version__,
        },
    )
    folder = save_model(net, card, out, overwrite=overwrite)
    if ckpt.is_dir():
        import shutil

        shutil.rmtree(ckpt)
    summary = {
        "steps": result.history[-1]["step"] if result.history else 0,
        "best_val_loss": result.best_val,
        "stopped": result.stopped,
        "n_train": data.split["n_train"],
        "n_val": data.split["n_val"],
        "threshold": threshold,
        "seconds": result.history[-1]["seconds"] if result.history else float("nan"),
        "final_train_loss": result.history[-1]["train_loss"] if result.history else float("nan"),
    }
    return folder, summary


def recalibrate(
    folder: str | os.PathLike,
    weights: dict[str, float],
    fpr: float = DEFAULT_FPR,
) -> dict:
    """Recompute a trained model's calibration for new default ``weights`` on the same held-out
    slices it was validated on (rebuilt from the recorded sources and split seed), set the
    default threshold to the healthy false-positive rate ``fpr``, and rewrite ``model.json``.
    The weights file, and so its checksum, is unchanged. Returns the new calibration."""
    import json
    import tempfile

    from .io import make_readable
    from .models.store import CARD_FILE, load_model

    folder = Path(folder)
    model = load_model(folder)
    card = model.card
    split = card.training.get("split", {})
    volumes, _ = load_training_volumes(card.training["sources"])
    norm = Normalisation.from_dict(card.normalisation)
    data = build_slice_dataset(
        volumes,
        card.axis,
        card.image_size,
        norm,
        val_fraction=split.get("val_fraction", 0.15),
        slab=split.get("slab", 8),
        gap=split.get("gap", 2),
        seed=split.get("seed", 0),
    )
    calibration = calibrate(
        model.network, data.val, data.val_foreground, card.likelihood_log_std, weights=weights
    )
    card.calibration = calibration
    card.defaults = {
        **card.defaults,
        "weights": dict(weights),
        "threshold": calibration["combined_fpr"][str(fpr)],
        "threshold_fpr": fpr,
    }
    fd, tmp = tempfile.mkstemp(prefix=".model.json.", dir=folder)
    with os.fdopen(fd, "w") as fh:
        fh.write(card.to_json() + "\n")
    make_readable(tmp)
    os.replace(tmp, folder / CARD_FILE)
    json.loads((folder / CARD_FILE).read_text())  # fail loudly if anything went wrong
    return calibration
