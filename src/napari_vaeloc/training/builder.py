"""One complete training run: healthy NIfTI sources -> a calibrated, checksummed model folder."""

from __future__ import annotations

import dataclasses
import os
import platform
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import __version__
from ..combine import DEFAULT_WEIGHTS, CombineSettings
from ..errors import OutputExistsError
from ..models.card import (
    Architecture,
    Calibration,
    ModelCard,
    PostProcessingDefaults,
    Preprocessing,
    Provenance,
)
from ..models.store import LoadedModel, save_model
from ..preprocess import Normalisation
from ..samples import MNI_LICENCE, TEMPLATES
from .datasets import build_slice_dataset, heldout_masks, load_training_volumes
from .loop import TrainConfig, calibrate, fit, fpr_table

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

    from ..models.vae import ConvVAE
    from .augment import AugmentConfig, Augmenter

    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(out)
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
    table = (calibration.combined_fpr if calibration is not None else None) or {}
    threshold = table.get(str(DEFAULT_FPR), 1.0)
    templates = [s for s in sources if s in TEMPLATES]
    provenance = "; ".join(
        [TEMPLATES[t].description for t in templates]
        + (
            [f"{len(names) - len(templates)} NIfTI file(s): " + ", ".join(names[:5])]
            if len(names) > len(templates)
            else []
        )
    )
    training_record = {
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
    }
    card = ModelCard(
        name=name or out.name,
        architecture=Architecture.from_dict(net.config(), "network config"),
        preprocessing=Preprocessing(axis=cfg.axis, normalisation=norm, modality=modality),
        likelihood_log_std=cfg.likelihood_log_std,
        calibration=calibration,
        defaults=PostProcessingDefaults(
            weights=weights,
            threshold=threshold,
            threshold_fpr=DEFAULT_FPR,
            smoothing_mm=0.0,
            min_size_mm3=0.0,
        ),
        provenance=Provenance(
            description=f"conv VAE (Zimmerer et al. 2019) trained on healthy {modality} "
            f"{cfg.axis} slices",
            sources=provenance,
            licence=MNI_LICENCE if templates else "as the training data",
            training=training_record,
        ),
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
    smoothing_mm: float | None = None,
    min_size_mm3: float | None = None,
    scan_normalise: bool | None = None,
) -> Calibration:
    """Recompute a trained model's calibration for new default settings on the same held-out
    slices it was validated on (rebuilt from the recorded sources and split seed), set the
    default threshold to the healthy false-positive rate ``fpr``, and rewrite ``model.json``
    through the card's atomic save.

    Component scales always come from the held-out slices in model space. With 3D smoothing
    (``smoothing_mm`` > 0) or per-scan normalisation (``scan_normalise``; None keeps the card's
    settings) the false-positive table of the combined map comes from the held-out volumes /
    slabs localized in volume space, since both depend on more than one slice. The weights
    file, and so its checksum, is unchanged. Returns the new calibration."""
    from ..models.store import CARD_FILE, load_model

    folder = Path(folder)
    model = load_model(folder)
    card = model.card
    d = card.defaults
    smoothing = float((d.smoothing_mm or 0.0) if smoothing_mm is None else smoothing_mm)
    if scan_normalise is None:
        scan_normalise = bool(d.scan_normalise)
    record = card.provenance.training
    split = record.get("split", {})
    volumes, _ = load_training_volumes(record["sources"])
    norm = card.normalisation
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
    if smoothing > 0 or scan_normalise:
        masks = heldout_masks(volumes, card.axis, card.image_size, norm, split)
        settings = CombineSettings(
            weights=weights, smoothing_mm=smoothing, scan_normalise=scan_normalise
        )
        calibration.combined_fpr = volume_fpr_table(model, volumes, masks, settings, calibration)
        calibration.combined_smoothing_mm = smoothing
        calibration.combined_scan_normalise = scan_normalise
        calibration.combined_source = "held-out healthy voxels, volume space"
    card.calibration = calibration
    table = calibration.combined_fpr or {}
    card.defaults = dataclasses.replace(
        d,
        weights=dict(weights),
        smoothing_mm=smoothing,
        scan_normalise=scan_normalise,
        threshold=table[str(fpr)],
        threshold_fpr=fpr,
        min_size_mm3=d.min_size_mm3 if min_size_mm3 is None else float(min_size_mm3),
    )
    card.save(folder / CARD_FILE, overwrite=True)
    return calibration


def volume_fpr_table(
    model: LoadedModel,
    volumes: list,
    masks: list,
    settings: CombineSettings,
    calibration: Calibration,
) -> dict[str, float]:
    """Healthy false-positive-rate table {fpr: threshold} of the combined map under
    ``settings`` (scaled by ``calibration``) over the object voxels inside ``masks`` (bool
    (X, Y, Z) per volume; None skips a volume), each volume localized and post-processed as
    every front does it."""
    from ..combine import PostProcessor
    from ..engine import localize

    values = []
    for vol, mask in zip(volumes, masks, strict=True):
        if mask is None:
            continue
        res = localize(vol, model, maps=tuple(settings.used_weights()), prepare=None)
        combined = PostProcessor(res, settings, calibration).combined()
        values.append(combined[mask & res.foreground])
    return fpr_table(np.concatenate(values) if values else np.zeros(0, np.float32))
