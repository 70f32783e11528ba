"""How documents become token blocks: tokenize, cache, cut; the splits' summaries.

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
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import torch
from datasets import Dataset, Features, List, Value
from torch.utils.data import Dataset as TorchDataset
from transformers import PreTrainedTokenizerBase

from recipe.config import ConfigError, RunConfig
from recipe.documents import map_fingerprint, num_proc
from recipe.tokenizer import tokenizer_fingerprint

TOKENIZE_BATCH_DOCUMENTS = 256  # per map batch and per written arrow chunk: bounds a tokenizer's memory


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


def token_type(tokenizer: PreTrainedTokenizerBase) -> str:
    """The narrowest unsigned type that holds every id: 2 bytes per token for vocabularies up to 65,536."""
    return "uint16" if len(tokenizer) <= 2**16 else "uint32"


def tokenize(batch: dict, tokenizer: PreTrainedTokenizerBase, eos_id: int) -> dict:
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
        "features": Features({"input_ids": List(Value(token_type(tokenizer))), "num_bytes": Value("int64")}),
    }


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


def token_blocks(
    docs: Dataset, tokenizer: PreTrainedTokenizerBase, cfg: RunConfig, split: str, key: str
) -> tuple[TokenBlocks, SplitSummary]:
    tokens = docs.map(
        tokenize,
        num_proc=num_proc(cfg, docs),
        writer_batch_size=TOKENIZE_BATCH_DOCUMENTS,
        desc=f"Tokenizing {split}",
        new_fingerprint=map_fingerprint(
            docs, tokenize, tokenizer_fingerprint(tokenizer), token_type(tokenizer)
        ),
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
