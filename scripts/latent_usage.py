"""How many latent dimensions a model uses on a healthy source it did not train on.

    python scripts/latent_usage.py t1-brain MODEL_FOLDER ... [--source cat12-t1] [--cache DIR]

For every model: the mean KL divergence per latent dimension (nats, over the source's axial
brain slices, z from the encoder's mean and variance), and how many dimensions exceed 0.01 and
0.1 nats. A dimension whose posterior equals the prior (KL near 0) carries no information about
the slice; KL-Grad can only see anatomy that reaches the active dimensions. The source is moved
onto the ICBM 2009c grid as training moves it (``training.builder.on_reference_grid``).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from napari_vaeloc.models.store import load_model
from napari_vaeloc.preprocess import volume_to_slices
from napari_vaeloc.training.builder import on_reference_grid
from napari_vaeloc.training.datasets import load_template_brain


def kl_per_dimension(network: torch.nn.Module, slices: torch.Tensor) -> np.ndarray:
    """Mean KL(q(z|x) || N(0, I)) per latent dimension over ``slices`` (N, 1, S, S), nats."""
    with torch.no_grad():
        mu, log_std = network.encode(slices)
    kl = 0.5 * (mu**2 + torch.exp(2 * log_std) - 1 - 2 * log_std)
    return kl.flatten(1).mean(0).numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", help="bundled model names or model folders")
    p.add_argument("--source", default="cat12-t1", help="a healthy template source name")
    p.add_argument("--cache", default=None, help="folder for the registered source")
    args = p.parse_args()
    torch.set_num_threads(1)
    volume, _ = on_reference_grid(args.source, *load_template_brain(args.source), args.cache)
    print(f"source {args.source}; model: dims with mean KL > 0.01 / > 0.1 nats, total KL")
    for name in args.models:
        model = load_model(name)
        card = model.card
        ms = volume_to_slices(
            volume.data, volume.affine, volume.spacing, card.axis, card.image_size,
            card.normalisation,
        )  # fmt: skip
        x = ms.images[torch.from_numpy(np.flatnonzero(ms.foreground))]
        kl = kl_per_dimension(model.network, x)
        print(f"{card.name}: {(kl > 0.01).sum()} / {(kl > 0.1).sum()}, {kl.sum():.1f} nats")


if __name__ == "__main__":
    main()
