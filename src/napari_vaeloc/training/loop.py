"""Training a VAE on healthy model-space slices (negative ELBO, Adam)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..errors import Cancelled
from ..io import write_atomic, write_json_atomic
from ..mapnames import PIXEL_MAPS
from ..models.card import Calibration
from ..scoring import gaussian_nll, kl_per_sample, target_of
from .augment import AugmentConfig, Augmenter


def negative_elbo(
    network: torch.nn.Module,
    x: torch.Tensor,
    log_std: float = 0.0,
    beta: float = 1.0,
    target: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch-mean negative ELBO with a sampled z; returns (loss, mean KL, mean Rec) in nats.
    With ``target`` (same shape as ``x``) the reconstruction of ``x`` is scored against it
    (denoising training: ``x`` is the corrupted input, ``target`` the clean slice). A model with
    neighbouring slices as input channels is scored on the middle one (``scoring.target_of``)."""
    mu, ls = network.encode(x)
    z = mu + torch.exp(ls) * torch.randn_like(mu)
    x_hat = network.decode(z)
    rec = gaussian_nll(target_of(x if target is None else target, x_hat), x_hat, log_std)
    rec = rec.flatten(1).sum(dim=1)
    kl = kl_per_sample(mu, ls)
    return (rec + beta * kl).mean(), kl.mean(), rec.mean()


#: :func:`fit`'s default augmentation: only a random left-right mirror of each slice (p = 0.5),
#: values passed through unclipped
FLIP_ONLY = Augmenter(replace(AugmentConfig.none(), flip_p=0.5, clip=(-math.inf, math.inf)))


def context_boxes(
    shape: tuple[int, ...], gen: torch.Generator, smallest: float = 0.125, largest: float = 0.5
) -> torch.Tensor:
    """bool (B, 1, H, W): one random axis-aligned box per image, each side a uniform fraction
    in [``smallest``, ``largest``] of the image's side, placed uniformly."""
    b, _, h, w = shape
    size = torch.rand((b, 2), generator=gen) * (largest - smallest) + smallest
    start = torch.rand((b, 2), generator=gen) * (1 - size)
    ys = (torch.arange(h) + 0.5) / h
    xs = (torch.arange(w) + 0.5) / w
    in_y = (ys[None] >= start[:, :1]) & (ys[None] < start[:, :1] + size[:, :1])
    in_x = (xs[None] >= start[:, 1:]) & (xs[None] < start[:, 1:] + size[:, 1:])
    return (in_y[:, :, None] & in_x[:, None, :])[:, None]


def context_loss(
    network: torch.nn.Module, x: torch.Tensor, gen: torch.Generator, log_std: float = 0.0
) -> torch.Tensor:
    """The context-encoding term of the ceVAE (Zimmerer et al., "Context-encoding variational
    autoencoder for unsupervised anomaly detection", 2018): one random box of each slice
    (:func:`context_boxes`) is replaced by standard normal noise, the slice is encoded to its
    mean and decoded, and the batch-mean Gaussian NLL (nats per slice) of the *clean* slice
    under that reconstruction is returned: the network learns to fill a hole from context."""
    box = context_boxes(tuple(x.shape), gen).to(x.device)
    noise = torch.randn(tuple(x.shape), generator=gen).to(x.device)
    mu, _ = network.encode(torch.where(box, noise, x))
    x_hat = network.decode(mu)
    return gaussian_nll(target_of(x, x_hat), x_hat, log_std).flatten(1).sum(dim=1).mean()


def coarse_noise(
    shape: tuple[int, ...], std: float, cells: int, gen: torch.Generator
) -> torch.Tensor:
    """Smooth noise for denoising training, (B, C, H, W): Gaussian noise of standard deviation
    ``std`` (model units) drawn on a ``cells`` x ``cells`` grid and upsampled bilinearly to
    H x W (coarse noise as in Kascenas et al., "Denoising autoencoders for unsupervised anomaly
    detection in brain MRI", MIDL 2022; they used 16 x 16 on 128 x 128 images, std 0.2)."""
    b, c, h, w = shape
    low = torch.randn((b, c, cells, cells), generator=gen) * std
    return torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------------------------
# Full training runs: validation, early stopping, resumable checkpoints, calibration


@dataclass
class TrainConfig:
    """Settings of one training run (stored in the model's metadata).

    ``max_steps`` bounds the run; ``max_minutes`` stops it earlier by the clock (not bitwise
    reproducible, so the bundled models use steps only). Validation every ``val_every`` steps;
    training stops after ``patience`` validations without an improvement of at least
    ``min_delta`` nats per slice, and the best validated weights are kept. With
    ``denoise_std`` > 0 the network sees each training slice with :func:`coarse_noise`
    (``denoise_cells`` per side) added inside its foreground and learns to reconstruct the clean
    slice (validation stays the plain negative ELBO). With ``context_weight`` > 0 the loss adds
    the context-encoding term of the ceVAE (:func:`context_loss`) with that weight. With
    ``neighbours`` k > 0 the network sees the k slices on each side as extra input channels
    and reconstructs the middle slice. (An
    absolute margin:
    most of the negative ELBO of a 64x64 slice is the likelihood's constant, 0.5 log 2 pi per
    pixel, so a relative margin would hide real progress.)
    """

    image_size: int = 64
    z_dim: int = 256
    widths: list[int] | None = None
    axis: str = "axial"
    lr: float = 1e-4
    batch_size: int = 64
    max_steps: int = 20_000
    max_minutes: float | None = None
    val_every: int = 250
    patience: int = 8
    min_delta: float = 0.5
    likelihood_log_std: float = 0.0
    seed: int = 0
    denoise_std: float = 0.0
    denoise_cells: int = 8
    context_weight: float = 0.0
    neighbours: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FitResult:
    network: torch.nn.Module
    history: list[dict] = field(default_factory=list)
    best_step: int = 0
    best_val: float = float("inf")
    stopped: str = ""


def validation_loss(
    network: torch.nn.Module, val: torch.Tensor, log_std: float, batch_size: int = 256
) -> float:
    """Mean negative ELBO (z = mu, no sampling) of validation slices, nats per slice."""
    if len(val) == 0:
        return float("nan")
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(val), batch_size):
            x = val[i : i + batch_size]
            mu, ls = network.encode(x)
            x_hat = network.decode(mu)
            rec = gaussian_nll(target_of(x, x_hat), x_hat, log_std).flatten(1).sum(1)
            total += float((rec + kl_per_sample(mu, ls)).sum())
    return total / len(val)


def _save_checkpoint(folder: Path, network, best_state, opt, gen, meta: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    tensors.update({f"best.{k}": v.contiguous() for k, v in best_state.items()})
    steps = {}
    for i, p in enumerate(network.parameters()):
        st = opt.state.get(p)
        if st:
            tensors[f"adam.{i}.exp_avg"] = st["exp_avg"].detach().cpu().contiguous()
            tensors[f"adam.{i}.exp_avg_sq"] = st["exp_avg_sq"].detach().cpu().contiguous()
            steps[str(i)] = float(st["step"])
    tensors["generator"] = gen.get_state()
    write_atomic(folder / "state.safetensors", lambda f: save_file(tensors, str(f)), overwrite=True)
    write_json_atomic({**meta, "adam_steps": steps}, folder / "state.json", overwrite=True)


def _load_checkpoint(folder: Path, network, opt, gen) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    t = load_file(str(folder / "state.safetensors"))
    meta = json.loads((folder / "state.json").read_text())
    network.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")})
    best = {k[5:]: v for k, v in t.items() if k.startswith("best.")}
    for i, p in enumerate(network.parameters()):
        if f"adam.{i}.exp_avg" in t:
            opt.state[p] = {
                "step": torch.tensor(meta["adam_steps"][str(i)]),
                "exp_avg": t[f"adam.{i}.exp_avg"].to(p.device),
                "exp_avg_sq": t[f"adam.{i}.exp_avg_sq"].to(p.device),
            }
    gen.set_state(t["generator"])
    return meta, best


def fit(
    network: torch.nn.Module,
    train_images: torch.Tensor,
    val_images: torch.Tensor,
    cfg: TrainConfig,
    *,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = FLIP_ONLY,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    device: str = "cpu",
    progress: Callable[[dict], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> FitResult:
    """Train with validation, early stopping and checkpoints (every validation).

    With ``resume`` and an existing checkpoint in ``checkpoint_dir``, training continues from
    it exactly (weights, Adam moments, random generator, history). ``progress`` receives a dict
    {step, max_steps, loss, val_loss?, best_val} after every step.
    """
    import time

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    dev = torch.device(device)
    network.to(dev).train().requires_grad_(True)
    opt = torch.optim.Adam(network.parameters(), lr=cfg.lr)
    history: list[dict] = []
    best_val, best_step, bad, step = float("inf"), 0, 0, 0
    best_state = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
    if resume and checkpoint_dir is not None and (checkpoint_dir / "state.json").is_file():
        meta, best_state = _load_checkpoint(checkpoint_dir, network, opt, gen)
        history, best_val, best_step = meta["history"], meta["best_val"], meta["best_step"]
        bad, step = meta["bad"], meta["step"]
    val_dev = val_images.to(dev)
    t0 = time.perf_counter()
    running: list[float] = []
    stopped = "max_steps"
    n = train_images.shape[0]
    while step < cfg.max_steps:
        if cfg.max_minutes is not None and time.perf_counter() - t0 > cfg.max_minutes * 60:
            stopped = "max_minutes"
            break
        if cancel is not None and cancel():
            raise Cancelled("training cancelled")
        idx = torch.randint(0, n, (min(cfg.batch_size, n),), generator=gen)
        x = train_images[idx].to(dev)
        if augment is not None:
            x = augment(x, gen)  # on the training device; randomness from the CPU generator
        if cfg.denoise_std > 0:
            noise = coarse_noise(tuple(x.shape), cfg.denoise_std, cfg.denoise_cells, gen)
            inside = x > x.flatten(1).min(dim=1).values.view(-1, 1, 1, 1)  # not the background
            noisy = x + noise.to(x.device) * inside
            loss, _, _ = negative_elbo(network, noisy, cfg.likelihood_log_std, target=x)
        else:
            loss, _, _ = negative_elbo(network, x, cfg.likelihood_log_std)
        if cfg.context_weight > 0:
            ce = context_loss(network, x, gen, cfg.likelihood_log_std)
            loss = loss + cfg.context_weight * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"training diverged at step {step} (loss {value})")
        running.append(value)
        step += 1
        info = {"step": step, "max_steps": cfg.max_steps, "loss": value, "best_val": best_val}
        if step % cfg.val_every == 0 or step == cfg.max_steps:
            network.eval()
            val = validation_loss(network, val_dev, cfg.likelihood_log_std)
            network.train()
            history.append(
                {
                    "step": step,
                    "train_loss": float(np.mean(running)),
                    "val_loss": val,
                    "seconds": time.perf_counter() - t0,
                }
            )
            running = []
            info["val_loss"] = val
            if not math.isfinite(val) or val < best_val - cfg.min_delta:
                best_val, best_step, bad = (val if math.isfinite(val) else best_val), step, 0
                best_state = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
            else:
                bad += 1
            info["best_val"] = best_val
            if checkpoint_dir is not None:
                _save_checkpoint(
                    checkpoint_dir,
                    network,
                    best_state,
                    opt,
                    gen,
                    {
                        "step": step,
                        "history": history,
                        "best_val": best_val,
                        "best_step": best_step,
                        "bad": bad,
                        "config": cfg.to_dict(),
                    },
                )
            if bad >= cfg.patience:
                stopped = "early_stopping"
                if progress:
                    progress(info)
                break
        if progress:
            progress(info)
    network.load_state_dict(best_state)
    network.eval().requires_grad_(False)
    return FitResult(network, history, best_step, best_val, stopped)


CALIBRATION_PERCENTILES = (50.0, 90.0, 99.0, 99.9)
#: healthy false-positive rates at which the combined map's thresholds are stored
FPR_LEVELS = (0.1, 0.05, 0.01, 0.005, 0.001, 0.0005, 0.0001)


def calibrate(
    network: torch.nn.Module,
    images: torch.Tensor,
    foreground: torch.Tensor,
    log_std: float = 0.0,
    batch_size: int = 64,
    weights: dict[str, float] | None = None,
) -> Calibration:
    """Statistics of every map over the foreground pixels of healthy held-out slices.

    ``images``: (n, 1, S, S) model-space slices; ``foreground``: bool (n, S, S). With
    ``weights``, also the healthy false-positive-rate table of the combined map
    (:func:`napari_vaeloc.combine.weighted_sum` over the scales): ``combined_fpr[fpr] =
    threshold`` such that a healthy foreground pixel exceeds it with probability ``fpr``.

    The scales are the 99th percentiles; ``combi`` is computed with ``kl_grad_scale`` (the
    KL-grad 99th percentile), as the engine will compute it with this calibration.

    Raises:
        ValueError: no foreground pixels.
    """
    from ..combine import weighted_sum
    from ..scoring import score_batch

    chunks: dict[str, list[np.ndarray]] = {k: [] for k in PIXEL_MAPS}
    for i in range(0, len(images), batch_size):
        out = score_batch(network, images[i : i + batch_size], log_std)
        fg = foreground[i : i + batch_size].numpy()
        for k in PIXEL_MAPS:
            chunks[k].append(out[k].numpy()[fg])
    values = {k: np.concatenate(v) if v else np.zeros(0, np.float32) for k, v in chunks.items()}
    if not len(values["kl_grad"]):
        raise ValueError("no foreground pixels to calibrate on")
    kl_scale = float(np.percentile(values["kl_grad"], 99.0)) or 1.0
    values["combi"] = values["combi"] / kl_scale
    pct = {
        k: {str(p): float(np.percentile(v, p)) for p in CALIBRATION_PERCENTILES}
        for k, v in values.items()
    }
    cal = Calibration(
        scales={k: pct[k]["99.0"] for k in pct},
        kl_grad_scale=kl_scale,
        percentiles=pct,
        n_pixels=len(values["kl_grad"]),
        source="foreground pixels of held-out healthy validation slices, model space",
    )
    if weights:
        scales = {k: v or 1.0 for k, v in cal.scales.items()}
        combined = weighted_sum(values, weights, scales)
        cal.combined_weights = dict(weights)
        cal.combined_fpr = fpr_table(combined)
    return cal


def fpr_table(healthy: np.ndarray) -> dict[str, float]:
    """{fpr: threshold} of healthy values: a healthy value exceeds ``threshold`` with
    probability ``fpr``, for each of :data:`FPR_LEVELS`.

    Raises:
        ValueError: no values.
    """
    if not healthy.size:
        raise ValueError("no healthy values to calibrate the threshold on")
    return {str(f): float(np.quantile(healthy, 1 - f)) for f in FPR_LEVELS}
