"""Scoring a model along a run and at its end: the held-out loss, perplexity, bits per byte and next-token
accuracy (`evaluate`), and HellaSwag for the run (`hellaswag_items`, `score_hellaswag`; the task itself, its
data and lm-evaluation-harness's scoring are in recipe/hellaswag.py, which `python -m recipe.evaluate` uses)."""

from __future__ import annotations

import functools
import inspect

import torch
from accelerate import Accelerator

from recipe import hellaswag
from recipe.config import RunConfig
from recipe.metrics import bits_per_byte, perplexity


@functools.cache
def takes_token_scores(model_class: type) -> bool:
    """Whether the model's forward has our chunked evaluation entry (ours, also loaded as a folder's own code)."""
    return "token_scores" in inspect.signature(model_class.forward).parameters


def token_scores(model, input_ids: torch.Tensor, shift_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(log-probability of each target, whether it is the argmax), both (B, T), over all of the head's rows
    (as lm-evaluation-harness scores a model); 0 and False where the target is -100. The one entry every
    evaluation scores through: the held-out loss and accuracy, HellaSwag and the downstream suite. Ours
    computes them a chunk of tokens at a time from the hidden states (`token_scores=True`: no (B, T, V)
    logits); another model's logits are scored whole."""
    from recipe.checkpoint import plain_model

    if takes_token_scores(type(plain_model(model))):
        out = model(input_ids=input_ids, shift_labels=shift_labels, token_scores=True, use_cache=False)
        return out.token_logprobs, out.token_correct
    logits = model(input_ids=input_ids, use_cache=False).logits  # (B, T, V)
    keep = shift_labels.ne(-100)
    nll = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), shift_labels.flatten(), reduction="none"
    ).view_as(shift_labels)
    correct = logits.argmax(-1).eq(shift_labels) & keep
    return torch.where(keep, -nll, 0.0), correct


@torch.no_grad()
def evaluate(model, dataloader, accelerator: Accelerator, bytes_per_token: float) -> dict[str, float]:
    """Token-weighted loss and next-token accuracy over all processes (gather_for_metrics drops the padding
    duplicates), and how many blocks were scored, over all of the head's rows as every evaluation scores
    (`token_scores`: chunked, no (B, T, V) logits). No KV cache: nothing is generated."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # nll, correct, count, blocks
    for batch in dataloader:
        labels = batch["shift_labels"]  # (B, T)
        logprobs, correct = token_scores(model, batch["input_ids"], labels)
        mask = labels.ne(-100)
        rows = [-logprobs.sum(1), correct.sum(1), mask.sum(1), torch.ones_like(mask[:, 0])]
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


def hellaswag_items(
    cfg: RunConfig, accelerator: Accelerator, tokenizer, config
) -> list[hellaswag.Item] | None:
    """HellaSwag's items, tokenised once, or None when it is off. Fetched once per node, before step 1, so a
    missing source stops the run before anything is written."""
    if not cfg.hellaswag:
        return None
    with accelerator.local_main_process_first():
        dataset = hellaswag.load_hellaswag(cfg.cache_dir, cfg.hellaswag_path)
    return hellaswag.encode_items(dataset, tokenizer, hellaswag.context_length(config, tokenizer))


def score_hellaswag(model, items: list[hellaswag.Item], cfg: RunConfig, final: bool, tokenizer) -> dict[str, float]:  # fmt: skip
    """The fixed subset along the way, every item at the end (a compiled model runs eagerly: hellaswag.score),
    over the logits `python -m recipe.evaluate` scores the saved folder's (hellaswag.scored_vocab)."""
    subset = items if final else hellaswag.evenly_spaced(items, cfg.hellaswag_items)
    vocab = hellaswag.scored_vocab(model, tokenizer)
    return hellaswag.metrics(hellaswag.score(model, subset, cfg.hellaswag_batch_size, vocab_size=vocab))
