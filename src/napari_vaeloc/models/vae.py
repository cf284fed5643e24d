"""The two VAEs of the paper: a convolutional VAE for MRI slices and an MLP VAE for 28x28 images.

Both expose ``encode(x) -> (mu, log_std)`` and ``decode(z) -> x_hat`` so that scoring and
training treat them alike. Neither has batch-coupling layers, so per-sample input gradients can be
taken from one backward pass of a summed loss.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn


def default_widths(image_size: int) -> tuple[int, ...]:
    """Channel widths of the paper (16, 32, 64, 256 for 64x64), one stride-2 layer per halving
    from ``image_size`` down to 4x4."""
    n = round(math.log2(image_size / 4))
    if n < 1 or 4 * 2**n != image_size:
        raise ValueError(f"image_size must be 4 * 2**k with k >= 1, got {image_size}")
    paper = (16, 32, 64, 256)
    return paper[-n:] if n <= len(paper) else (16,) * (n - len(paper)) + paper


class ConvVAE(nn.Module):
    """Convolutional VAE of Zimmerer et al. 2019.

    Encoder: stride-2 4x4 convolutions ``in_channels -> widths[0] -> ... -> widths[-1]``
    (image_size -> 4), then a 4x4 convolution to ``2 * z_dim`` channels at 1x1 (mu, log-std).
    Decoder: the mirror with transposed convolutions to ``out_channels`` (default
    ``in_channels``; 1 for a model that sees neighbouring slices as extra input channels and
    reconstructs the middle one), no output activation. LeakyReLU, no bias, no normalisation
    layers.

    Shapes: x (B, C_in, S, S) -> mu, log_std (B, z_dim); z (B, z_dim) -> x_hat (B, C_out, S, S).
    """

    def __init__(
        self,
        image_size: int = 64,
        in_channels: int = 1,
        widths: tuple[int, ...] | None = None,
        z_dim: int = 256,
        out_channels: int | None = None,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        widths = tuple(widths) if widths is not None else default_widths(image_size)
        if 4 * 2 ** len(widths) != image_size:
            raise ValueError(
                f"{len(widths)} stride-2 layers take {image_size}x{image_size} to "
                f"{image_size / 2 ** len(widths):g}, not 4x4; "
                f"use {len(default_widths(image_size))} widths"
            )
        self.image_size, self.in_channels, self.widths, self.z_dim = (
            image_size,
            in_channels,
            widths,
            z_dim,
        )
        self.out_channels = out_channels
        enc: list[nn.Module] = []
        c = in_channels
        for w in widths:
            enc += [nn.Conv2d(c, w, 4, 2, 1, bias=False), nn.LeakyReLU()]
            c = w
        enc.append(nn.Conv2d(c, 2 * z_dim, 4, 1, 0, bias=False))
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.ConvTranspose2d(z_dim, widths[-1], 4, 1, 0, bias=False)]
        rev = [*list(widths[::-1]), out_channels]
        for a, b in itertools.pairwise(rev):
            dec += [nn.LeakyReLU(), nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False)]
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x).flatten(1)
        return h[:, : self.z_dim], h[:, self.z_dim :]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z[:, :, None, None])

    def config(self) -> dict:
        return {
            "type": "conv",
            "image_size": self.image_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "widths": list(self.widths),
            "z_dim": self.z_dim,
        }


class MLPVAE(nn.Module):
    """MLP VAE of the paper's FashionMNIST experiment: 784 -> 400 -> z (ReLU), decoder
    z -> 400 -> 784 with a sigmoid. Shapes: x (B, 1, H, W) -> mu, log_std (B, z_dim)."""

    def __init__(self, image_size: int = 28, hidden: int = 400, z_dim: int = 20) -> None:
        super().__init__()
        self.image_size, self.hidden, self.z_dim = image_size, hidden, z_dim
        d = image_size * image_size
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.ReLU())
        self.to_stats = nn.Linear(hidden, 2 * z_dim)
        self.decoder = nn.Sequential(
            nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, d), nn.Sigmoid()
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.to_stats(self.encoder(x))
        return h[:, : self.z_dim], h[:, self.z_dim :]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        s = self.image_size
        return self.decoder(z).view(-1, 1, s, s)

    def config(self) -> dict:
        return {
            "type": "mlp",
            "image_size": self.image_size,
            "hidden": self.hidden,
            "z_dim": self.z_dim,
        }


def build_model(config: dict) -> nn.Module:
    """Instantiate a VAE from its ``config()`` dictionary."""
    cfg = dict(config)
    kind = cfg.pop("type", None)
    if kind == "conv":
        if "widths" in cfg and cfg["widths"] is not None:
            cfg["widths"] = tuple(int(w) for w in cfg["widths"])
        return ConvVAE(**cfg)
    if kind == "mlp":
        return MLPVAE(**cfg)
    raise ValueError(f"unknown architecture type {kind!r}; expected 'conv' or 'mlp'")
