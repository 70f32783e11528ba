"""A stream that packs and resumes: `PackedStream` (the blocks of a streamed train split, cut as documents
arrive, shuffled through a buffer) and `StreamLoader` (its StatefulDataLoader, whose state is every worker's
position); `stream_identity` names the data a saved position is a position in.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from datasets import IterableDataset
from datasets.fingerprint import Hasher
from torch.utils.data import IterableDataset as TorchIterableDataset
from torch.utils.data import get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerBase

from recipe.config import ConfigError, RunConfig
from recipe.documents import expand, files_identity
from recipe.tokens import SplitSummary, token_type, tokenize

STREAM_SHUFFLE_BUFFER = 10_000  # blocks
# A worker's state holds its shuffle buffer (~20 MB for 10,000 blocks of 1,024 uint16 tokens): it is sent to
# the loader every n batches, n chosen so that about this many bytes per batch are sent on average (torchdata
# sends a worker's state for a window of num_workers x (prefetch_factor + 1) + 1 batches around each snapshot
# step). A resume re-reads the batches since the last transfer; `consumed` counts lag by as many.
STREAM_STATE_BYTES_PER_BATCH = 1 << 20


def stream_identity(cfg: RunConfig, stream: IterableDataset) -> str:
    """What a saved stream position is a position in: the source, its files (their content, by
    `files_identity`: not their paths, so the same files at another mount resume) and shard count. A resume
    into anything else is refused (`datasets` would place the position in other data)."""
    files = files_identity(expand("train_files", cfg.train_files)) if cfg.train_files else []
    source = [cfg.dataset_name, cfg.dataset_config_name, cfg.text_column, files, stream.num_shards]
    return Hasher.hash(source + [cfg.dataset_revision] if cfg.dataset_revision else source)


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
        self.identity = identity  # of the source (`stream_identity`): a saved position is checked against it
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
        dtype = np.uint16 if token_type(self.tokenizer) == "uint16" else np.int32
        buffer = np.stack(self._buffer) if self._buffer else np.zeros((0, self.block_size + 1))
        rng = self._rng.bit_generator.state if self._rng is not None else None
        return {**position, "epoch": self.epoch, "buffer": torch.from_numpy(buffer.astype(dtype)), "rng": rng}

    def load_state_dict(self, state: dict) -> None:
        self.set_epoch(state["epoch"])
        self._resume = state

    def __iter__(self):
        B, eos, dtype = self.block_size, self.tokenizer.eos_token_id, token_type(self.tokenizer)
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
            tokenized = tokenize({"text": [doc["text"]]}, tokenizer=self.tokenizer, eos_id=eos)
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
                "its files (their content or count) or its shards changed since it was saved; resume with the "
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


def stream_loader(stream: PackedStream, cfg: RunConfig, **kwargs) -> StreamLoader:
    """A `StreamLoader` that sends each worker's state every n batches: about STREAM_STATE_BYTES_PER_BATCH
    bytes per batch on average."""
    state_bytes = (
        STREAM_SHUFFLE_BUFFER * (cfg.block_size + 1) * (2 if token_type(stream.tokenizer) == "uint16" else 4)
    )
    workers = cfg.dataloader_num_workers
    window = workers * (2 + 1) + 1 if workers else 1  # torchdata's default prefetch_factor is 2
    every = max(1, math.ceil(state_bytes * window / STREAM_STATE_BYTES_PER_BATCH))
    return StreamLoader(stream, snapshot_every_n_steps=every, **kwargs)
