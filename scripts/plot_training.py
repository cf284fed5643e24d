"""Plot the training and validation loss of the bundled models into docs/training_curves.png.

pip install matplotlib && python scripts/plot_training.py
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from napari_vaeloc.models.store import bundled_models, read_card

OUT = Path(__file__).resolve().parents[1] / "docs" / "training_curves.png"


def main() -> None:
    models = bundled_models()
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, (name, folder) in zip(axes[0], models.items(), strict=True):
        card = read_card(folder)
        hist = card.provenance.training["history"]
        steps = [h["step"] for h in hist]
        ax.plot(steps, [h["train_loss"] for h in hist], label="training (augmented)")
        ax.plot(steps, [h["val_loss"] for h in hist], label="validation (held-out slabs)")
        best = card.provenance.training["best_step"]
        ax.axvline(best, color="grey", ls=":", lw=1, label=f"kept: step {best}")
        minutes = hist[-1]["seconds"] / 60 if hist else 0
        ax.set_title(f"{name}: {hist[-1]['step'] if hist else 0} steps, {minutes:.0f} min")
        ax.set_xlabel("step (64 slices each)")
        ax.set_ylabel("negative ELBO (nats per slice)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT, dpi=110)
    print(OUT)


if __name__ == "__main__":
    main()
