"""The end-to-end demonstration behind ``vaeloc demo``.

Until pretrained models ship, the demo trains a small *demo model* on the fly, for a fixed time,
on the healthy sample scan, inserts a synthetic lesion into that scan, localizes it and reports
how well each map separates lesion from healthy brain (pixel AUROC inside the brain).
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .combine import CombineSettings
from .engine import localize
from .export import write_result
from .io import Volume, load_volume, save_nifti
from .models.store import LoadedModel, ModelCard, save_model
from .preprocess import Normalisation, volume_to_slices
from .synth import insert_sphere

SAMPLE_T2 = "sample_t2_healthy.nii.gz"


def sample_path(name: str = SAMPLE_T2) -> Path:
    """Path of a sample scan bundled with the package."""
    return Path(str(importlib.resources.files("napari_vaeloc") / "data" / name))


def pixel_auroc(score: np.ndarray, truth: np.ndarray, within: np.ndarray | None = None) -> float:
    """Area under the ROC curve of ``score`` for ``truth`` voxels (scikit-learn), optionally
    restricted to the voxels of ``within``."""
    from sklearn.metrics import roc_auc_score

    s, t = (score[within], truth[within]) if within is not None else (score.ravel(), truth.ravel())
    return float(roc_auc_score(t.astype(bool).ravel(), s.ravel()))


def train_demo_model(
    volume: Volume,
    seconds: float,
    seed: int = 0,
    image_size: int = 64,
    z_dim: int = 128,
    progress: Callable[[int, float], None] | None = None,
) -> LoadedModel:
    """Train a conv VAE for ``seconds`` on the axial slices of one healthy volume."""
    import torch

    from .models.vae import ConvVAE
    from .train import train_vae

    torch.manual_seed(seed)
    norm = Normalisation()
    ms = volume_to_slices(volume.data, volume.affine, volume.spacing, "axial", image_size, norm)
    images = ms.images[torch.from_numpy(np.flatnonzero(ms.foreground))]
    net = ConvVAE(image_size=image_size, z_dim=z_dim)
    losses = train_vae(
        net,
        images,
        seconds=seconds,
        lr=1e-3 if seconds < 600 else 1e-4,
        seed=seed,
        progress=progress,
    )
    card = ModelCard(
        name="demo",
        architecture=net.config(),
        axis="axial",
        normalisation=norm.to_dict(),
        modality="T2",
        description=(
            f"DEMO MODEL: trained on the fly for {seconds:g} s on the one healthy sample scan; "
            "not a pretrained model"
        ),
        provenance="ICBM152 2009c T2 (skull-stripped), 2 mm sample bundled with napari-vaeloc",
        licence="see data/MNI-COPYING",
        training={
            "steps": len(losses),
            "seconds": seconds,
            "final_loss": losses[-1] if losses else None,
            "seed": seed,
        },
    )
    return LoadedModel(net, card, None)


def run_demo(
    out_dir: str | Path,
    seconds: float = 60.0,
    seed: int = 0,
    device: str = "auto",
    overwrite: bool = False,
    train_progress: Callable[[int, float], None] | None = None,
    score_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Train the demo model, localize a synthetic lesion in the sample and write everything to
    ``out_dir``. Returns {"auroc": {map: value}, "files": {...}, "model_dir": Path}."""
    out = Path(out_dir)
    healthy = load_volume(sample_path())
    model = train_demo_model(healthy, seconds, seed, progress=train_progress)
    model_dir = save_model(model.network, model.card, out / "demo-model", overwrite=overwrite)

    rng = np.random.default_rng(seed)
    fg = np.argwhere(healthy.data > np.percentile(healthy.data[healthy.data > 0], 50))
    center = fg[rng.integers(len(fg))]
    bright = float(np.percentile(healthy.data[healthy.data > 0], 99))
    lesion_data, truth = insert_sphere(
        healthy.data, tuple(center), 10.0, bright, healthy.spacing, mode="set"
    )
    lesion = Volume(
        lesion_data,
        healthy.affine,
        healthy.header,
        out / "sample_t2_lesion.nii.gz",
        healthy.source_dtype,
    )
    save_nifti(lesion.data, lesion, lesion.path, "map", overwrite)
    save_nifti(truth, lesion, out / "sample_t2_lesion_truth.nii.gz", "mask", overwrite)

    result = localize(lesion, model, device=device, progress=score_progress)
    files = write_result(
        result,
        lesion,
        out,
        CombineSettings.from_card(model.card),
        model.card.calibration,
        overwrite=overwrite,
    )
    brain = result.foreground
    auroc = {
        k: pixel_auroc(result.maps[k], truth, brain)
        for k in ("rec_error", "kl_grad", "rec_grad", "elbo_grad", "combi")
    }
    return {"auroc": auroc, "files": files, "model_dir": model_dir, "result": result}
