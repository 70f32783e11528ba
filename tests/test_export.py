"""Export to stock GPT2LMHeadModel / Qwen3ForCausalLM / LlamaForCausalLM: same logits, a plain folder that
loads without remote code, clear refusals."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from recipe.export import export_model, export_to_gpt2, main


def ids(vocab: int = 97) -> torch.Tensor:
    return torch.randint(0, vocab, (3, 20), generator=torch.Generator().manual_seed(5))


def assert_plain_gpt2_folder(folder):
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gpt2"
    assert config["architectures"] == ["GPT2LMHeadModel"]
    assert "auto_map" not in config
    assert not list(folder.glob("*.py"))  # no remote code travels with it


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": False, "hidden_act": "gelu_new"}])
def test_exported_logits_match_stock_gpt2(tiny_gpt, tmp_path, overrides):
    model = tiny_gpt(intermediate_size=48, layer_norm_epsilon=1e-6, **overrides)
    with torch.no_grad():  # move biases and LayerNorms off their 0 / 1 init so a dropped tensor would show
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = ids()
    export_to_gpt2(model, tmp_path)

    assert_plain_gpt2_folder(tmp_path)
    gpt2 = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert gpt2.config.n_inner == 48 and gpt2.config.layer_norm_epsilon == 1e-6
    assert gpt2.config.activation_function == model.config.hidden_act
    tied = gpt2.lm_head.weight.data_ptr() == gpt2.transformer.wte.weight.data_ptr()
    assert tied == model.config.tie_word_embeddings
    with torch.no_grad():
        diff = (gpt2(x).logits - model(x).logits).abs().max().item()
    assert diff < 1e-4


def test_export_refuses_bias_free_models(tiny_gpt, tmp_path):
    with pytest.raises(ValueError, match="bias=False"):
        export_to_gpt2(tiny_gpt(bias=False), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_exports_model_and_tokenizer(tiny_gpt, tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    ckpt, out = tmp_path / "ckpt", tmp_path / "gpt2"
    model = tiny_gpt(vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)

    assert main(["--model", str(ckpt), "--to", "gpt2", "--output", str(out)]) == 0
    assert_plain_gpt2_folder(out)
    gpt2 = GPT2LMHeadModel.from_pretrained(out).eval()
    assert gpt2.config.eos_token_id == tok.eos_token_id and gpt2.config.pad_token_id == tok.pad_token_id
    reloaded_tok = AutoTokenizer.from_pretrained(out)
    assert reloaded_tok("ROMEO: hi")["input_ids"] == tok("ROMEO: hi")["input_ids"]
    x = ids(vocab=len(tok))
    with torch.no_grad():
        assert (gpt2(x).logits - model(x).logits).abs().max().item() < 1e-4


def test_cli_exports_a_bf16_checkpoint_as_bf16(tiny_gpt, tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "gpt2"
    tiny_gpt().to(torch.bfloat16).save_pretrained(ckpt)
    assert main(["--model", str(ckpt), "--output", str(out)]) == 0
    gpt2 = GPT2LMHeadModel.from_pretrained(out)
    assert gpt2.dtype == torch.bfloat16


def test_cli_fails_clearly_on_something_that_is_not_our_model(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "missing"), "--output", str(tmp_path / "a")]) == 1
    assert "not a model folder" in capsys.readouterr().err

    stock = tmp_path / "stock"
    GPT2LMHeadModel(
        GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50, n_positions=16)
    ).save_pretrained(stock)
    assert main(["--model", str(stock), "--output", str(tmp_path / "b")]) == 1
    assert "not a recipe GPT" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_refuses_bias_free_checkpoint(tiny_gpt, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    tiny_gpt(bias=False).save_pretrained(ckpt)
    assert main(["--model", str(ckpt), "--output", str(tmp_path / "out")]) == 1
    assert "bias=False" in capsys.readouterr().err


# --- the modern architecture: Qwen3 (with QK-norm) or Llama (without) -----------------------------------


@torch.no_grad()
def randomised_modern(tiny_gpt, **overrides):
    """Every parameter random, gains included: zero projections or unit gains would hide a wrong mapping
    (a swapped gate/up, a q/k/v split off by one head, a rotary layout or norm placed elsewhere)."""
    model = tiny_gpt(architecture="modern", intermediate_size=48, layer_norm_epsilon=1e-5, **overrides)
    generator = torch.Generator().manual_seed(7)
    for p in model.parameters():
        noise = torch.randn(p.shape, generator=generator)
        p.copy_(1 + 0.2 * noise if p.ndim == 1 else 0.3 * noise)
    return model


def assert_plain_folder(folder, model_type, architecture):
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == model_type and config["architectures"] == [architecture]
    assert "auto_map" not in config
    assert not list(folder.glob("*.py"))


@pytest.mark.parametrize(
    "overrides, model_type, stock_name",
    [
        ({}, "qwen3", "Qwen3ForCausalLM"),
        ({"tie_word_embeddings": True, "rope_theta": 500.0}, "qwen3", "Qwen3ForCausalLM"),
        ({"qk_norm": False}, "llama", "LlamaForCausalLM"),
        ({"qk_norm": False, "hidden_act": "relu2", "tie_word_embeddings": True}, "llama", "LlamaForCausalLM"),
    ],
)
def test_modern_export_matches_a_stock_model_loaded_without_remote_code(
    tiny_gpt, tmp_path, overrides, model_type, stock_name
):
    model = randomised_modern(tiny_gpt, **overrides)
    export_model(model, tmp_path)  # the target follows qk_norm
    assert_plain_folder(tmp_path, model_type, stock_name)

    stock = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # no trust_remote_code
    assert type(stock).__name__ == stock_name
    assert stock.config.intermediate_size == 48 and stock.config.rms_norm_eps == 1e-5
    assert stock.config.rope_parameters["rope_theta"] == model.config.rope_theta
    tied = stock.lm_head.weight.data_ptr() == stock.model.embed_tokens.weight.data_ptr()
    assert tied == model.config.tie_word_embeddings
    x = ids()
    with torch.no_grad():
        ours, theirs = model(x).logits, stock(x).logits
    assert (
        ours.abs().max() > 1
    )  # random weights: the logits are far from uniform, so a 1e-4 match means something
    assert (theirs - ours).abs().max().item() < 1e-4
    # Generation with a cache (rotary offsets, per-head norms on cached keys) and left padding agree too.
    mask = torch.ones_like(x[:, :6])
    mask[1, :2] = 0
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=mask)
    assert torch.equal(stock.generate(x[:, :6], **kwargs), model.generate(x[:, :6], **kwargs))


def test_export_refuses_what_the_target_cannot_represent(tiny_gpt, tmp_path):
    cases = [
        (tiny_gpt(architecture="modern"), "gpt2", "--to qwen3"),
        (tiny_gpt(architecture="modern"), "llama", "qk_norm=True"),
        (tiny_gpt(architecture="modern", qk_norm=False), "qwen3", "--to llama"),
        (tiny_gpt(), "qwen3", "--to gpt2"),
    ]
    for i, (model, target, message) in enumerate(cases):
        with pytest.raises(ValueError, match=message):
            export_model(model, tmp_path / str(i), to=target)
        assert not (tmp_path / str(i)).exists()


def test_cli_exports_a_modern_checkpoint_to_qwen3_by_default(tiny_gpt, tiny_tokenizer, tmp_path, capsys):
    tok = tiny_tokenizer
    ckpt, out = tmp_path / "ckpt", tmp_path / "qwen3"
    model = randomised_modern(tiny_gpt, vocab_size=len(tok), eos_token_id=tok.eos_token_id)
    model.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    assert main(["--model", str(ckpt), "--output", str(out)]) == 0
    assert "Qwen3ForCausalLM" in capsys.readouterr().out
    assert_plain_folder(out, "qwen3", "Qwen3ForCausalLM")
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    assert AutoTokenizer.from_pretrained(out)("ROMEO")["input_ids"] == tok("ROMEO")["input_ids"]
    x = ids(vocab=len(tok))
    with torch.no_grad():
        assert (stock(x).logits - model(x).logits).abs().max().item() < 1e-4
    assert main(["--model", str(ckpt), "--to", "gpt2", "--output", str(tmp_path / "no")]) == 1
    assert "--to qwen3" in capsys.readouterr().err


def test_model_type_has_one_home():
    from recipe import GPTConfig
    from recipe.export import MODEL_TYPE

    assert MODEL_TYPE is GPTConfig.model_type
