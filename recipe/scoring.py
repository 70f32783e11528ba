"""Scoring a model along a run and at its end: the held-out loss, perplexity, bits per byte and next-token
accuracy (`evaluate`), and the per-target log-probabilities every evaluation scores through (`token_scores`;
the downstream tasks, recipe/downstream/, use it too)."""

from __future__ import annotations

import torch
from accelerate import Accelerator

from recipe.metrics import bits_per_byte, perplexity


def token_scores(model, input_ids: torch.Tensor, shift_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(log-probability of each target, whether it is the argmax), both (B, T), over all of the head's rows
    (as lm-evaluation-harness scores a model); 0 and False where the target is -100. The one entry every
    evaluation scores through: the held-out loss and accuracy, HellaSwag and the downstream suite."""
    logits = model(input_ids=input_ids, use_cache=False).logits  # (B, T, V)
    keep = shift_labels.ne(-100)
    nll = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), shift_labels.flatten(), reduction="none"
    ).view_as(shift_labels)
    correct = logits.argmax(-1).eq(shift_labels) & keep
    return torch.where(keep, -nll, 0.0), correct


@torch.no_grad()
def evaluate(model, dataloader, accelerator: Accelerator, bytes_per_token: float, vocab: int) -> dict[str, float]:  # fmt: skip
    """Token-weighted loss and next-token accuracy over all processes (gather_for_metrics drops the padding
    duplicates), and how many blocks were scored, over the tokenizer's `vocab` ids (not the padded rows of
    the head). No KV cache: nothing is generated."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # nll, correct, count, blocks
    for batch in dataloader:
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits[..., :vocab]  # (B, T, V)
        labels = batch["shift_labels"]  # (B, T)
        nll = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), reduction="none"
        )
        mask = labels.ne(-100)
        correct = logits.argmax(-1).eq(labels) & mask
        rows = [(nll.view_as(labels) * mask).sum(1), correct.sum(1), mask.sum(1), torch.ones_like(mask[:, 0])]
        totals += accelerator.gather_for_metrics(torch.stack(rows, 1).double()).sum(
            0
        )  # (B * processes, 4) -> (4,)
    model.train()
    nll, correct, count, blocks = totals.tolist()
    loss = nll / max(count, 1)
    return {
        "eval_loss": loss,
        "perplexity": perplexity(loss),
        "eval_bits_per_byte": bits_per_byte(loss, bytes_per_token),
        "eval_accuracy": correct / max(count, 1),
        "eval_blocks": int(blocks),
    }
