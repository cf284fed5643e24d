"""The paper's sample-level FashionMNIST experiment: train the MLP VAE on nine classes, score the
test set, held-out class = anomalous; AUROC of the Rec, KL and ELBO terms per image.

Data: the Debian package ``dataset-fashion-mnist`` (gzip idx files under
``/usr/share/datasets/fashion-mnist``), or any folder with the same four files.
"""

from __future__ import annotations

import gzip
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}
#: the paper's AUROC (Rec, KL, ELBO) by held-out class, default settings (METHOD.md)
PAPER_AUROC: dict[int, tuple[float, float, float]] = {
    0: (0.58, 0.57, 0.59),
    1: (0.75, 0.49, 0.73),
    2: (0.60, 0.48, 0.58),
    3: (0.66, 0.48, 0.63),
    4: (0.57, 0.57, 0.58),
    5: (0.77, 0.42, 0.72),
    6: (0.52, 0.34, 0.48),
    7: (0.54, 0.62, 0.58),
    8: (0.92, 0.73, 0.92),
    9: (0.75, 0.87, 0.82),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read a (gzip) idx file into a uint8 array (images (N, 28, 28), labels (N,))."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise InputError(f"cannot read {p}: {exc}") from exc
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise InputError(f"{p.name} is not an unsigned-byte idx file")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise InputError(f"{p.name} is truncated: {data.size} values for shape {dims}")
    return data.reshape(dims)


def load_fashion_mnist(root: str | os.PathLike = DEFAULT_ROOT) -> dict[str, np.ndarray]:
    """The four arrays of FashionMNIST (``train_x``, ``train_y``, ``test_x``, ``test_y``)."""
    root = Path(root)
    missing = [f for f in FILES.values() if not (root / f).is_file()]
    if missing:
        raise InputError(
            f"FashionMNIST not found in {root} (missing {', '.join(missing)}); on Debian: "
            "apt-get install dataset-fashion-mnist"
        )
    return {k: read_idx(root / f) for k, f in FILES.items()}


@dataclass
class FashionConfig:
    """The paper's FashionMNIST settings: MLP VAE 784-400-z, Gaussian likelihood with fixed
    log-std, Adam, batch 128, 25 epochs."""

    z_dim: int = 20
    hidden: int = 400
    likelihood_log_std: float = 0.0
    lr: float = 1e-3
    batch_size: int = 128
    epochs: int = 25
    seed: int = 0
    max_train: int | None = None  # cap on training images (None: all 54,000), for quick runs


def sample_scores(network, images, log_std: float, batch_size: int = 1000) -> dict[str, np.ndarray]:
    """Per-image Rec, KL and ELBO terms (nats; z = mu) of (N, 1, 28, 28) float tensors."""
    import torch

    from ..scoring import gaussian_nll, kl_per_sample

    rec, kl = [], []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size]
            mu, ls = network.encode(x)
            rec.append(gaussian_nll(x, network.decode(mu), log_std).flatten(1).sum(1))
            kl.append(kl_per_sample(mu, ls))
    r, k = torch.cat(rec).numpy(), torch.cat(kl).numpy()
    return {"rec": r, "kl": k, "elbo": r + k}


def run_heldout_class(
    data: dict[str, np.ndarray],
    held_out: int,
    cfg: FashionConfig,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Train on the nine other classes, score the test set; AUROC of each sample score with the
    held-out class as positive (1,000 anomalous vs 9,000 normal)."""
    import torch
    from sklearn.metrics import roc_auc_score

    from ..models.vae import MLPVAE
    from ..training.loop import negative_elbo

    if held_out not in range(10):
        raise InputError(f"held-out class must be 0..9, not {held_out}")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    keep = data["train_y"] != held_out
    x = torch.from_numpy(data["train_x"][keep].astype(np.float32) / 255.0)[:, None]
    if cfg.max_train is not None:
        x = x[: cfg.max_train]
    net = MLPVAE(hidden=cfg.hidden, z_dim=cfg.z_dim)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    steps_per_epoch = (len(x) + cfg.batch_size - 1) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    t0 = time.perf_counter()
    step = 0
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), cfg.batch_size):
            loss, _, _ = negative_elbo(
                net, x[order[i : i + cfg.batch_size]], cfg.likelihood_log_std
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if progress and step % 50 == 0:
                progress(step, total)
    net.eval()
    test = torch.from_numpy(data["test_x"].astype(np.float32) / 255.0)[:, None]
    scores = sample_scores(net, test, cfg.likelihood_log_std)
    truth = data["test_y"] == held_out
    auroc = {k: float(roc_auc_score(truth, v)) for k, v in scores.items()}
    return {
        "held_out": held_out,
        "auroc": auroc,
        "paper": dict(zip(("rec", "kl", "elbo"), PAPER_AUROC[held_out], strict=True)),
        "config": asdict(cfg),
        "train_images": len(x),
        "seconds": time.perf_counter() - t0,
    }


def markdown_table(rows: list[dict]) -> str:
    """The AUROC table next to the paper's values."""
    lines = [
        "| held-out class | setting | Rec | KL | ELBO | paper Rec | paper KL | paper ELBO |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["config"]
        setting = f"z={c['z_dim']}, log-std={c['likelihood_log_std']:g}, {c['epochs']} ep"
        a, p = r["auroc"], r["paper"]
        default = c["z_dim"] == 20 and c["likelihood_log_std"] == 0 and c["hidden"] == 400
        paper = " | ".join(f"{p[k]:.2f}" if default else "–" for k in ("rec", "kl", "elbo"))
        lines.append(
            f"| {r['held_out']} | {setting} | {a['rec']:.2f} | {a['kl']:.2f} | "
            f"{a['elbo']:.2f} | {paper} |"
        )
    return "\n".join(lines)
