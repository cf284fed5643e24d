"""Training a VAE on healthy model-space slices (negative ELBO, Adam)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .errors import Cancelled
from .scoring import gaussian_nll, kl_per_sample


def negative_elbo(
    network: torch.nn.Module, x: torch.Tensor, log_std: float = 0.0, beta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch-mean negative ELBO with a sampled z; returns (loss, mean KL, mean Rec) in nats."""
    mu, ls = network.encode(x)
    z = mu + torch.exp(ls) * torch.randn_like(mu)
    x_hat = network.decode(z)
    rec = gaussian_nll(x, x_hat, log_std).flatten(1).sum(dim=1)
    kl = kl_per_sample(mu, ls)
    return (rec + beta * kl).mean(), kl.mean(), rec.mean()


def flip_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random left-right mirror of each (B, 1, S, S) slice (the first in-plane axis in RAS+
    slices is left-right for axial and coronal slicing)."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    out = x.clone()
    out[flip] = torch.flip(x[flip], dims=[2])
    return out


def train_vae(
    network: torch.nn.Module,
    images: torch.Tensor,
    *,
    steps: int | None = None,
    seconds: float | None = None,
    batch_size: int = 64,
    lr: float = 1e-4,
    log_std: float = 0.0,
    seed: int = 0,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = flip_augment,
    progress: Callable[[int, float], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> list[float]:
    """Fit ``network`` to ``images`` (N, 1, S, S) for ``steps`` steps or ``seconds`` seconds.

    Returns the loss (negative ELBO, nats per slice) of every step. Leaves the network in eval mode.
    """
    import time

    if steps is None and seconds is None:
        raise ValueError("give steps or seconds")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    network.train().requires_grad_(True)
    opt = torch.optim.Adam(network.parameters(), lr=lr)
    losses: list[float] = []
    t0 = time.perf_counter()
    step = 0
    n = images.shape[0]
    while True:
        if steps is not None and step >= steps:
            break
        if seconds is not None and time.perf_counter() - t0 >= seconds:
            break
        if cancel is not None and cancel():
            raise Cancelled("training cancelled")
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        x = images[idx]
        if augment is not None:
            x = augment(x, gen)
        loss, _, _ = negative_elbo(network, x, log_std)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"training diverged at step {step} (loss {value})")
        losses.append(value)
        step += 1
        if progress:
            progress(step, value)
    network.eval().requires_grad_(False)
    return losses
