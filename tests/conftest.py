"""Shared test fixtures. Tests run offline on CPU with tiny models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture
def tiny_gpt():
    """Factory for a tiny, seeded recipe GPTForCausalLM in eval mode: `tiny_gpt(num_hidden_layers=3, ...)`."""
    import torch

    from recipe import GPTConfig, GPTForCausalLM

    def make(seed: int = 0, **overrides):
        kwargs = dict(
            vocab_size=97,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
        )
        kwargs.update(overrides)
        torch.manual_seed(seed)
        return GPTForCausalLM(GPTConfig(**kwargs)).eval()

    return make


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE (vocab 300) trained in memory, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = [
        "To be, or not to be, that is the question.",
        "ROMEO: But soft, what light through yonder window breaks?",
    ]
    tok.train_from_iterator(text * 20, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        model_max_length=64,
    )
