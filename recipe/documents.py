"""Where documents come from, and the hold-out: every source ends as splits with one "text" column.

Sources, in order of precedence: a Hub dataset (`dataset_name`), local files (`train_files`, optional
`validation_files`), else the default Shakespeare corpus (`recipe.corpus`). Plain text files are one document
per file; `.json`/`.jsonl`/`.parquet`/`.csv` files are read by the matching `datasets` builder, one document
per row of `text_column`. Blank documents are dropped. Without validation data, `validation_split_percentage`
of the documents are held out whole (seeded), so no document is in both splits; a stream holds out its first
documents whose text hashes into that share, and every process and DataLoader worker skips those texts by
their hash.

Also the two helpers every `datasets` map here uses (`recipe.tokens` too): a step's fingerprint from its
function's source (`step`) and the worker count (`num_proc`).
"""

from __future__ import annotations

import glob
import hashlib
import inspect
import itertools
import math
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path

from datasets import Dataset, Features, IterableDataset, Value, concatenate_datasets, load_dataset
from datasets.fingerprint import Hasher

from recipe import corpus
from recipe.config import ConfigError, RunConfig, available_cores

BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}  # anything else: plain text
TEXT = Value("large_string")  # 64-bit offsets: no 2 GiB limit on the text in one arrow chunk
TEXT_FILE_FEATURES = Features({"text": TEXT, "path": Value("string"), "replaced": Value("int64")})
STREAM_VALIDATION_MAX_DOCUMENTS = 10_000  # a stream's hold-out: enough for a stable loss, not 5% of the web
MIN_BYTES_PER_WORKER = 4 << 20  # less text than this tokenizes faster than a worker process starts
HOLD_OUT_BUCKETS = 1_000_000  # a document is held out when the hash of its text falls in the first share


def source_key(cfg: RunConfig, split: str) -> str:
    """The configuration key to name in an error about this split."""
    if split == "validation" and not cfg.validation_files and not cfg.dataset_name and cfg.train_files:
        return "validation_split_percentage"
    if cfg.dataset_name:
        return "dataset_name"
    return f"{split}_files" if cfg.train_files else "block_size"


def load_documents(cfg: RunConfig) -> tuple[dict, str, str]:
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
            raise ConfigError(
                f"{source_key(cfg, 'train')}: the training corpus is empty (no document with text)"
            )
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
        raise ConfigError(
            f"{source_key(cfg, 'validation')}: the validation split is empty (no document with text)"
        )
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
        held = frozenset(_text_hash(t, cfg.seed) for t in iter_texts(validation))
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
    held_hashes = frozenset(_text_hash(t, cfg.seed) for t in iter_texts(split["test"]))
    kept = split["train"].filter(  # fingerprinted by the held-out split, not by pickling the set
        _not_held_out_batch,
        batched=True,
        input_columns="text",
        fn_kwargs={"held": held_hashes, "seed": cfg.seed},
        num_proc=num_proc(cfg, split["train"]),
        new_fingerprint=map_fingerprint(
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
    train_paths = expand("train_files", cfg.train_files)
    splits = {
        "train": _files_dataset(train_paths, "train_files", cfg.text_column, _cache(cfg), cfg.streaming)
    }
    source = f"local files: {_list(cfg.train_files)} ({len(train_paths)} file(s))"
    if cfg.validation_files:
        val_paths = expand("validation_files", cfg.validation_files)
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


def expand(key: str, patterns: list[str]) -> list[Path]:
    """Paths and glob patterns -> files, in the given order (each glob sorted), without duplicates."""
    files: dict[Path, None] = {}
    for pattern in patterns:
        matches = [Path(m) for m in sorted(glob.glob(os.path.expanduser(pattern), recursive=True))]
        matches = [m for m in matches if m.is_file()]
        if not matches:
            raise ConfigError(f"{key}: {pattern!r} matches no file")
        files.update(dict.fromkeys(matches))
    return list(files)


FILE_SLICES, SLICE_BYTES = (
    4,
    1 << 16,
)  # what a file's identity reads: 4 windows of 64 KiB (all of a small file)


def files_identity(paths: list[Path]) -> str:
    """What local files hold, whatever their path or times (another mount, a copy, a corpus extracted again):
    each file's size and a hash of FILE_SLICES fixed windows of SLICE_BYTES (the first, the last and evenly
    between; the whole file when it is smaller), in order. A few reads per file, at any size. An in-place
    rewrite of the same size is caught unless it spares every window. (datasets' fingerprint of local files
    is of their paths and modification times.)"""
    parts = []
    for path in paths:
        size, digest = path.stat().st_size, hashlib.blake2b(digest_size=16)
        with path.open("rb") as f:
            if size <= FILE_SLICES * SLICE_BYTES:
                digest.update(f.read())
            else:
                for i in range(FILE_SLICES):
                    f.seek((size - SLICE_BYTES) * i // (FILE_SLICES - 1))
                    digest.update(f.read(SLICE_BYTES))
        parts.append((size, digest.hexdigest()))
    return Hasher.hash(parts)


def local_files_identity(cfg: RunConfig) -> str | None:
    """`files_identity` of train_files and validation_files; None for a Hub dataset or the default corpus
    (checked by its sha256)."""
    if not cfg.train_files:
        return None
    return files_identity(expand("train_files", cfg.train_files) + expand("validation_files", cfg.validation_files or []))  # fmt: skip


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
        paths = expand("train_files", source["train_files"])
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
    return ds.filter(
        _nonblank, batched=True, input_columns="text", new_fingerprint=map_fingerprint(ds, _nonblank)
    )


def map_fingerprint(ds: Dataset, fn: Callable, *params) -> str:
    """The fingerprint of applying `fn` to `ds`, from the function's source text. datasets would pickle the
    function instead, which differs between a module run as __main__ and the same module imported."""
    return Hasher.hash([ds._fingerprint, fn.__name__, inspect.getsource(fn), *params])


def iter_texts(ds: Dataset | IterableDataset):
    for batch in ds.iter(batch_size=1000):
        yield from batch["text"]


def _cache(cfg: RunConfig) -> str:
    return str(Path(cfg.cache_dir).expanduser() / "datasets")


def num_proc(cfg: RunConfig, docs: Dataset) -> int | None:
    """`preprocessing_num_workers`, or when unset every core this process may use, with at least
    MIN_BYTES_PER_WORKER of text each."""
    if cfg.preprocessing_num_workers is not None:
        return cfg.preprocessing_num_workers if cfg.preprocessing_num_workers > 1 else None
    cores = available_cores()
    # `docs.data` is the whole table under a selection (a held-out split is a few rows of it): scale to rows
    text_bytes = docs.data.nbytes * len(docs) // max(docs.data.num_rows, 1)
    workers = min(cores, len(docs), text_bytes // MIN_BYTES_PER_WORKER)
    return workers if workers > 1 else None
