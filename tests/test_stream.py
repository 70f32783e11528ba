"""Streams on several processes and DataLoader workers: a hold-out that never leaks, a resume that never replays.

Each rank runs in its own process (`prepare_data(rank=, world_size=2)`, 2 DataLoader workers each) over 4
local jsonl shards. Every document's words carry its number ("d<n>w<j>"), and a counting `tokenize` records
which documents each worker reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from recipe.config import RunConfig
from recipe.data import prepare_data

ROOT = Path(__file__).resolve().parents[1]
SHARDS, PER_SHARD, BUFFER, BATCH, FIRST = 4, 24, 6, 4, 10

RANK_SCRIPT = r"""
import dataclasses, json, os, re, sys
from pathlib import Path
import torch
import recipe.stream as stream_module
from recipe.config import RunConfig
from recipe.data import prepare_data, train_dataloader

rank, out = int(sys.argv[1]), Path(sys.argv[2])
stream_module.STREAM_SHUFFLE_BUFFER = int(sys.argv[3])
batch, first = int(sys.argv[4]), int(sys.argv[5])
phase = "none"
tokenize = stream_module.tokenize

def counting_tokenize(batch, **kwargs):  # runs in the DataLoader workers (forked): one file per process
    with open(out / f"reads-{phase}-{rank}-{os.getpid()}.txt", "a") as f:
        f.writelines(re.match(r"Document (\d+):", t).group(1) + "\n" for t in batch["text"])
    return tokenize(batch, **kwargs)

stream_module.tokenize = counting_tokenize
cfg = RunConfig(vocab_size=300, block_size=16, cache_dir=str(out / "cache"), streaming=True,
                train_files=[str(out / "shards" / "*.jsonl")], validation_split_percentage=25,
                per_device_train_batch_size=batch, dataloader_num_workers=2)
data = prepare_data(cfg, rank=rank, world_size=2)
rows = lambda b: [r.tolist() for r in torch.cat([b["input_ids"], b["shift_labels"][:, -1:]], dim=1)]
result = {"validation": sorted({int(m) for r in data.validation[:]["input_ids"]
                                for m in re.findall(r"d(\d+)w", data.tokenizer.decode(r))})}

phase = "full"  # the uninterrupted run, in epoch 1
loader = train_dataloader(data, cfg)
loader.set_epoch(1)
result["full"] = [r for b in loader for r in rows(b)]
result["decoded"] = {json.dumps(r): data.tokenizer.decode(r) for r in result["full"]}

phase = "first"  # the same epoch, stopped after `first` batches
loader = train_dataloader(data, cfg)
loader.set_epoch(1)
it, result["first"] = iter(loader), []
for _ in range(first):
    result["first"] += rows(next(it))
result["consumed"] = dataclasses.asdict(loader.consumed())
torch.save(loader.state_dict(), out / f"state-{rank}.pt")
del it, loader

phase = "resume"  # a fresh loader in epoch 0, as after a restart: the state brings the epoch and position
loader = train_dataloader(prepare_data(cfg, rank=rank, world_size=2), cfg)
loader.load_state_dict(torch.load(out / f"state-{rank}.pt", weights_only=True))
result["epoch"] = loader.epoch
it = iter(loader)
result["resume"] = rows(next(it))
result["consumed_after_load"] = dataclasses.asdict(loader.consumed())  # after one more batch
result["resume"] += [r for b in it for r in rows(b)]
(out / f"result-{rank}.json").write_text(json.dumps(result))
"""


def write_shards(folder: Path, shards: range) -> None:
    folder.mkdir(exist_ok=True)
    for s in shards:
        lines = []
        for i in range(s * PER_SHARD, (s + 1) * PER_SHARD):
            words = " ".join(f"d{i}w{j}" for j in range(3 + i % 7))
            lines.append(json.dumps({"text": f"Document {i}: {words}"}) + "\n")
        (folder / f"part-{s}.jsonl").write_text("".join(lines))


def stream_config(tmp_path: Path) -> RunConfig:
    """The in-process tests' stream: the shards under tmp_path, read in the main process."""
    return RunConfig(vocab_size=300, block_size=16, cache_dir=str(tmp_path / "cache"), streaming=True,
                     train_files=[str(tmp_path / "shards" / "*.jsonl")], validation_split_percentage=25,
                     per_device_train_batch_size=BATCH, dataloader_num_workers=0)  # fmt: skip


def run_ranks(tmp_path: Path) -> list[dict]:
    write_shards(tmp_path / "shards", range(SHARDS))
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [str(tmp_path), str(BUFFER), str(BATCH), str(FIRST)]
    # Prepare once first (the tokenizer, the held-out set), as under main_process_first; then both ranks.
    prepare_data(
        RunConfig(
            vocab_size=300,
            block_size=16,
            cache_dir=str(tmp_path / "cache"),
            streaming=True,
            train_files=[str(tmp_path / "shards" / "*.jsonl")],
            validation_split_percentage=25,
        )
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    for proc in procs:
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, output[-3000:]
    return [json.loads((tmp_path / f"result-{rank}.json").read_text()) for rank in (0, 1)]


def reads(tmp_path: Path, phase: str, rank: int) -> dict[str, list[int]]:
    """Documents tokenized per worker process of one rank and phase."""
    return {
        p.name: [int(line) for line in p.read_text().split()]
        for p in tmp_path.glob(f"reads-{phase}-{rank}-*.txt")
    }


def doc_tags(text: str) -> set[int]:
    import re

    return {int(m) for m in re.findall(r"d(\d+)w", text)}


def test_streams_hold_out_and_resume_on_two_processes_with_two_workers(tmp_path):
    results = run_ranks(tmp_path)
    everything = set(range(SHARDS * PER_SHARD))

    # --- the hold-out: not empty, never trained on, and with training every document
    held = set(results[0]["validation"])
    assert held and results[1]["validation"] == results[0]["validation"]
    in_blocks = set().union(*(doc_tags(text) for result in results for text in result["decoded"].values()))
    read = {d for rank in (0, 1) for docs in reads(tmp_path, "full", rank).values() for d in docs}
    assert not held & in_blocks and not held & read
    assert held | read == everything

    for rank, result in enumerate(results):
        full = reads(tmp_path, "full", rank)
        assert len(full) == 2  # both workers read, each its own shard, each document once
        per_worker = list(full.values())
        assert all(len(docs) == len(set(docs)) for docs in per_worker)
        assert not set(per_worker[0]) & set(per_worker[1])

        # --- the resume: the first batches are the uninterrupted run's, then the stream goes on from there
        assert result["epoch"] == 1
        n = FIRST * BATCH
        assert result["first"] == result["full"][:n]
        # The stream's summary as it is consumed: counted in the saved state, so it survives the resume.
        before, after = result["consumed"], result["consumed_after_load"]
        assert 0 < before["documents"] <= after["documents"] and 0 < before["tokens"] <= after["tokens"]
        assert after["blocks"] - before["blocks"] <= 2 * (BATCH + BUFFER)  # not counted from 0 again
        first = [d for docs in reads(tmp_path, "first", rank).values() for d in docs]
        resumed = [d for docs in reads(tmp_path, "resume", rank).values() for d in docs]
        consumed = set().union(*(doc_tags(result["decoded"][json.dumps(r)]) for r in result["first"]))
        assert len(consumed) > 8  # enough read before the stop that a replay would show
        # Of the documents trained on before the stop, a resume re-reads at most the one each worker stopped
        # in (to cut its remaining blocks); what the workers had read ahead (prefetched batches, the shuffle
        # buffer) but not yet delivered is read again, as it was never trained on.
        again = consumed & set(first) & set(resumed)
        assert len(again) <= 2, sorted(again)
        assert set(first) | set(resumed) == set().union(*map(set, reads(tmp_path, "full", rank).values()))
        # Nothing differs from the uninterrupted run: the blocks in each worker's shuffle buffer at the stop
        # and the shuffle's RNG were saved with the position, so every block comes once, in the same order.
        assert result["first"] + result["resume"] == result["full"]
        assert Counter(map(json.dumps, result["full"])).most_common(1)[0][1] == 1


def test_a_stream_position_is_refused_where_it_cannot_continue(tmp_path):
    """Another dataloader_num_workers or another file list at resume: one line naming what changed."""
    import dataclasses

    import pytest

    from recipe.config import ConfigError
    from recipe.data import train_dataloader

    write_shards(tmp_path / "shards", range(SHARDS))
    cfg = stream_config(tmp_path)
    data = prepare_data(cfg)
    loader = train_dataloader(data, cfg)
    next(iter(loader))
    state = loader.state_dict()
    train_dataloader(data, cfg).load_state_dict(state)  # the same layout resumes
    with pytest.raises(ConfigError, match="saved with dataloader_num_workers 0 .* has 1; resume with --dataloader_num_workers 0"):  # fmt: skip
        train_dataloader(data, dataclasses.replace(cfg, dataloader_num_workers=1)).load_state_dict(state)
    write_shards(tmp_path / "shards", range(SHARDS, SHARDS + 2))  # two more files match the pattern
    with pytest.raises(ConfigError, match="stream position is in other data"):
        train_dataloader(prepare_data(cfg), cfg).load_state_dict(state)
    for extra in range(SHARDS, SHARDS + 2):  # the same count of files again, one of them rewritten
        (tmp_path / "shards" / f"part-{extra}.jsonl").unlink()
    (tmp_path / "shards" / "part-0.jsonl").write_text('{"text": "Document 0: other words"}\n')
    with pytest.raises(ConfigError, match="stream position is in other data"):
        train_dataloader(prepare_data(cfg), cfg).load_state_dict(state)


def test_a_replayed_stream_saves_the_position_it_reached(tmp_path):
    """Without a saved stream position (a checkpoint of another layout) the stream is read again up to the
    step; the position saved next is where that replay got to, not a loader that was never iterated."""
    import torch
    from accelerate import Accelerator

    from recipe.data import train_dataloader
    from recipe.train import micro_batches

    write_shards(tmp_path / "shards", range(SHARDS))
    cfg = stream_config(tmp_path)
    data = prepare_data(cfg)
    reference = train_dataloader(data, cfg)
    batches = iter(reference)
    third = [next(batches) for _ in range(3)][-1]
    replayed = train_dataloader(data, cfg)
    epoch, batch = next(micro_batches(replayed, {"global_step": 2}, 1, Accelerator(cpu=True)))
    assert epoch == 0 and torch.equal(batch["input_ids"], third["input_ids"])
    assert same(replayed.state_dict(), reference.state_dict())


def same(a, b) -> bool:
    """Equal states, tensors (a stream's shuffle buffer) compared by value."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def test_a_stream_every_rank_would_read_whole_is_one_warning_line(tmp_path, caplog):
    """4 shards on 3 processes: datasets gives every rank the whole stream (1 document in 3 kept)."""
    import logging

    write_shards(tmp_path / "shards", range(SHARDS))
    cfg = stream_config(tmp_path)
    with caplog.at_level(logging.WARNING, logger="recipe"):
        prepare_data(cfg, rank=1, world_size=2)  # 4 shards, 2 processes: each reads its own two
        prepare_data(cfg, rank=1, world_size=3)  # said once, by rank 0
        assert not [r for r in caplog.records if "shards" in r.getMessage()]
        prepare_data(cfg, rank=0, world_size=3)
    (warning,) = [r.getMessage() for r in caplog.records if "shards" in r.getMessage()]
    assert "4 shards (files), which 3 processes do not divide" in warning and "\n" not in warning
