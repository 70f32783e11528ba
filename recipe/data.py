"""Load the corpus, tokenize it and pack it into shifted blocks: `python -m recipe.data --config X.yaml`.

Sources, in order of precedence: a Hub dataset (`dataset_name`), local files (`train_files`, optional
`validation_files`), else the default Shakespeare corpus (`recipe.corpus`). Plain text files are one document
per file; `.json`/`.jsonl`/`.parquet`/`.csv` files are read by the matching `datasets` builder, one document
per row of `text_column`. Without validation data, `validation_split_percentage` of the documents are held
out whole (seeded), so no document is in both splits.

Every document is followed by the eos token and the splits are concatenated into one token stream, which is
cut into blocks of block_size + 1 tokens that overlap by one: block k covers stream positions
[k*B, k*B + B], `input_ids` = its first B tokens and `shift_labels` = its last B. So every token after the
first is a target exactly once, and only the tail after the last full block is dropped (counted in the summary).

Each step is a `datasets` map whose result is cached by fingerprint under `<cache_dir>/datasets`: a rerun
with the same inputs reads the cache instead of tokenizing again, in this or any other process.
"""

from __future__ import annotations

import contextlib
import glob
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
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset, Features, IterableDataset, List, Value, concatenate_datasets, load_dataset
from datasets.distributed import split_dataset_by_node
from datasets.fingerprint import Hasher
from transformers import PreTrainedTokenizerBase

from recipe import corpus
from recipe.config import ConfigError, RunConfig, load_config
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
STREAM_VALIDATION_MAX_DOCUMENTS = (
    10_000  # a held-out head of a stream: enough for a stable loss, not 5% of the web
)
STREAM_PACK_DOCUMENTS = 1_000  # a stream is packed per this many documents (only each group's tail is lost)
STREAM_SHUFFLE_BUFFER = 10_000  # blocks


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
    train: Dataset | IterableDataset  # an IterableDataset when streaming, already split across ranks
    validation: Dataset
    summary: dict[str, SplitSummary]  # "train" (all zeros when streaming) and "validation"
    source: str


def prepare_data(
    cfg: RunConfig,
    main_process_first: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    rank: int = 0,
    world_size: int = 1,
) -> PreparedData:
    """Load, tokenize and pack both splits. Pass `accelerator.main_process_first` so the main process does
    the work once and the others read its caches. `rank`/`world_size` only split a streamed train set;
    a map-style train set is sharded by the DataLoader that accelerate prepares."""
    cfg.validate()
    with main_process_first():
        splits, source, corpus_id = _load_documents(cfg)
        tokenizer = get_tokenizer(cfg, corpus_id, lambda: _texts(splits["train"]))
        if isinstance(splits["train"], IterableDataset):
            train = _pack_stream(
                split_dataset_by_node(splits["train"], rank=rank, world_size=world_size), tokenizer, cfg
            )
            train_summary = SplitSummary(0, 0, 0, 0, 0)
        else:
            train, train_summary = _pack(splits["train"], tokenizer, cfg, "train", _key(cfg, "train"))
        validation, summary = _pack(
            splits["validation"], tokenizer, cfg, "validation", _key(cfg, "validation")
        )
    return PreparedData(tokenizer, train, validation, {"train": train_summary, "validation": summary}, source)


# --- loading documents: every source ends as splits with one "text" column -------------------------------


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
        corpus_id = Hasher.hash([corpus_id, cfg.validation_split_percentage, cfg.seed])
        source += (
            f"; validation: {cfg.validation_split_percentage:g}% of the documents held out (seed {cfg.seed})"
        )
    if len(splits["validation"]) == 0:
        raise ConfigError(f"{_key(cfg, 'validation')}: the validation split is empty (no document with text)")
    return splits, source, corpus_id


def _hold_out(train: Dataset | IterableDataset, cfg: RunConfig) -> tuple[Dataset | IterableDataset, Dataset]:
    """Hold out whole documents: a seeded random share of a dataset, or the head of a stream."""
    pct = cfg.validation_split_percentage
    if isinstance(train, IterableDataset):
        known = (
            train.info.splits["train"].num_examples
            if train.info.splits and "train" in train.info.splits
            else None
        )
        if not known:
            raise ConfigError(
                "validation_split_percentage: the number of documents in the stream is unknown, "
                "so no share can be held out; give validation_files or a dataset with a validation split"
            )
        take = min(math.ceil(known * pct / 100), STREAM_VALIDATION_MAX_DOCUMENTS)
        return train.skip(take), _stream_documents(cfg, take, "train")
    held = max(1, round(len(train) * pct / 100))
    if held >= len(train):
        raise ConfigError(
            f"validation_split_percentage: the training data has only {len(train)} document(s), so "
            "holding out whole documents would leave no training data; add documents or set validation_files"
        )
    split = train.train_test_split(test_size=held, seed=cfg.seed, shuffle=True)
    return split["train"], split["test"]


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
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


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
    ds = ds if column == "text" else ds.rename_column(column, "text")
    # One string type for every source, so that splits of several file kinds can be concatenated.
    return ds if feature == TEXT else ds.cast_column("text", TEXT)


def _hub_documents(cfg: RunConfig) -> tuple[dict, str]:
    name = cfg.dataset_name + (f" ({cfg.dataset_config_name})" if cfg.dataset_config_name else "")
    try:
        loaded = load_dataset(
            cfg.dataset_name, cfg.dataset_config_name, streaming=cfg.streaming, cache_dir=_cache(cfg)
        )
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


def _stream_documents(cfg: RunConfig, take: int | None, split: str) -> Dataset:
    """The first `take` documents (all if None) of a streamed split, as a map-style dataset cached on disk."""
    source = {
        "dataset_name": cfg.dataset_name,
        "dataset_config_name": cfg.dataset_config_name,
        "train_files": cfg.train_files,
        "text_column": cfg.text_column,
        "cache": _cache(cfg),
    }
    gen_kwargs = {"source": source, "take": take, "split": split}
    return Dataset.from_generator(
        _stream_head,
        features=Features({"text": TEXT}),
        gen_kwargs=gen_kwargs,
        cache_dir=_cache(cfg),
        fingerprint=Hasher.hash([inspect.getsource(_stream_head), gen_kwargs]),
    )


def _stream_head(source: dict, take: int | None, split: str):
    if source["dataset_name"]:
        stream = load_dataset(
            source["dataset_name"],
            source["dataset_config_name"],
            split=split,
            streaming=True,
            cache_dir=source["cache"],
        )
        stream = _text_column(stream, source["text_column"], source["dataset_name"])
    else:
        paths = _expand("train_files", source["train_files"])
        stream = _files_dataset(paths, "train_files", source["text_column"], source["cache"], streaming=True)
    stream = _drop_blank(stream)
    for row in stream.take(take) if take is not None else stream:
        yield {"text": row["text"]}


def _nonblank(texts: list[str | None]) -> list[bool]:
    return [bool(text and not text.isspace()) for text in texts]


def _drop_blank(ds: Dataset | IterableDataset) -> Dataset | IterableDataset:
    if isinstance(ds, IterableDataset):
        return ds.filter(_nonblank, batched=True, input_columns="text")
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


# --- tokenizing and packing -----------------------------------------------------------------------------


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
        "remove_columns": ["text"],
        "fn_kwargs": {"tokenizer": tokenizer, "eos_id": tokenizer.eos_token_id},
        "features": Features({"input_ids": List(Value("int32")), "num_bytes": Value("int64")}),
    }


def _block_features(block_size: int) -> Features:
    return Features({name: List(Value("int32"), length=block_size) for name in ("input_ids", "shift_labels")})


def _pack_batch(batch: pa.Table | dict, block_size: int) -> dict[str, np.ndarray]:
    """Concatenate the documents of a batch and cut [k*B, k*B + B] windows: inputs and targets, [n, B] each."""
    ids = batch["input_ids"]
    if isinstance(ids, pa.ChunkedArray):  # a map-style dataset, formatted as arrow: no copy
        stream = ids.combine_chunks().flatten().to_numpy()
    else:
        stream = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32)
    n = max(len(stream) - 1, 0) // block_size
    return {
        "input_ids": stream[: n * block_size].reshape(n, block_size),
        "shift_labels": stream[1 : n * block_size + 1].reshape(n, block_size),
    }


def _pack(
    docs: Dataset, tokenizer: PreTrainedTokenizerBase, cfg: RunConfig, split: str, key: str
) -> tuple[Dataset, SplitSummary]:
    tokenized = docs.map(
        _tokenize,
        num_proc=cfg.preprocessing_num_workers,
        desc=f"Tokenizing {split}",
        new_fingerprint=_step(docs, _tokenize, tokenizer_fingerprint(tokenizer)),
        **_tokenize_kwargs(tokenizer),
    )
    table = tokenized.data.table  # map writes a fresh table: no indices mapping
    tokens = pc.sum(pc.list_value_length(table["input_ids"])).as_py()
    block_size = cfg.block_size
    blocks = (tokens - 1) // block_size
    if blocks == 0:
        raise ConfigError(
            f"{key}: the {split} split has only {tokens} tokens, fewer than the block_size + 1 = "
            f"{block_size + 1} needed for one block; add text or lower block_size"
        )
    packed = tokenized.with_format("arrow").map(
        _pack_batch,
        batched=True,
        batch_size=None,
        fn_kwargs={"block_size": block_size},
        remove_columns=tokenized.column_names,
        features=_block_features(block_size),
        desc=f"Packing {split}",
        new_fingerprint=_step(tokenized, _pack_batch, block_size),
    )
    summary = SplitSummary(
        documents=len(docs),
        bytes=pc.sum(table["num_bytes"]).as_py(),
        tokens=tokens,
        blocks=len(packed),
        dropped_tokens=tokens - 1 - blocks * block_size,
    )
    assert summary.blocks == blocks, (summary.blocks, blocks)
    return packed.with_format("torch"), summary


def _pack_stream(
    docs: IterableDataset, tokenizer: PreTrainedTokenizerBase, cfg: RunConfig
) -> IterableDataset:
    """The same blocks, lazily, per group of STREAM_PACK_DOCUMENTS documents; shuffled through a buffer."""
    tokenized = docs.map(_tokenize, **_tokenize_kwargs(tokenizer))
    packed = tokenized.map(
        _pack_batch,
        batched=True,
        batch_size=STREAM_PACK_DOCUMENTS,
        fn_kwargs={"block_size": cfg.block_size},
        remove_columns=["input_ids", "num_bytes"],
        features=_block_features(cfg.block_size),
    )
    return packed.shuffle(seed=cfg.seed, buffer_size=STREAM_SHUFFLE_BUFFER).with_format("torch")


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
