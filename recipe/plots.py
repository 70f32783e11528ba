"""The two pictures a run leaves behind: loss against steps, and the learning-rate schedule."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def _pyplot():
    """matplotlib, imported when a picture is drawn (`make gpu-check` imports train.py where it is absent)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    return plt


def plot_loss(rows: list[dict[str, Any]], path: str | Path, vocab_size: int | None = None) -> None:
    plt = _pyplot()
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train")
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation")
    if vocab_size:
        ax.axhline(math.log(vocab_size), color="grey", ls=":", label=f"random guess, ln {vocab_size}")
    ax.set(xlabel="optimizer step", ylabel="loss (nats per token)", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_lr(steps: list[int], lrs: list[float], path: str | Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, lrs)
    ax.set(xlabel="optimizer step", ylabel="learning rate", title="Learning-rate schedule")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
