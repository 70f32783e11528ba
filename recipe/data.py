"""Prepare the data: `python -m recipe.data --config X.yaml` loads the corpus, tokenizes it, cuts shifted
blocks and prints the splits' summary.

The entry points a user knows live here: `prepare_data` (-> `PreparedData`) and `train_dataloader`.
`prepare_data` runs the data modules in order: `recipe.documents` (where documents come from, and the
hold-out), `recipe.tokens` (tokenize, cache, `TokenBlocks`, summaries) and, for a streamed train split,
`recipe.stream` (`PackedStream`, `StreamLoader`). Import anything else from the module that holds it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from datasets import Dataset, IterableDataset
from datasets.distributed import split_dataset_by_node
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from recipe.config import ConfigError, RunConfig, load_config
from recipe.documents import iter_texts, load_documents, local_files_identity, source_key
from recipe.stream import PackedStream, stream_identity, stream_loader
from recipe.tokenizer import get_tokenizer
from recipe.tokens import SplitSummary, TokenBlocks, format_summary, token_blocks

logger = logging.getLogger(__name__)


@dataclass
class PreparedData:
    tokenizer: PreTrainedTokenizerBase
    train: TokenBlocks | PackedStream  # a PackedStream when streaming, already split across ranks
    validation: TokenBlocks
    summary: dict[str, SplitSummary]  # "train" (all zeros when streaming) and "validation"
    source: str
    fingerprint: str = ""  # of the documents of both splits (a stream: its source, files and shards)
    files: str | None = None  # local files' content (`documents.files_identity`); None: not local files


def prepare_data(
    cfg: RunConfig,
    main_process_first: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    rank: int = 0,
    world_size: int = 1,
) -> PreparedData:
    """Load and tokenize both splits. Pass `accelerator.local_main_process_first` (a cache on each node's
    disk: each node prepares once) or `accelerator.main_process_first` (one cache on a filesystem every node
    shares), so one process does the work and the others read its caches. `rank`/`world_size` only split a
    streamed train set; a map-style train set is sharded by the DataLoader that accelerate prepares."""
    cfg.validate()
    with main_process_first():
        splits, source, corpus_id = load_documents(cfg)
        tokenizer = get_tokenizer(cfg, corpus_id, lambda: iter_texts(splits["train"]))
        if isinstance(splits["train"], IterableDataset):
            # No datasets shuffle: its buffer reads ahead, and what it holds is lost on a resume.
            shards = splits["train"].num_shards
            if world_size > 1 and shards % world_size and rank == 0:
                logger.warning(
                    "The stream has %d shards (files), which %d processes do not divide: every process reads "
                    "all of it and keeps 1 document in %d. Split the data into a multiple of %d files (or run "
                    "on a process count that divides %d) to read each shard once.",
                    shards, world_size, world_size, world_size, shards,
                )  # fmt: skip
            docs = split_dataset_by_node(splits["train"], rank=rank, world_size=world_size)
            identity = stream_identity(cfg, splits["train"])
            train = PackedStream(docs, tokenizer, cfg.block_size, cfg.seed, identity)
            train_summary = SplitSummary(0, 0, 0, 0, 0)
            fingerprint = None
        else:
            train, train_summary = token_blocks(
                splits["train"], tokenizer, cfg, "train", source_key(cfg, "train")
            )
            fingerprint, identity = _content_fingerprint(splits["train"], train_summary), None
        validation, summary = token_blocks(
            splits["validation"], tokenizer, cfg, "validation", source_key(cfg, "validation")
        )
    summaries = {"train": train_summary, "validation": summary}
    # What a resume compares: the content, never paths, mtimes or cache keys (another node's copy of the
    # same files, or the corpus extracted again, is the same data). A stream: its source's identity.
    fingerprint = Hasher.hash([fingerprint or identity, _content_fingerprint(splits["validation"], summary)])
    files = local_files_identity(cfg)  # the sampled documents above miss a rewrite elsewhere in a file
    return PreparedData(tokenizer, train, validation, summaries, source, fingerprint, files)


def _content_fingerprint(docs: Dataset, summary: SplitSummary) -> str:
    """The split's documents and bytes, and the text of a few documents spread over it: the content, apart
    from the tokenizer (compared on its own)."""
    n = len(docs)
    picks = sorted({0, n // 3, 2 * n // 3, max(n - 1, 0)}) if n else []
    return Hasher.hash([summary.documents, summary.bytes, [docs[i]["text"] for i in picks]])


def train_dataloader(data: PreparedData, cfg: RunConfig, pin_memory: bool = False) -> DataLoader:
    """The training DataLoader: full batches only (fixed shapes, equal work on every process).

    A map-style split: a shuffling DataLoader, for `accelerator.prepare` to shard (seedable sampler) and
    `skip_first_batches` to resume. A stream (already split across processes): a `StreamLoader`, which
    accelerate must not prepare; resume it with `load_state_dict`."""
    kwargs = {
        "batch_size": cfg.per_device_train_batch_size,
        "drop_last": True,
        "num_workers": cfg.dataloader_num_workers,
        "pin_memory": pin_memory,
    }
    if isinstance(data.train, PackedStream):
        return stream_loader(data.train, cfg, **kwargs)
    return DataLoader(data.train, shuffle=True, **kwargs)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
        data = prepare_data(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"source: {data.source}")
    print(
        f"tokenizer: {data.tokenizer.name_or_path} ({len(data.tokenizer)} tokens, eos {data.tokenizer.eos_token!r})"
    )
    print(f"block_size: {cfg.block_size}")
    print(format_summary(data.summary))
    print(f"prepared in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
