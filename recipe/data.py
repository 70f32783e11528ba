"""Load the corpus, tokenize it and cut shifted blocks: `python -m recipe.data --config X.yaml`.

Sources, in order of precedence: a Hub dataset (`dataset_name`), local files (`train_files`, optional
`validation_files`), else the default Shakespeare corpus (`recipe.corpus`). Plain text files are one document
per file; `.json`/`.jsonl`/`.parquet`/`.csv` files are read by the matching `datasets` builder, one document
per row of `text_column`. Without validation data, `validation_split_percentage` of the documents are held
out whole (seeded), so no document is in both splits; a stream holds out its first documents whose text
hashes into that share, and every process and DataLoader worker skips those texts by their hash.

Every document is followed by the eos token and a split is one token stream, stored once on disk (uint16
where the vocabulary fits, else uint32; one arrow row per document, memory-mapped). Blocks are cut at load
time as windows of block_size + 1 tokens that overlap by one: block k covers stream positions
[k*B, k*B + B], `input_ids` = its first B tokens and `shift_labels` = its last B. So every token after the
first is a target exactly once, and only the tail after the last full block is dropped (counted in the
summary). Nothing holds a whole split in memory, and no 32-bit offset spans a split.

Tokenizing is a `datasets` map over all cores, cached by fingerprint under `<cache_dir>/datasets` (written
under a temporary name and renamed): a rerun with the same inputs reads the cache instead of tokenizing
again, in this or any other process, whatever the block_size.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import glob
import hashlib
import inspect
import itertools
import logging
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from datasets import Dataset, Features, IterableDataset, List, Value, concatenate_datasets, load_dataset
from datasets.distributed import split_dataset_by_node
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader, get_worker_info
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import IterableDataset as TorchIterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerBase

from recipe import corpus
from recipe.config import ConfigError, RunConfig, available_cores, load_config
from recipe.tokenizer import get_tokenizer, tokenizer_fingerprint

logger = logging.getLogger(__name__)

BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}  # anything else: plain text
TEXT = Value("large_string")  # 64-bit offsets: no 2 GiB limit on the text in one arrow chunk
TEXT_FILE_FEATURES = Features({"text": TEXT, "path": Value("string"), "replaced": Value("int64")})
STREAM_VALIDATION_MAX_DOCUMENTS = 10_000  # a stream's hold-out: enough for a stable loss, not 5% of the web
STREAM_SHUFFLE_BUFFER = 10_000  # blocks
# A worker's state holds its shuffle buffer (~20 MB for 10,000 blocks of 1,024 uint16 tokens): it is sent to
# the loader every n batches, n chosen so that about this many bytes per batch are sent on average (torchdata
# sends a worker's state for a window of num_workers x (prefetch_factor + 1) + 1 batches around each snapshot
# step). A resume re-reads the batches since the last transfer; `consumed` counts lag by as many.
STREAM_STATE_BYTES_PER_BATCH = 1 << 20
TOKENIZE_BATCH_DOCUMENTS = 256  # per map batch and per written arrow chunk: bounds a tokenizer's memory
MIN_BYTES_PER_WORKER = 4 << 20  # less text than this tokenizes faster than a worker process starts
HOLD_OUT_BUCKETS = 1_000_000  # a document is held out when the hash of its text falls in the first share


@dataclass
class SplitSummary:
    documents: int
    bytes: int  # UTF-8 bytes of the documents' text (separators excluded)
    tokens: int  # including one eos separator per document
    blocks: int
    dropped_tokens: int  # the tail after the last full block

    @property
    def bytes_per_token(self) -> float:
        """Converts a loss per token into bits per byte: bpb = loss / ln(2) / bytes_per_token."""
        return self.bytes / self.tokens if self.tokens else float("nan")


@dataclass
class PreparedData:
    tokenizer: PreTrainedTokenizerBase
    train: TokenBlocks | PackedStream  # a PackedStream when streaming, already split across ranks
    validation: TokenBlocks
    summary: dict[str, SplitSummary]  # "train" (all zeros when streaming) and "validation"
    source: str
    fingerprint: str = ""  # of the documents of both splits (a stream: its source, files and shards)


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
        splits, source, corpus_id = _load_documents(cfg)
        tokenizer = get_tokenizer(cfg, corpus_id, lambda: _texts(splits["train"]))
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
            identity = _stream_identity(cfg, splits["train"])
            train = PackedStream(docs, tokenizer, cfg.block_size, cfg.seed, identity)
            train_summary = SplitSummary(0, 0, 0, 0, 0)
            fingerprint = None
        else:
            train, train_summary = _blocks(splits["train"], tokenizer, cfg, "train", _key(cfg, "train"))
            fingerprint, identity = _content_fingerprint(splits["train"], train_summary), None
        validation, summary = _blocks(
            splits["validation"], tokenizer, cfg, "validation", _key(cfg, "validation")
        )
    summaries = {"train": train_summary, "validation": summary}
    # What a resume compares: the content, never paths, mtimes or cache keys (another node's copy of the
    # same files, or the corpus extracted again, is the same data). A stream: its source's identity.
    fingerprint = Hasher.hash([fingerprint or identity, _content_fingerprint(splits["validation"], summary)])
    return PreparedData(tokenizer, train, validation, summaries, source, fingerprint)


# --- loading documents: every source ends as splits with one "text" column -------------------------------


def _content_fingerprint(docs: Dataset, summary: SplitSummary) -> str:
    """The split's documents and bytes, and the text of a few documents spread over it: the content, apart
    from the tokenizer (compared on its own)."""
    n = len(docs)
    picks = sorted({0, n // 3, 2 * n // 3, max(n - 1, 0)}) if n else []
    return Hasher.hash([summary.documents, summary.bytes, [docs[i]["text"] for i in picks]])


def _stream_identity(cfg: RunConfig, stream: IterableDataset) -> str:
    """What a saved stream position is a position in: the source, its files (names and sizes) and shard
    count. A resume into anything else is refused (`datasets` would place the position in other data)."""
    files = (
        [(str(p), p.stat().st_size) for p in _expand("train_files", cfg.train_files)]
        if cfg.train_files
        else []
    )
    source = [cfg.dataset_name, cfg.dataset_config_name, cfg.text_column, files, stream.num_shards]
    return Hasher.hash(source + [cfg.dataset_revision] if cfg.dataset_revision else source)


def _key(cfg: RunConfig, split: str) -> str:
    """The configuration key to name in an error about this split."""
    if split == "validation" and not cfg.validation_files and not cfg.dataset_name and cfg.train_files:
        return "validation_split_percentage"
    if cfg.dataset_name:
        return "dataset_name"
    return f"{split}_files" if cfg.train_files else "block_size"


def _load_documents(cfg: RunConfig) -> tuple[dict, str, str]:
    """({"train": ..., "validation": ...}, source description, train corpus id for the tokenizer cache)."""
    if cfg.dataset_name and (cfg.train_files or cfg.validation_files):
        raise ConfigError("dataset_name and train_files/validation_files are both set: use one source")
    if cfg.validation_files and not cfg.train_files:
        raise ConfigError(
            "validation_files is set but train_files is not: give both (or neither, for the default corpus)"
        )
    if cfg.dataset_name:
        splits, source = _hub_documents(cfg)
    elif cfg.train_files:
        splits, source = _local_documents(cfg)
    else:
        files = corpus.shakespeare_files(cfg.cache_dir)
        splits = {
            name: _text_files(paths, _cache(cfg), cfg.streaming and name == "train")
            for name, paths in files.items()
        }
        source = corpus.describe(cfg.cache_dir)
    splits = {name: _drop_blank(ds) for name, ds in splits.items()}
    train = splits["train"]
    if isinstance(train, Dataset):
        if len(train) == 0:
            raise ConfigError(f"{_key(cfg, 'train')}: the training corpus is empty (no document with text)")
        corpus_id = train._fingerprint
    else:  # a stream: identified by where it comes from
        corpus_id = Hasher.hash([cfg.dataset_name, cfg.dataset_config_name, cfg.train_files, cfg.text_column])
    if "validation" not in splits:
        splits["train"], splits["validation"] = _hold_out(train, cfg)
        corpus_id = Hasher.hash(
            [corpus_id, cfg.validation_split_percentage, cfg.seed, "held-out copies dropped"]
        )
        how = "by a hash of each text" if isinstance(train, IterableDataset) else f"seed {cfg.seed}"
        if isinstance(train, Dataset):
            copies = len(train) - len(splits["train"]) - len(splits["validation"])
            how += f"; {copies:,} copies of held-out texts dropped from training"
        source += f"; validation: {cfg.validation_split_percentage:g}% of the documents held out ({how})"
    if len(splits["validation"]) == 0:
        raise ConfigError(f"{_key(cfg, 'validation')}: the validation split is empty (no document with text)")
    return splits, source, corpus_id


def _hold_out(train: Dataset | IterableDataset, cfg: RunConfig) -> tuple[Dataset | IterableDataset, Dataset]:
    """Hold out whole documents: a seeded random share of a dataset; of a stream, the first documents whose
    text hashes into the share (read once, before any sharding), which training then skips by that hash."""
    pct = cfg.validation_split_percentage
    if isinstance(train, IterableDataset):
        known = (
            train.info.splits["train"].num_examples
            if train.info.splits and "train" in train.info.splits
            else 0
        )
        take = min(math.ceil(known * pct / 100), STREAM_VALIDATION_MAX_DOCUMENTS) if known else None
        validation = _stream_documents(cfg, take or STREAM_VALIDATION_MAX_DOCUMENTS, "train", pct / 100)
        # Every process and DataLoader worker drops the same documents, whatever shards it reads; a copy of
        # a held-out text is dropped too. Only these documents leave training, not the whole share.
        held = frozenset(_text_hash(t, cfg.seed) for t in _texts(validation))
        return train.filter(
            _not_held_out, input_columns="text", fn_kwargs={"held": held, "seed": cfg.seed}
        ), validation
    held = max(1, round(len(train) * pct / 100))
    if held >= len(train):
        raise ConfigError(
            f"validation_split_percentage: the training data has only {len(train)} document(s), so "
            "holding out whole documents would leave no training data; add documents or set validation_files"
        )
    split = train.train_test_split(test_size=held, seed=cfg.seed, shuffle=True)
    # As in a stream, a copy of a held-out text (boilerplate pages, mirrors) leaves training too.
    held_hashes = frozenset(_text_hash(t, cfg.seed) for t in _texts(split["test"]))
    kept = split["train"].filter(  # fingerprinted by the held-out split, not by pickling the set
        _not_held_out_batch,
        batched=True,
        input_columns="text",
        fn_kwargs={"held": held_hashes, "seed": cfg.seed},
        num_proc=_num_proc(cfg, split["train"]),
        new_fingerprint=_step(
            split["train"],
            _not_held_out_batch,
            split["test"]._fingerprint,
            inspect.getsource(_text_hash),
            cfg.seed,
        ),
        desc="Dropping copies of held-out texts",
    )
    return kept, split["test"]


def _text_hash(text: str, seed: int) -> int:
    key = seed.to_bytes(8, "little", signed=True)
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=key).digest(), "little")


def _is_held_out(text: str, share: float, seed: int) -> bool:
    """Whether a document's text hashes into the held-out `share`: the same answer in every process."""
    return _text_hash(text, seed) % HOLD_OUT_BUCKETS < share * HOLD_OUT_BUCKETS


def _not_held_out(text: str, held: frozenset[int], seed: int) -> bool:
    return _text_hash(text, seed) not in held


def _not_held_out_batch(texts: list[str], held: frozenset[int], seed: int) -> list[bool]:
    return [_text_hash(t, seed) not in held for t in texts]


def _local_documents(cfg: RunConfig) -> tuple[dict, str]:
    train_paths = _expand("train_files", cfg.train_files)
    splits = {
        "train": _files_dataset(train_paths, "train_files", cfg.text_column, _cache(cfg), cfg.streaming)
    }
    source = f"local files: {_list(cfg.train_files)} ({len(train_paths)} file(s))"
    if cfg.validation_files:
        val_paths = _expand("validation_files", cfg.validation_files)
        both = sorted({p.resolve() for p in train_paths} & {p.resolve() for p in val_paths})
        if both:
            raise ConfigError(
                f"validation_files: {both[0]} is also in train_files; the splits must not share a document"
            )
        splits["validation"] = _files_dataset(
            val_paths, "validation_files", cfg.text_column, _cache(cfg), False
        )
        source += f"; validation: {_list(cfg.validation_files)} ({len(val_paths)} file(s))"
    return splits, source


def _list(patterns: list[str]) -> str:
    return ", ".join(patterns) if len(patterns) <= 3 else f"{', '.join(patterns[:3])}, ..."


def _expand(key: str, patterns: list[str]) -> list[Path]:
    """Paths and glob patterns -> files, in the given order (each glob sorted), without duplicates."""
    files: dict[Path, None] = {}
    for pattern in patterns:
        matches = [Path(m) for m in sorted(glob.glob(os.path.expanduser(pattern), recursive=True))]
        matches = [m for m in matches if m.is_file()]
        if not matches:
            raise ConfigError(f"{key}: {pattern!r} matches no file")
        files.update(dict.fromkeys(matches))
    return list(files)


def _files_dataset(
    paths: list[Path], key: str, text_column: str, cache: str, streaming: bool
) -> Dataset | IterableDataset:
    """One dataset with a "text" column from files of any supported kinds, in the order given."""
    parts = []
    for builder, group in itertools.groupby(paths, key=lambda p: BUILDERS.get(p.suffix.lower())):
        group = list(group)
        if builder is None:
            parts.append(_text_files(group, cache, streaming))
            continue
        names = _list([str(p) for p in group])
        try:
            ds = load_dataset(
                builder,
                data_files=[str(p) for p in group],
                split="train",
                streaming=streaming,
                cache_dir=cache,
            )
        except Exception as err:  # malformed files surface as several library error types
            raise ConfigError(f"{key}: cannot read {names} as {builder}: {err}") from err
        parts.append(_text_column(ds, text_column, f"{key} ({names})"))
    if len(parts) == 1:
        return parts[0]
    # One string type for every kind of file, so that they concatenate. Only here: on a map-style dataset
    # the cast writes another copy of the text.
    return concatenate_datasets(
        [p if p.features and p.features["text"] == TEXT else p.cast_column("text", TEXT) for p in parts]
    )


def _text_files(paths: list[Path], cache: str, streaming: bool) -> Dataset | IterableDataset:
    """Plain text, one document per file. Undecodable bytes become U+FFFD, with a warning naming the file."""
    gen_kwargs = {"paths": [str(p) for p in paths]}
    if streaming:
        return IterableDataset.from_generator(
            _read_text_files, features=TEXT_FILE_FEATURES, gen_kwargs=gen_kwargs
        ).select_columns(["text"])
    # The generator's cache is keyed on the files' names, sizes and modification times, so an edit re-reads.
    stamps = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    fingerprint = Hasher.hash(
        ["text-files", inspect.getsource(_read_text_files), inspect.getsource(_decode), stamps]
    )
    ds = Dataset.from_generator(
        _read_text_files,
        features=TEXT_FILE_FEATURES,
        gen_kwargs=gen_kwargs,
        cache_dir=cache,
        fingerprint=fingerprint,
    )
    table = ds.data.table
    for path, replaced in zip(table["path"].to_pylist(), table["replaced"].to_pylist(), strict=True):
        if replaced:
            warnings.warn(
                f"{path}: {replaced} byte(s) are not valid UTF-8 and were replaced by U+FFFD",
                UnicodeWarning,
                stacklevel=2,
            )
    return ds.select_columns(["text"])


_ESCAPED = re.compile("[\udc80-\udcff]")  # surrogateescape's stand-ins for undecodable bytes


def _decode(data: bytes) -> tuple[str, int]:
    """UTF-8 text (errors="replace"), without BOM, with \\n line endings and no outer whitespace, and the
    number of undecodable bytes."""
    try:
        text, replaced = data.decode("utf-8"), 0
    except UnicodeDecodeError:
        replaced = len(_ESCAPED.findall(data.decode("utf-8", "surrogateescape")))
        text = data.decode("utf-8", "replace")
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n").strip(), replaced


def _read_text_files(paths: list[str]):
    for path in paths:
        text, replaced = _decode(Path(path).read_bytes())
        yield {"text": text, "path": path, "replaced": replaced}


def _text_column(ds: Dataset | IterableDataset, column: str, where: str) -> Dataset | IterableDataset:
    """Keep only `column`, renamed to "text", after checking it exists and holds strings."""
    columns = ds.column_names
    if columns is None:  # a stream without declared features: look at the first row
        columns = list(next(iter(ds), {}).keys())
    if column not in columns:
        raise ConfigError(
            f"text_column: {column!r} is not a column of {where}; it has: {', '.join(columns) or 'none'}"
        )
    feature = ds.features[column] if ds.features else None
    if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise ConfigError(f"text_column: {column!r} in {where} holds {feature}, not text")
    ds = ds.select_columns([column])
    return ds if column == "text" else ds.rename_column(column, "text")


def _hub_documents(cfg: RunConfig) -> tuple[dict, str]:
    name = cfg.dataset_name + (f" ({cfg.dataset_config_name})" if cfg.dataset_config_name else "")
    try:
        loaded = load_dataset(
            cfg.dataset_name, cfg.dataset_config_name, streaming=cfg.streaming, cache_dir=_cache(cfg),
            revision=cfg.dataset_revision,
        )  # fmt: skip
    except Exception as err:  # not found, offline, gated, bad config name...
        raise ConfigError(f"dataset_name: cannot load {name}: {err}") from err
    if "train" not in loaded:
        raise ConfigError(f"dataset_name: {name} has no 'train' split (it has: {', '.join(loaded)})")
    splits = {"train": _text_column(loaded["train"], cfg.text_column, name)}
    if "validation" in loaded and cfg.streaming:  # small: materialise it (cached) so evaluation is exact
        splits["validation"] = _stream_documents(cfg, None, "validation")
    elif "validation" in loaded:
        splits["validation"] = _text_column(
            loaded["validation"], cfg.text_column, f"{name}, validation split"
        )
    return splits, f"Hub dataset {name}" + (", streamed" if cfg.streaming else "")


def _stream_documents(
    cfg: RunConfig, take: int | None, split: str, held_share: float | None = None
) -> Dataset:
    """The first `take` documents (all if None) of a streamed split, as a map-style dataset cached on disk;
    with `held_share`, the first `take` of those `_is_held_out` picks."""
    source = {
        "dataset_name": cfg.dataset_name,
        "dataset_config_name": cfg.dataset_config_name,
        "dataset_revision": cfg.dataset_revision,
        "train_files": cfg.train_files,
        "text_column": cfg.text_column,
        "cache": _cache(cfg),
    }
    hold_out = None if held_share is None else {"share": held_share, "seed": cfg.seed}
    gen_kwargs = {"source": source, "take": take, "split": split, "hold_out": hold_out}
    code = [inspect.getsource(f) for f in (_stream_head, _is_held_out, _text_hash)]
    return Dataset.from_generator(
        _stream_head,
        features=Features({"text": TEXT}),
        gen_kwargs=gen_kwargs,
        cache_dir=_cache(cfg),
        fingerprint=Hasher.hash([*code, gen_kwargs]),
    )


def _stream_head(source: dict, take: int | None, split: str, hold_out: dict | None):
    if source["dataset_name"]:
        stream = load_dataset(
            source["dataset_name"],
            source["dataset_config_name"],
            split=split,
            streaming=True,
            cache_dir=source["cache"],
            revision=source["dataset_revision"],
        )
        stream = _text_column(stream, source["text_column"], source["dataset_name"])
    else:
        paths = _expand("train_files", source["train_files"])
        stream = _files_dataset(paths, "train_files", source["text_column"], source["cache"], streaming=True)
    stream = _drop_blank(stream)
    if hold_out is not None:
        stream = stream.filter(_is_held_out, input_columns="text", fn_kwargs=hold_out)
    for row in stream.take(take) if take is not None else stream:
        yield {"text": row["text"]}


def _nonblank(texts: list[str | None]) -> list[bool]:
    return [bool(text and not text.isspace()) for text in texts]


def _nonblank_text(text: str | None) -> bool:
    return _nonblank([text])[0]  # module level: a stream is pickled into spawned DataLoader workers


def _drop_blank(ds: Dataset | IterableDataset) -> Dataset | IterableDataset:
    if isinstance(ds, IterableDataset):  # one document at a time: a stream's state is exact per document
        return ds.filter(_nonblank_text, input_columns="text")
    return ds.filter(_nonblank, batched=True, input_columns="text", new_fingerprint=_step(ds, _nonblank))


def _step(ds: Dataset, fn: Callable, *params) -> str:
    """The fingerprint of applying `fn` to `ds`, from the function's source text. datasets would pickle the
    function instead, which differs between `python -m recipe.data` (__main__) and an import."""
    return Hasher.hash([ds._fingerprint, fn.__name__, inspect.getsource(fn), *params])


def _texts(ds: Dataset | IterableDataset):
    for batch in ds.iter(batch_size=1000):
        yield from batch["text"]


def _cache(cfg: RunConfig) -> str:
    return str(Path(cfg.cache_dir).expanduser() / "datasets")


# --- tokenizing and cutting blocks ----------------------------------------------------------------------


def _token_type(tokenizer: PreTrainedTokenizerBase) -> str:
    """The narrowest unsigned type that holds every id: 2 bytes per token for vocabularies up to 65,536."""
    return "uint16" if len(tokenizer) <= 2**16 else "uint32"


def _tokenize(batch: dict, tokenizer: PreTrainedTokenizerBase, eos_id: int) -> dict:
    # split_special_tokens: a literal "<|endoftext|>" in the text is text, not a document boundary.
    ids = tokenizer(
        batch["text"],
        add_special_tokens=False,
        split_special_tokens=True,
        verbose=False,
        return_attention_mask=False,
    )["input_ids"]
    return {
        "input_ids": [doc + [eos_id] for doc in ids],
        "num_bytes": [len(t.encode("utf-8")) for t in batch["text"]],
    }


def _tokenize_kwargs(tokenizer: PreTrainedTokenizerBase) -> dict:
    return {
        "batched": True,
        "batch_size": TOKENIZE_BATCH_DOCUMENTS,
        "remove_columns": ["text"],
        "fn_kwargs": {"tokenizer": tokenizer, "eos_id": tokenizer.eos_token_id},
        "features": Features({"input_ids": List(Value(_token_type(tokenizer))), "num_bytes": Value("int64")}),
    }


def _num_proc(cfg: RunConfig, docs: Dataset) -> int | None:
    """`preprocessing_num_workers`, or when unset every core this process may use, with at least
    MIN_BYTES_PER_WORKER of text each."""
    if cfg.preprocessing_num_workers is not None:
        return cfg.preprocessing_num_workers if cfg.preprocessing_num_workers > 1 else None
    cores = available_cores()
    # `docs.data` is the whole table under a selection (a held-out split is a few rows of it): scale to rows
    text_bytes = docs.data.nbytes * len(docs) // max(docs.data.num_rows, 1)
    workers = min(cores, len(docs), text_bytes // MIN_BYTES_PER_WORKER)
    return workers if workers > 1 else None


class TokenBlocks(TorchDataset):
    """The blocks of one split, cut at load time from its token stream (the documents' tokens, in order).

    Block k is stream positions [k*B, k*B + B]: `input_ids` its first B tokens, `shift_labels` its last B,
    both int64 tensors of shape (B,). The tokens stay in the memory-mapped arrow cache, one chunk per written
    batch of documents; a block is read from one chunk or, across a boundary, a few.
    """

    column_names = ["input_ids", "shift_labels"]

    def __init__(self, tokens: Dataset, block_size: int):
        self.tokens = tokens  # one row per document: "input_ids" (+ "num_bytes")
        self.block_size = block_size
        self._chunks: list[np.ndarray] | None = None
        # Chunk lengths come from the list offsets: no token is read to index the split.
        lengths = [len(c.flatten()) for c in tokens.data.table["input_ids"].chunks]
        self.num_tokens = sum(lengths)
        self._starts = np.cumsum([0, *lengths])[:-1].tolist()

    def __len__(self) -> int:
        return max(self.num_tokens - 1, 0) // self.block_size

    @property
    def cache_files(self) -> list[dict]:
        return self.tokens.cache_files

    def __getstate__(self) -> dict:  # DataLoader workers re-map the files instead of copying the tokens
        return {**self.__dict__, "_chunks": None}

    def _read(self, start: int, stop: int) -> np.ndarray:
        if self._chunks is None:  # zero-copy views of the memory-mapped arrow buffers
            self._chunks = [c.flatten().to_numpy() for c in self.tokens.data.table["input_ids"].chunks]
        c = bisect.bisect_right(self._starts, start) - 1
        parts = []
        while start < stop:
            chunk = self._chunks[c]
            lo, hi = start - self._starts[c], min(stop - self._starts[c], len(chunk))
            parts.append(chunk[lo:hi])
            start += max(hi - lo, 0)
            c += 1
        return np.concatenate(parts)

    def __getitem__(self, index: int | slice) -> dict[str, torch.Tensor]:
        if isinstance(index, slice):  # for inspection: a stack of blocks
            rows = [self[i] for i in range(len(self))[index]]
            return {k: torch.stack([r[k] for r in rows]) for k in self.column_names}
        if not -len(self) <= index < len(self):
            raise IndexError(f"block {index} of {len(self)}")
        start = (index % len(self)) * self.block_size
        window = torch.from_numpy(self._read(start, start + self.block_size + 1).astype(np.int64))  # (B + 1,)
        return {"input_ids": window[:-1], "shift_labels": window[1:]}


def _blocks(
    docs: Dataset, tokenizer: PreTrainedTokenizerBase, cfg: RunConfig, split: str, key: str
) -> tuple[TokenBlocks, SplitSummary]:
    tokens = docs.map(
        _tokenize,
        num_proc=_num_proc(cfg, docs),
        writer_batch_size=TOKENIZE_BATCH_DOCUMENTS,
        desc=f"Tokenizing {split}",
        new_fingerprint=_step(docs, _tokenize, tokenizer_fingerprint(tokenizer), _token_type(tokenizer)),
        **_tokenize_kwargs(tokenizer),
    )
    blocks = TokenBlocks(tokens, cfg.block_size)
    if len(blocks) == 0:
        raise ConfigError(
            f"{key}: the {split} split has only {blocks.num_tokens} tokens, fewer than the block_size + 1 = "
            f"{cfg.block_size + 1} needed for one block; add text or lower block_size"
        )
    summary = SplitSummary(
        documents=len(docs),
        bytes=pc.sum(tokens.data.table["num_bytes"]).as_py(),
        tokens=blocks.num_tokens,
        blocks=len(blocks),
        dropped_tokens=blocks.num_tokens - 1 - len(blocks) * cfg.block_size,
    )
    return blocks, summary


class PackedStream(TorchIterableDataset):
    """The blocks of a stream of documents, cut as they arrive and shuffled through a buffer of blocks.

    The same blocks as a map-style split (overlapping windows of block_size + 1 tokens over the documents
    joined by eos), except that each DataLoader worker cuts its own shards' stream. The position is saved
    and restored, never replayed: `state_dict()` is the document stream's own `datasets` state before the
    document being cut, the tokens carried over from the documents before it and how many blocks were cut
    from it, as plain Python values, plus the blocks cut but not yet delivered (the shuffle buffer, a token
    tensor) and the shuffle's RNG state. A resume re-reads that one document and goes on exactly as the
    uninterrupted stream would: every block of the epoch is delivered once, across any number of resumes.
    Everything loads with `torch.load(weights_only=True)`. The state also counts what was read in this
    epoch (documents, bytes, tokens, blocks): `StreamLoader.consumed()`.
    """

    def __init__(
        self,
        docs: IterableDataset,
        tokenizer: PreTrainedTokenizerBase,
        block_size: int,
        seed: int,
        identity: str = "",
    ):
        self.docs = docs  # "text" rows, already split across processes; split across workers when iterated
        self.identity = identity  # of the source (`_stream_identity`): a saved position is checked against it
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.seed = seed
        self._position: dict | None = None  # where the blocks cut so far end
        self._buffer: list[np.ndarray] = []  # cut, not yet delivered
        self._rng: np.random.Generator | None = None
        self._resume: dict | None = None

    @property
    def epoch(self) -> int:
        return self.docs.epoch

    def set_epoch(self, epoch: int) -> None:
        self.docs.set_epoch(epoch)  # seeds the shuffle buffer; read when an iterator starts

    def state_dict(self) -> dict:
        # A loaded position stands until this worker cuts a block: a checkpoint taken before then keeps it.
        if self._resume is not None:
            return {**self._resume, "epoch": self.epoch}
        position = self._position or {"docs": None, "carry": [], "cut": 0, **_NO_COUNTS}
        # uint16 (2 bytes a token) up to 65,536 tokens, else int32: both load with weights_only=True
        dtype = np.uint16 if _token_type(self.tokenizer) == "uint16" else np.int32
        buffer = np.stack(self._buffer) if self._buffer else np.zeros((0, self.block_size + 1))
        rng = self._rng.bit_generator.state if self._rng is not None else None
        return {**position, "epoch": self.epoch, "buffer": torch.from_numpy(buffer.astype(dtype)), "rng": rng}

    def load_state_dict(self, state: dict) -> None:
        self.set_epoch(state["epoch"])
        self._resume = state

    def __iter__(self):
        B, eos, dtype = self.block_size, self.tokenizer.eos_token_id, _token_type(self.tokenizer)
        state, self._resume = self._resume, None
        self._position = state
        before, carry, cut = (state["docs"], state["carry"], state["cut"]) if state else (None, [], 0)
        counts = {k: state[k] for k in _NO_COUNTS} if state else dict(_NO_COUNTS)  # read so far this epoch
        docs = copy.deepcopy(self.docs)  # a position loaded into it must not outlive this iteration
        if before is not None:
            docs.load_state_dict(before)
        worker = get_worker_info()
        rng = np.random.default_rng([self.seed, self.epoch, worker.id if worker else 0])
        buffer: list[np.ndarray] = []
        if state is not None and state.get("rng") is not None:  # older checkpoints saved no buffer
            rng.bit_generator.state = state["rng"]
            buffer = [row.astype(dtype) for row in state["buffer"].numpy()]
        self._buffer, self._rng = buffer, rng
        for doc in docs:
            tokenized = _tokenize({"text": [doc["text"]]}, tokenizer=self.tokenizer, eos_id=eos)
            ids = tokenized["input_ids"][0]  # ends with eos
            tokens = np.array(carry + ids, dtype=dtype)  # the buffer holds views: 2 bytes a token
            n = (len(tokens) - 1) // B
            for k in range(cut, n):
                self._position = {"docs": before, "carry": carry, "cut": k + 1, **counts}
                buffer.append(tokens[k * B : k * B + B + 1])
                if len(buffer) >= STREAM_SHUFFLE_BUFFER:
                    yield self._block(buffer, rng)
            before, carry, cut = docs.state_dict(), tokens[n * B :].tolist(), 0
            counts = {
                "documents": counts["documents"] + 1,
                "bytes": counts["bytes"] + tokenized["num_bytes"][0],
                "tokens": counts["tokens"] + len(ids),
                "blocks": counts["blocks"] + n,
            }
            self._position = {"docs": before, "carry": carry, "cut": 0, **counts}
        while buffer:
            yield self._block(buffer, rng)

    @staticmethod
    def _block(buffer: list[np.ndarray], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        i = int(rng.integers(len(buffer)))
        buffer[i], buffer[-1] = buffer[-1], buffer[i]
        window = torch.from_numpy(buffer.pop().astype(np.int64))  # (B + 1,)
        return {"input_ids": window[:-1], "shift_labels": window[1:]}


_NO_COUNTS = {"documents": 0, "bytes": 0, "tokens": 0, "blocks": 0}


class StreamLoader(StatefulDataLoader):
    """A StatefulDataLoader over a `PackedStream`: `state_dict()` holds each worker's stream position and
    the epoch, as plain Python values (save one per rank; `torch.load(weights_only=True)` reads it back).
    `load_state_dict` restores the epoch too (`self.epoch`): a multi-epoch stream goes on in its epoch."""

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def state_dict(self) -> dict:
        layout = {"num_workers": self.num_workers, "stream": self.dataset.identity}
        return {"epoch": self.epoch, "loader": super().state_dict(), **layout}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position; a layout the position cannot map onto is refused in one line (torchdata
        would stop on a bare assertion, or `datasets` resume another shard's position)."""
        if state.get("num_workers", self.num_workers) != self.num_workers:
            raise ConfigError(
                f"resume_from_checkpoint: the stream's position was saved with dataloader_num_workers "
                f"{state['num_workers']} (one position per worker), this run has {self.num_workers}; resume "
                f"with --dataloader_num_workers {state['num_workers']}"
            )
        if state.get("stream", self.dataset.identity) != self.dataset.identity:
            raise ConfigError(
                "resume_from_checkpoint: the checkpoint's stream position is in other data: the data source, "
                "its files (names, sizes, count) or its shards changed since it was saved; resume with the "
                "same data"
            )
        self.set_epoch(state["epoch"])
        super().load_state_dict(state["loader"])

    def consumed(self) -> SplitSummary:
        """What this process's workers have read of the stream in this epoch, up to the last batch delivered
        (documents, their bytes and tokens, the blocks cut from them); sum it over processes."""
        found: list[dict] = []

        def walk(node) -> None:  # the workers' PackedStream states, wherever torchdata nests them
            if isinstance(node, dict):
                if "carry" in node and "documents" in node:
                    found.append(node)
                else:
                    for value in node.values():
                        walk(value)

        walk(super().state_dict())
        total = {k: sum(state[k] for state in found) for k in _NO_COUNTS}
        return SplitSummary(total["documents"], total["bytes"], total["tokens"], total["blocks"], 0)


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
        state_bytes = (
            STREAM_SHUFFLE_BUFFER
            * (cfg.block_size + 1)
            * (2 if _token_type(data.tokenizer) == "uint16" else 4)
        )
        workers = cfg.dataloader_num_workers
        window = workers * (2 + 1) + 1 if workers else 1  # torchdata's default prefetch_factor is 2
        every = max(1, math.ceil(state_bytes * window / STREAM_STATE_BYTES_PER_BATCH))
        return StreamLoader(data.train, snapshot_every_n_steps=every, **kwargs)
    return DataLoader(data.train, shuffle=True, **kwargs)


# --- summary and command line ---------------------------------------------------------------------------


def format_summary(summary: dict[str, SplitSummary]) -> str:
    header = f"{'split':<12}{'documents':>11}{'bytes':>14}{'tokens':>13}{'blocks':>10}{'dropped':>9}{'bytes/token':>13}"
    rows = [header, "-" * len(header)]
    for name, s in summary.items():
        if s.tokens == 0:
            rows.append(f"{name:<12}{'(streamed: not counted ahead of training)':>70}")
            continue
        rows.append(
            f"{name:<12}{s.documents:>11,}{s.bytes:>14,}{s.tokens:>13,}{s.blocks:>10,}"
            f"{s.dropped_tokens:>9,}{s.bytes_per_token:>13.3f}"
        )
    return "\n".join(rows)


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
