"""Train (once) or load the tokenizer.

The trained tokenizer is a byte-level BPE, GPT-2 style: the pre-tokenizer maps every byte to a printable
symbol before merging, so any Unicode text round-trips exactly (no normalizer, no unknown token).
`<|endoftext|>` separates documents and serves as eos, bos and pad. It is wrapped in
`PreTrainedTokenizerFast`, so `save_pretrained` / `AutoTokenizer.from_pretrained` work, and cached under
`<cache_dir>/tokenizers/` keyed on the training corpus and the settings below, so a rerun does not retrain.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from recipe.config import ConfigError, RunConfig

logger = logging.getLogger(__name__)

EOS = "<|endoftext|>"
MAX_TRAINING_BYTES = 1 << 30  # BPE training holds its word counts in memory; 1 GiB of text is plenty
# Everything that changes the trained tokenizer besides the corpus and vocab_size: part of the cache key.
SETTINGS = {
    "model": "bpe",
    "pre_tokenizer": "byte_level(add_prefix_space=False)",
    "special_tokens": [EOS],
    "initial_alphabet": "all 256 bytes",
    "max_training_bytes": MAX_TRAINING_BYTES,
    "version": 1,
}
MIN_VOCAB_SIZE = 257  # the 256 byte symbols plus <|endoftext|>


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with `vocab_size` entries (fewer if the corpus runs out of merges)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_capped(texts, MAX_TRAINING_BYTES), trainer)
    # clean_up_tokenization_spaces would turn " ," into "," on decode: off, to stay lossless.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, clean_up_tokenization_spaces=False
    )


def _capped(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
    seen = 0
    for text in texts:
        yield text
        seen += len(text)
        if seen >= max_bytes:
            logger.info("Tokenizer trained on the first %d characters of the training split", seen)
            return


def get_tokenizer(
    cfg: RunConfig, corpus_id: str, texts: Callable[[], Iterable[str]]
) -> PreTrainedTokenizerBase:
    """`cfg.tokenizer_name` if set, else the cached BPE for this corpus, trained on `texts()` if missing.

    `corpus_id` identifies the training split's content (a datasets fingerprint); `texts` is called only
    when the tokenizer has to be trained.
    """
    if cfg.tokenizer_name:
        return load_tokenizer(cfg.tokenizer_name)
    if cfg.vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            f"vocab_size must be at least {MIN_VOCAB_SIZE} for a byte-level BPE "
            f"(256 bytes + {EOS}), got {cfg.vocab_size}"
        )
    key = hashlib.sha256(
        json.dumps([corpus_id, cfg.vocab_size, SETTINGS], sort_keys=True).encode()
    ).hexdigest()
    root = Path(cfg.cache_dir).expanduser() / "tokenizers"
    folder = root / f"bpe-{cfg.vocab_size}-{key[:16]}"
    if not (folder / "tokenizer.json").is_file():
        logger.info(
            "Training a byte-level BPE tokenizer (vocab_size %d) on the training split", cfg.vocab_size
        )
        tokenizer = train_bpe(texts(), cfg.vocab_size)
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root, prefix=".tmp-") as tmp:
            staged = Path(tmp) / folder.name
            tokenizer.save_pretrained(staged)
            try:
                os.rename(staged, folder)  # atomic: a crash or a concurrent process never sees half a folder
            except OSError:
                if not (folder / "tokenizer.json").is_file():
                    raise
    else:
        logger.info("Using the cached tokenizer %s", folder)
    # Always load from disk, so a fresh and a cached tokenizer are the same object (and hash the same).
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.model_max_length = cfg.max_position_embeddings or cfg.block_size
    return tokenizer


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Any Hub id or local folder `AutoTokenizer` can load; it must have an eos token to separate documents."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as err:  # OSError, ValueError, HTTP errors...: all mean "cannot use this name"
        raise ConfigError(f"tokenizer_name: cannot load tokenizer {name!r}: {err}") from err
    if tokenizer.eos_token_id is None:
        raise ConfigError(
            f"tokenizer_name: the tokenizer {name!r} has no eos token, which is needed to "
            "separate documents; pick another tokenizer or leave tokenizer_name unset to train one"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what the tokenizer does, stable across processes (for the datasets map cache)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = backend.to_str()
    else:  # a slow (Python) tokenizer: fall back to the datasets hasher, which pickles it
        from datasets.fingerprint import Hasher

        state = Hasher.hash(tokenizer)
    return hashlib.sha256(f"{state}|{tokenizer.eos_token_id}".encode()).hexdigest()
