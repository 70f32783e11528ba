"""The scoring loop: every choice's log-likelihood, then acc and acc_norm, as lm-evaluation-harness scores them.

A choice's log-likelihood is the sum of its continuation tokens' log-probabilities, each over all of the head's
rows (padded rows included, as lm-eval's HFLM log-softmaxes over all `config.vocab_size` logits), from
`recipe.scoring.token_scores`, the one entry every evaluation scores through.

Fast where lm-eval's results cannot change:
- the sequences of every task go into one list, longest first, and a batch is padded on the right to its
  longest row only (a causal model's padding after the scored positions cannot change them: no mask);
- a choice whose whole token sequence begins another choice's of the same question (a continuation that is
  a prefix of another, or a duplicate) is read from that row: in a causal model the positions it scores see
  exactly the same tokens there. Choices that only share the context are not merged: their targets sit at
  the same positions with different tokens, and token_scores reads one target per position.

Sharded: the batches go round the processes (process r scores batches r, r + W, ...), and the log-likelihoods
are summed over processes, so any number of processes gives the 1-process result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from recipe.config import ConfigError
from recipe.downstream.data import EncodedTask
from recipe.scoring import token_scores


@dataclass
class Row:
    tokens: list[int]  # the row's whole sequence; its input is tokens[:-1], position t predicts tokens[t + 1]
    reads: list[tuple[int, int, int]]  # (sequence index, start, stop): a choice's positions in this row


def rows_of(tasks: list[EncodedTask]) -> tuple[list[Row], int]:
    """The forward rows for every choice of every item, longest first, and how many sequences there are.
    Sequences are numbered task by task, item by item, choice by choice."""
    rows, index = [], 0
    for encoded in tasks:
        for item in encoded.items:
            mine: list[Row] = []
            for j in sorted(range(len(item.sequences)), key=lambda j: -len(item.sequences[j][0])):
                tokens, n_scored = item.sequences[j]
                # A shorter choice is read from a kept row only if its whole sequence begins that row's.
                home = next((r for r in mine if r.tokens[: len(tokens)] == tokens), None)
                if home is None:
                    home = Row(tokens, [])
                    mine.append(home)
                end = len(tokens) - 1  # the choice's own input length: its targets are the last n_scored
                home.reads.append((index + j, end - n_scored, end))
            rows.extend(mine)
            index += len(item.sequences)
    rows.sort(key=lambda r: -len(r.tokens))  # stable: the order is fixed, so every process agrees
    return rows, index


@torch.no_grad()
def loglikelihoods(model, tasks: list[EncodedTask], batch_size: int = 32, progress: bool = False) -> list[torch.Tensor]:  # fmt: skip
    """Per task, an (items, choices) float64 tensor of log-likelihoods (-inf where an item has fewer choices).

    Every process must call it (a collective). A compiled model runs eagerly here (`force_eager`: the lengths
    vary, and recompiling for them would cost more than the forwards), inside its wrappers."""
    from accelerate import PartialState
    from accelerate.utils import reduce
    from tqdm.auto import tqdm

    if not tasks or not any(t.items for t in tasks):
        raise ConfigError("downstream: no items to score")
    state = PartialState()
    device = state.device
    rows, count = rows_of(tasks)
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    mine = batches[state.process_index :: state.num_processes]
    rounds = math.ceil(len(batches) / state.num_processes)
    values = torch.zeros(count, dtype=torch.float64)
    was_training = model.training
    model.eval()
    for r in tqdm(range(rounds), desc="downstream", disable=not (progress and state.is_main_process), leave=False):  # fmt: skip
        # A process with no batch left scores the first one again and drops it: every process runs the same
        # number of forwards, which FSDP (a gather per layer and forward) needs.
        batch = mine[r] if r < len(mine) else batches[0]
        length = max(len(row.tokens) for row in batch) - 1  # padded to the longest input in the batch
        input_ids = torch.zeros(len(batch), length, dtype=torch.long)
        labels = torch.full((len(batch), length), -100, dtype=torch.long)
        for b, row in enumerate(batch):
            n = len(row.tokens) - 1
            input_ids[b, :n] = torch.tensor(row.tokens[:-1])
            labels[b, :n] = torch.tensor(row.tokens[1:])  # (B, T): every position's next token
        with torch.compiler.set_stance("force_eager"):
            logprobs, _ = token_scores(model, input_ids.to(device), labels.to(device))  # (B, T) fp32
        if r < len(mine):
            logprobs = logprobs.cpu()
            for b, row in enumerate(batch):
                for index, start, stop in row.reads:
                    values[index] = logprobs[b, start:stop].double().sum()
    model.train(was_training)
    if state.num_processes > 1:  # each sequence is non-zero on one process only: the sum is exact
        values = reduce(values.to(device), "sum").cpu()
    out, start = [], 0
    for t in tasks:
        width = max(len(item.sequences) for item in t.items)
        table = torch.full((len(t.items), width), -math.inf, dtype=torch.float64)
        for i, item in enumerate(t.items):
            table[i, : len(item.sequences)] = values[start : start + len(item.sequences)]
            start += len(item.sequences)
        out.append(table)
    return out


def task_result(encoded: EncodedTask, logliks: torch.Tensor) -> dict[str, Any]:
    """acc (and acc_norm where lm-eval reports it) with their standard errors, from (items, choices)
    log-likelihoods: argmax of the sum, and of the sum per character of the choice (the first wins a tie,
    as numpy's argmax in lm-eval)."""
    labels = torch.tensor([item.label for item in encoded.items])
    chars = torch.full(logliks.shape, 1.0, dtype=torch.float64)
    for i, item in enumerate(encoded.items):
        chars[i, : len(item.choice_chars)] = torch.tensor(item.choice_chars, dtype=torch.float64)
    n = len(encoded.items)

    def mean_and_stderr(hits: torch.Tensor) -> tuple[float, float]:  # lm-eval's: sample std over sqrt(n)
        hits = hits.double()
        return float(hits.mean()), float(hits.std() / math.sqrt(n)) if n > 1 else float("nan")

    per_item = [row[: len(item.sequences)].tolist() for row, item in zip(logliks, encoded.items)]
    result: dict[str, Any] = {"items": n, "logliks": per_item}
    result["acc"], result["acc_stderr"] = mean_and_stderr(logliks.argmax(1) == labels)
    if encoded.task.acc_norm:
        result["acc_norm"], result["acc_norm_stderr"] = mean_and_stderr((logliks / chars).argmax(1) == labels)
    return result


def score(model, tasks: list[EncodedTask], batch_size: int = 32, progress: bool = False) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Every task's result (`task_result`), by task name, from one pass over all their sequences."""
    logliks = loglikelihoods(model, tasks, batch_size, progress)
    return {t.task.name: task_result(t, values) for t, values in zip(tasks, logliks)}
