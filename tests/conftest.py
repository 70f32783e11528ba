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


# Twelve items in HellaSwag's schema (label a string, as in the real split), written for the tests: WikiHow's
# `[title]`/`[step]` artifacts, an empty ctx_b, lower-case ctx_b, endings of very different lengths.
HELLASWAG_ROWS = [
    {
        "ind": i,
        "activity_label": label,
        "ctx_a": ctx_a,
        "ctx_b": ctx_b,
        "ctx": f"{ctx_a} {ctx_b}".strip(),
        "endings": endings,
        "source_id": f"test~{i}",
        "split": "val",
        "split_type": "indomain",
        "label": str(gold),
    }
    for i, (label, ctx_a, ctx_b, endings, gold) in enumerate(
        [
            ("Roof shingle removal", "A man is sitting on a roof.", "he",
             ["is using wrap to wrap a pair of skis.", "rips up tiles.", "is holding a cube.", "starts pulling up roofing on a roof."], 3),
            ("Home and Garden", "[header] How to plant roses [title] Choose a sunny spot.", "",
             ["[step] Dig a hole twice as wide as the root ball.", "Sing.", "[substeps] Buy a cat.", "Paint the fence blue today."], 0),
            ("Clean and jerk", "A lady walks to a barbell.", "she",
             ["bends down and grabs the pole.", "swings and lands in a pool.", "zzz.", "walks away."], 0),
            ("Baking cookies", "A woman mixes flour and butter in a bowl.", "then, she",
             ["puts the tray in the oven.", "eats the bowl.", "flies.", "sings a song about the moon and the stars."], 0),
            ("Personal Care", "[title] How to brush your teeth [step] Wet the brush.", "[title] Apply toothpaste.",
             ["Brush gently for two minutes.", "Throw the brush.", "Zzzz.", "Call a plumber to fix the sink."], 0),
            ("Playing violin", "A boy holds a violin under his chin.", "the boy",
             ["plays a short tune.", "eats the violin.", "runs.", "turns into a bird and flies over the hills."], 0),
            ("Sports", "Two teams line up on a field.", "a referee",
             ["blows the whistle to start.", "sleeps.", "paints the goal posts in bright colours.", "zz."], 0),
            ("Cooking", "A chef slices onions on a board.", "",
             ["He adds them to a hot pan.", "The onions sing.", "Zzzzzz.", "He leaves for the airport."], 0),
            ("Gardening", "[header] How to water plants [title] Check the soil.", "if it is dry,",
             ["water it slowly at the base.", "sell it.", "z.", "dig up the whole garden and move away."], 0),
            ("Dancing", "A couple steps onto the dance floor.", "they",
             ["begin to waltz slowly.", "vanish.", "zzzz zzzz.", "start fixing the car engine in the garage."], 0),
            ("Swimming", "A girl stands at the edge of the pool.", "she",
             ["dives into the water.", "melts.", "zzz zzz zzz.", "writes a letter to her aunt in Spain."], 0),
            ("Knitting", "An old woman holds two needles and yarn.", "she",
             ["knits a row of stitches.", "explodes.", "z z.", "drives the bus to the city centre and back."], 0),
        ]
    )
]  # fmt: skip


@pytest.fixture(scope="session")
def hellaswag_file(tmp_path_factory):
    """HELLASWAG_ROWS as a jsonl file (what `hellaswag_path` accepts)."""
    import json

    path = tmp_path_factory.mktemp("hellaswag") / "hellaswag.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in HELLASWAG_ROWS))
    return path
