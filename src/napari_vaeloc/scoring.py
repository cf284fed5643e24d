"""Per-pixel and per-slice anomaly scores of a VAE, in pure torch (METHOD.md definitions).

Per pixel, for an input batch x (B, 1, S, S), with z = mu (no sampling). A model that takes
neighbouring slices as extra channels gets x (B, 2k+1, S, S) and reconstructs the middle one;
every map is then of the middle slice (:func:`centre_slice`):

- ``rec_error``: Gaussian NLL ``0.5 (x - x_hat)^2 / sigma^2 + log sigma + 0.5 log 2 pi``;
- ``rec_error_smooth``: ``rec_error`` smoothed like the gradients (not in the paper);
- ``sq_error``: ``(x - x_hat)^2``;
- ``kl_grad``: ``|dKL/dx|``, smoothed (7x7 Gaussian, sigma 3 px, zero padding);
- ``rec_grad``: ``|dRec/dx|``, smoothed; ``elbo_grad``: ``|d(KL + Rec)/dx|``, smoothed;
- ``combi``: ``smooth(|dKL/dx|) / kl_grad_scale * rec_error`` (the paper's product; its per-batch
  min-max is replaced by a fixed scale, see :func:`score_batch`);
- ``kl_grad_sg`` / ``elbo_grad_sg``: SmoothGrad versions of ``kl_grad`` / ``elbo_grad`` (the
  authors' later choice): the signed gradient averaged over the input and ``SMOOTHGRAD_N`` noisy
  copies ``x + SMOOTHGRAD_EPS * noise``, then ``| |`` and smoothed. The noise patterns are fixed
  (seed 0) and the same for every slice, so maps stay deterministic and batch-independent;
- ``restoration``: ``|x - x_r|``, smoothed, where ``x_r`` is the input restored towards healthy
  anatomy by ``RESTORATION_STEPS`` steps of gradient descent on the negative ELBO,
  ``x_r <- x_r - RESTORATION_STEP * dELBO/dx_r`` starting at ``x`` (the image-restoration view of
  You et al., "Unsupervised lesion detection via image restoration with a normative prior",
  MIDL 2019, without their total-variation term; not in Zimmerer et al.). The engine adds to it,
  smoothed the same way, how far each voxel's unclipped z-score lies beyond the model's healthy
  range (:func:`napari_vaeloc.preprocess.excess_slices`): the input is clipped, so a lesion
  brighter than the brightest healthy tissue would otherwise look like that tissue.

Per slice: ``kl`` (KL term, nats), ``rec`` (summed Rec term, nats), ``elbo`` (their sum, i.e. the
negative ELBO).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

SMOOTHGRAD_N = 2  # noisy copies besides the input itself
SMOOTHGRAD_EPS = 0.1  # noise std, model units (z-scored intensities)
RESTORATION_STEPS = 5  # gradient steps on the negative ELBO
RESTORATION_STEP = 0.2  # step size, model units per unit gradient (Rec's gradient is x - x_hat)


def gaussian_kernel(size: int = 7, sigma: float = 3.0) -> torch.Tensor:
    """Normalised 2D Gaussian kernel, shape (1, 1, size, size)."""
    r = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    k = torch.outer(g, g)
    return (k / k.sum())[None, None]


def smooth(maps: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve (B, 1, H, W) maps with ``kernel`` (zero padding, same size out)."""
    pad = kernel.shape[-1] // 2
    return F.conv2d(maps, kernel.to(maps), padding=pad)


def kl_per_sample(mu: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) summed over latent dims, shape (B,)."""
    return 0.5 * (mu.pow(2) + torch.exp(2 * log_std) - 1 - 2 * log_std).sum(dim=1)


def gaussian_nll(x: torch.Tensor, x_hat: torch.Tensor, log_std: float = 0.0) -> torch.Tensor:
    """Per-pixel Gaussian negative log-likelihood, same shape as x (nats)."""
    inv_var = math.exp(-2 * log_std)
    return 0.5 * (x - x_hat).pow(2) * inv_var + log_std + 0.5 * math.log(2 * math.pi)


def autocast_for(device: torch.device, enabled: bool):
    """bfloat16 autocast on CUDA/CPU when enabled (MPS: float16); a no-op otherwise."""
    if not enabled:
        return nullcontext()
    dtype = torch.float16 if device.type == "mps" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def centre_slice(x: torch.Tensor) -> torch.Tensor:
    """The middle channel of (B, C, S, S) as (B, 1, S, S): the slice a model with neighbouring
    slices as input channels reconstructs (C odd; C = 1 returns ``x``)."""
    c = x.shape[1]
    return x if c == 1 else x[:, c // 2 : c // 2 + 1]


def target_of(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """What the reconstruction ``x_hat`` is compared with: ``x`` itself, or its middle slice when
    the model reconstructs one slice of a stack of neighbours."""
    return x if x.shape[1] == x_hat.shape[1] else centre_slice(x)


def input_gradients(
    network: torch.nn.Module, x: torch.Tensor, likelihood_log_std: float = 0.0, amp: bool = False
) -> tuple[torch.Tensor, ...]:
    """Signed input gradients of the KL and Rec terms, with z = mu.

    Returns (dKL/dx, dRec/dx, KL (B,), Rec (B,), per-pixel Rec NLL, x_hat); gradients have the
    shape of x (B, C, S, S), the NLL and x_hat that of the output (B, C_out, S, S), all in x's
    dtype. dKL/dx needs the encoder only.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        with autocast_for(x.device, amp):
            mu, log_std = network.encode(x)
        mu, log_std = mu.to(x.dtype), log_std.to(x.dtype)
        kl = kl_per_sample(mu, log_std)
        (g_kl,) = torch.autograd.grad(kl.sum(), x, retain_graph=True)
        with autocast_for(x.device, amp):
            x_hat = network.decode(mu)
        x_hat = x_hat.to(x.dtype)
        rec_px = gaussian_nll(target_of(x, x_hat), x_hat, likelihood_log_std)
        rec = rec_px.flatten(1).sum(dim=1)
        (g_rec,) = torch.autograd.grad(rec.sum(), x)
    return g_kl, g_rec, kl.detach(), rec.detach(), rec_px.detach(), x_hat.detach()


def elbo_input_gradient(
    network: torch.nn.Module, x: torch.Tensor, likelihood_log_std: float = 0.0, amp: bool = False
) -> torch.Tensor:
    """dELBO/dx = d(KL + Rec)/dx with z = mu, shape and dtype of x (B, C, S, S): the sum of the
    two gradients of :func:`input_gradients`, from one backward pass instead of two (what a
    restoration step needs)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        with autocast_for(x.device, amp):
            mu, log_std = network.encode(x)
            x_hat = network.decode(mu)
        mu, log_std, x_hat = mu.to(x.dtype), log_std.to(x.dtype), x_hat.to(x.dtype)
        kl = kl_per_sample(mu, log_std)
        rec = gaussian_nll(target_of(x, x_hat), x_hat, likelihood_log_std).flatten(1).sum(dim=1)
        (g_elbo,) = torch.autograd.grad((kl + rec).sum(), x)
    return g_elbo


def score_batch(
    network: torch.nn.Module,
    x: torch.Tensor,
    likelihood_log_std: float = 0.0,
    kernel: torch.Tensor | None = None,
    kl_grad_scale: float = 1.0,
    amp: bool = False,
    smoothgrad: bool = True,
    restoration: bool = True,
) -> dict[str, torch.Tensor]:
    """Every score of a batch of slices.

    Gradients are per sample although taken from summed losses, because no layer couples the
    samples of a batch: dKL/dx comes from one backward pass through the encoder only, dRec/dx from
    one pass through decoder and encoder, and dELBO/dx is their sum (linearity), so a slice's maps
    never depend on its batch-mates. The paper's per-batch min-max of |dKL/dx| in Combi is replaced
    by dividing by ``kl_grad_scale`` (the model's calibrated healthy scale, or 1).

    Args:
        network: a VAE with ``encode`` / ``decode``, in eval mode.
        x: (B, C, S, S) float32 inputs in model space (C = 1, or 2k+1 slices for a model with
            k neighbouring slices on each side; the maps are of the middle slice).
        smoothgrad: compute ``SMOOTHGRAD_MAPS`` (``SMOOTHGRAD_N`` extra gradient passes).
        restoration: compute ``restoration`` (``RESTORATION_STEPS - 1`` extra gradient passes).
    Returns:
        maps (B, S, S) float32 for each of ``PIXEL_MAPS`` (without ``SMOOTHGRAD_MAPS`` /
        ``restoration`` unless asked) plus ``reconstruction``, and (B,) float32 for each of
        ``SLICE_SCORES``.
    """
    kernel = gaussian_kernel() if kernel is None else kernel
    x = x.detach().float()
    g_kl, g_rec, kl, rec, rec_px, x_hat = input_gradients(network, x, likelihood_log_std, amp)
    xc, gk_c, gr_c = centre_slice(x), centre_slice(g_kl), centre_slice(g_rec)
    with torch.no_grad():
        kl_grad = smooth(gk_c.abs(), kernel)
        out = {
            "rec_error": rec_px,
            "rec_error_smooth": smooth(rec_px, kernel),
            "sq_error": (xc - x_hat).pow(2),
            "kl_grad": kl_grad,
            "rec_grad": smooth(gr_c.abs(), kernel),
            "elbo_grad": smooth((gk_c + gr_c).abs(), kernel),
            "combi": kl_grad / kl_grad_scale * rec_px,
            "reconstruction": x_hat,
        }
    if smoothgrad:
        sum_kl, sum_elbo = gk_c.clone(), gk_c + gr_c
        for noise in _smoothgrad_noise(x.shape[-2:], x.device):
            gk, gr = input_gradients(network, x + noise, likelihood_log_std, amp)[:2]
            sum_kl += centre_slice(gk)
            sum_elbo += centre_slice(gk + gr)
        with torch.no_grad():
            out["kl_grad_sg"] = smooth((sum_kl / (SMOOTHGRAD_N + 1)).abs(), kernel)
            out["elbo_grad_sg"] = smooth((sum_elbo / (SMOOTHGRAD_N + 1)).abs(), kernel)
    if restoration:
        restored = x - RESTORATION_STEP * (g_kl + g_rec)
        for _ in range(RESTORATION_STEPS - 1):
            g_elbo = elbo_input_gradient(network, restored, likelihood_log_std, amp)
            restored = restored - RESTORATION_STEP * g_elbo
        with torch.no_grad():
            out["restoration"] = smooth((xc - centre_slice(restored)).abs(), kernel)
    out = {k: v[:, 0] for k, v in out.items()}
    out.update(kl=kl, rec=rec, elbo=kl + rec)
    return out


def _smoothgrad_noise(size: tuple[int, ...], device: torch.device) -> list[torch.Tensor]:
    """The fixed SmoothGrad noise patterns, each (1, 1, H, W), the same for every slice."""
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn((SMOOTHGRAD_N, 1, 1, *size), generator=gen) * SMOOTHGRAD_EPS
    return list(noise.to(device))
