"""Training plots: learning curves and attention heatmaps (PNG, matplotlib's Agg backend,
so no display is needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def training_curves(history: list[dict], primary: str, path: Path, title: str) -> Path:
    """Training loss and validation loss/metric per epoch, two panels."""
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(epochs, [h["valid"][primary] for h in history], "o-", color="tab:green")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel(f"valid {primary}")
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def token_attention(rows: list[tuple[list[str], list[float], str]], path: Path, title: str) -> Path:
    """One strip per text, each token written in its cell, shaded by its pooling weight.
    rows: (tokens, weights, caption)."""
    width = max(len(t) for t, _, _ in rows)
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(8, 0.75 * width), 0.8 * len(rows) + 0.8),
                             squeeze=False)
    for ax, (tokens, weights, caption) in zip(axes[:, 0], rows):
        top = max(max(weights), 1e-6)
        ax.imshow([weights], aspect="auto", cmap="Reds", vmin=0, vmax=top)
        for i, (tok, w) in enumerate(zip(tokens, weights)):
            ax.text(i, 0, tok, ha="center", va="center", fontsize=7,
                    color="white" if w > 0.6 * top else "black")
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(caption, fontsize=8, loc="left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def alignment(items: list[tuple[list[str], list[str], list[list[float]]]], path: Path, title: str) -> Path:
    """Decoder-step x source-token attention matrices. items: (source tokens, output
    tokens, weights [len(output)][len(source)])."""
    fig, axes = plt.subplots(1, len(items), figsize=(3.2 * len(items), 3.6), squeeze=False)
    for ax, (src, out, w) in zip(axes[0], items):
        ax.imshow(w, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(src)), src, fontsize=8)
        ax.set_yticks(range(len(out)), out, fontsize=7)
        ax.set_xlabel("source")
    axes[0, 0].set_ylabel("output")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
