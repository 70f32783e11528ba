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
    """Loss against steps; with HellaSwag scores in `rows`, a second panel of acc_norm beside it."""
    plt = _pyplot()
    train = full_windows([r for r in rows if "loss" in r])
    evals = [r for r in rows if "eval_loss" in r]
    scores = [r for r in rows if "eval_hellaswag_acc_norm" in r]
    fig, axes = plt.subplots(1, 2 if scores else 1, figsize=(13 if scores else 7, 4.5), squeeze=False)
    ax = axes[0, 0]
    if train:
        ax.plot(*zip(*train), label="train")
    # Along the way a fixed subset, at the end the whole split: two series, not one line with a kink.
    subset = [r for r in evals if r.get("eval_whole") is False]
    whole = [(r["step"], r["eval_loss"]) for r in evals if r.get("eval_whole") is not False]
    if subset:
        points = [(r["step"], r["eval_loss"]) for r in subset]
        ax.plot(*zip(*points), "o-", label=f"validation, first {subset[0].get('eval_blocks', '?'):,} blocks")
    if whole:
        ax.plot(
            *zip(*whole), "s" if subset else "o-", label="validation, whole split" if subset else "validation"
        )
    if vocab_size:
        ax.axhline(math.log(vocab_size), color="grey", ls=":", label=f"random guess, ln {vocab_size}")
    ax.set(xlabel="optimizer step", ylabel="loss (nats per token)", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if scores:
        plot_hellaswag(axes[0, 1], scores)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def full_windows(rows: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, loss) of the rows whose loss is a mean over a whole logging window: the last window of a run (or
    the first after a resume) may hold a single step, a spike on a curve of means. Rows logged before
    `window_steps` was recorded count as whole."""
    longest = max((r.get("window_steps", 0) for r in rows), default=0)
    return [(r["step"], r["loss"]) for r in rows if r.get("window_steps", longest) == longest]


def plot_hellaswag(ax, rows: list[dict[str, Any]]) -> None:
    """acc_norm per evaluation: the subset along the way and the whole split at the end as separate series."""
    from recipe.downstream.tasks import TASKS

    GPT2_124M, CHANCE = TASKS["hellaswag"].gpt2, 0.25  # noqa: N806  (HellaSwag: four endings)

    for items in sorted({r["eval_hellaswag_items"] for r in rows}):
        points = [
            (r["step"], r["eval_hellaswag_acc_norm"]) for r in rows if r["eval_hellaswag_items"] == items
        ]
        ax.plot(*zip(*points), "o-" if len(points) > 1 else "s", label=f"{items:,} items")
    ax.axhline(
        GPT2_124M["acc_norm"], color="tab:red", ls="--", label=f"GPT-2 124M, {GPT2_124M['acc_norm']:.4f}"
    )
    ax.axhline(CHANCE, color="grey", ls=":", label=f"chance, {CHANCE:.2f}")
    ax.set(xlabel="optimizer step", ylabel="acc_norm", title="HellaSwag, zero-shot")
    ax.grid(alpha=0.3)
    ax.legend()


def plot_lr(steps: list[int], lrs: list[float], path: str | Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, lrs)
    ax.set(xlabel="optimizer step", ylabel="learning rate", title="Learning-rate schedule")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
