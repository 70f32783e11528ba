"""The recipe GPT as a transformers model: loss, cache, masks, attention backends, save/load, remote code.

Most tests run on both architectures (`make`): the modern model gets every parameter randomised, since its
zero-initialised output projections would make attention (and so cache or rotary bugs) invisible."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache, pipeline

from recipe import GPTConfig, GPTForCausalLM, GPTModel

# Larger init than GPT-2's 0.02 so the random tiny model's greedy continuations depend on the input
# (with 0.02 they collapse to one repeated token and cache bugs could go unnoticed).
SHARP = dict(initializer_range=0.3)


def ids(batch: int = 2, seq: int = 12, vocab: int = 97, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomise(model, seed: int = 0):
    """Every matrix ~ N(0, initializer_range), every gain ~ 1 + N(0, 0.1): nothing left at a neutral init."""
    generator = torch.Generator().manual_seed(seed)
    std = model.config.initializer_range
    for p in model.parameters():
        noise = torch.randn(p.shape, generator=generator)
        p.copy_(1 + 0.1 * noise if p.ndim == 1 else std * noise)
    return model


@pytest.fixture(params=["gpt2", "modern"])
def make(request, tiny_gpt):
    """`make(**overrides)`: a tiny model of the parametrised architecture (modern: randomised)."""

    def build(**overrides):
        if request.param == "gpt2":
            return tiny_gpt(**overrides)
        return randomise(tiny_gpt(architecture="modern", **overrides))

    build.arch = request.param
    return build


# --- config -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("hidden_size", 30),  # not divisible by 4 heads
        ("num_hidden_layers", 0),
        ("num_attention_heads", -2),
        ("vocab_size", 0),
        ("max_position_embeddings", 0),
        ("intermediate_size", -1),
        ("embd_pdrop", -0.1),
        ("resid_pdrop", 1.0),
        ("attn_pdrop", 1.5),
        ("hidden_act", "gelu_fancy"),
        ("layer_norm_epsilon", 0.0),
        ("architecture", "llama"),
        ("rope_theta", 0.0),
        ("qk_norm", True),  # gpt2 has none
    ],
)
def test_invalid_config_raises_value_error_naming_the_field(field, value):
    kwargs = dict(vocab_size=97, hidden_size=32, num_attention_heads=4)
    kwargs[field] = value
    with pytest.raises(ValueError, match=field):
        GPTConfig(**kwargs)


def test_config_resolves_intermediate_size_and_round_trips(tmp_path):
    config = GPTConfig(hidden_size=32, num_attention_heads=4)
    assert config.intermediate_size == 128
    assert config.model_type == "recipe_gpt" and config.tie_word_embeddings
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["intermediate_size"] == 128
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, GPTConfig)
    assert {**loaded.to_dict(), "_name_or_path": ""} == config.to_dict()


def test_modern_config_defaults_and_refusals(tmp_path):
    config = GPTConfig(architecture="modern", hidden_size=96, num_attention_heads=4)
    assert (
        config.intermediate_size == 256
    )  # 8/3 x 96 = 256: the gated MLP's three matrices ~ 4 x hidden's two
    assert (config.hidden_act, config.bias, config.qk_norm, config.tie_word_embeddings) == (
        "silu",
        False,
        True,
        False,
    )
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert (loaded.architecture, loaded.intermediate_size, loaded.qk_norm) == ("modern", 256, True)
    gpt2 = GPTConfig(hidden_size=96, num_attention_heads=4)
    assert (gpt2.architecture, gpt2.hidden_act, gpt2.bias, gpt2.qk_norm) == (
        "gpt2",
        "gelu_pytorch_tanh",
        True,
        False,
    )
    with pytest.raises(ValueError, match="bias"):
        GPTConfig(architecture="modern", bias=True)
    with pytest.raises(ValueError, match="rotary"):
        GPTConfig(architecture="modern", hidden_size=12, num_attention_heads=4)  # odd head size


def test_modern_initialisation_and_modules(tiny_gpt):
    model = tiny_gpt(architecture="modern", hidden_size=128)
    assert not hasattr(model.transformer, "wpe")  # rotary positions
    assert all(
        p.ndim == 2 or name.endswith("norm.weight") or ".ln_" in name for name, p in model.named_parameters()
    )
    block = model.transformer.h[0]
    assert torch.all(block.attn.c_proj.weight == 0) and torch.all(block.mlp.c_proj.weight == 0)
    for gain in (
        block.ln_1.weight,
        block.attn.q_norm.weight,
        block.attn.k_norm.weight,
        model.transformer.ln_f.weight,
    ):
        assert torch.all(gain == 1)
    assert block.mlp.c_fc.weight.shape == (2 * model.config.intermediate_size, 128)  # [gate; up]
    assert abs(block.attn.c_attn.weight.std().item() - 0.02) < 0.002
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    # Zero projections: at init every block is the identity, so the logits see only the current token.
    x = ids()
    changed = x.clone()
    changed[:, 0] = (changed[:, 0] + 1) % 97
    torch.testing.assert_close(model(x).logits[:, 1:], model(changed).logits[:, 1:])


def test_modern_positions_are_relative():
    """Rotary attention scores depend on position differences only: a prefix of pad-free tokens shifted by
    position_ids gives the same logits (learned absolute positions would not)."""
    torch.manual_seed(0)
    model = randomise(
        GPTForCausalLM(
            GPTConfig(
                architecture="modern",
                vocab_size=97,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=64,
            )
        )
    ).eval()
    x = ids(batch=1, seq=10)
    shifted = torch.arange(7, 17).unsqueeze(0)
    torch.testing.assert_close(model(x).logits, model(x, position_ids=shifted).logits, rtol=1e-4, atol=1e-4)


def test_gpt2_initialisation(tiny_gpt):
    model = tiny_gpt(hidden_size=128, num_hidden_layers=2)
    block = model.transformer.h[0]
    residual_std = 0.02 / (2 * 2) ** 0.5
    for proj in (block.attn.c_proj, block.mlp.c_proj):
        assert abs(proj.weight.std().item() - residual_std) < 0.1 * residual_std
        assert torch.all(proj.bias == 0)
    for w in (block.attn.c_attn.weight, block.mlp.c_fc.weight, model.transformer.wte.weight):
        assert abs(w.std().item() - 0.02) < 0.002
    assert torch.all(block.ln_1.weight == 1) and torch.all(block.ln_1.bias == 0)


# --- loss ---------------------------------------------------------------------------------------------


def test_loss_is_shifted_cross_entropy(make):
    model, x = make(), ids()
    labels = x.clone()
    labels[0, 3] = -100
    out = model(x, labels=labels)
    log_probs = F.log_softmax(out.logits[:, :-1].double(), dim=-1)
    targets = labels[:, 1:]
    keep = targets != -100
    nll = -log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = nll[keep].mean()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_shift_labels_give_the_same_loss_as_labels(make):
    model, x = make(), ids()
    labels = x.clone()
    labels[1, 5:8] = -100
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)  # what the data pipeline stores
    from_labels = model(x, labels=labels).loss
    from_shift = model(x, shift_labels=shift_labels).loss
    torch.testing.assert_close(from_shift, from_labels)
    assert not torch.allclose(model(x, shift_labels=labels).loss, from_labels)  # unshifted would be wrong


def test_num_items_in_batch_sums_micro_batches_to_the_full_batch_mean(make):
    model, x = make(), ids(batch=4)
    labels = x.clone()
    labels[0, 2:] = -100  # uneven token counts per micro-batch
    full = model(x, labels=labels).loss
    n_items = (labels[:, 1:] != -100).sum()
    halves = [model(x[i : i + 2], labels=labels[i : i + 2], num_items_in_batch=n_items).loss for i in (0, 2)]
    torch.testing.assert_close(halves[0] + halves[1], full)
    naive = sum(model(x[i : i + 2], labels=labels[i : i + 2]).loss for i in (0, 2)) / 2
    assert not torch.allclose(naive, full)


def test_logits_to_keep_and_tuple_output(make):
    model, x = make(), ids()
    full = model(x).logits
    last = model(x, logits_to_keep=1).logits
    assert last.shape == (2, 1, 97)
    torch.testing.assert_close(last, full[:, -1:])
    loss, logits = model(x, labels=x, use_cache=False, return_dict=False)
    torch.testing.assert_close(logits, full)


def test_output_hidden_states(make):
    model, x = make(), ids()
    out = model(x, output_hidden_states=True)
    assert len(out.hidden_states) == 3  # embeddings + one per block
    embeddings = model.transformer.wte(x)
    if make.arch == "gpt2":
        embeddings = embeddings + model.transformer.wpe.weight[: x.shape[1]]
    torch.testing.assert_close(out.hidden_states[0], embeddings)
    torch.testing.assert_close(out.hidden_states[-1], model.transformer(x).last_hidden_state)


# --- attention, masks, cache --------------------------------------------------------------------------


def test_causality(make):
    model, x = make(), ids()
    changed = x.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 97
    a, b = model(x).logits, model(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("padded", [False, True])
def test_eager_and_sdpa_logits_agree(make, padded):
    model, x = make(), ids()
    mask = torch.ones_like(x)
    if padded:
        mask[1, :4] = 0  # left padding on the second row
    assert model.config._attn_implementation == "sdpa"
    sdpa = model(x, attention_mask=mask).logits
    model.set_attn_implementation("eager")
    eager = model(x, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(sdpa[keep], eager[keep], rtol=1e-5, atol=1e-5)


def test_default_cache_only_outside_training(make):
    model, x = make(), ids()
    assert isinstance(model(x).cache, DynamicCache)
    assert model(x).cache.get_seq_length() == x.shape[1]
    model.train()
    assert model(x).cache is None


def test_cached_generation_equals_uncached_and_a_manual_loop(make):
    model, prompt = make(**SHARP), ids(batch=2, seq=5)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, use_cache=True, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    manual = prompt
    with torch.no_grad():
        for _ in range(10):
            manual = torch.cat([manual, model(manual).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert len(set(manual[0, 5:].tolist())) > 1  # the check is only meaningful if the output varies
    assert torch.equal(cached, manual)
    assert torch.equal(uncached, manual)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_left_padded_batch_generates_like_each_row_alone(make, attn):
    model = make(**SHARP, attn_implementation=attn)
    long, short = ids(batch=1, seq=7, seed=2)[0], ids(batch=1, seq=4, seed=3)[0]
    pad = 96
    batch = torch.stack([long, torch.cat([torch.full((3,), pad), short])])
    mask = torch.tensor([[1] * 7, [0] * 3 + [1] * 4])
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=pad)
    together = model.generate(batch, attention_mask=mask, **kwargs)[:, 7:]
    for row, prompt in enumerate([long, short]):
        alone = model.generate(prompt[None], **kwargs)[:, len(prompt) :]
        assert torch.equal(together[row : row + 1], alone), row


def test_gradient_checkpointing_recomputes_and_matches_gradients(make):
    model, x = make(), ids()
    model.train()
    calls = []
    for block in model.transformer.h:
        # Not the last module of the block: torch's checkpoint stops recomputing once the saved tensors exist.
        block.attn.register_forward_hook(lambda *_: calls.append(1))

    def grads():
        model.zero_grad()
        calls.clear()
        model(x, labels=x).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    plain, plain_calls = grads()
    model.activation_checkpointing_enable()
    checkpointed, ckpt_calls = grads()
    assert (plain_calls, ckpt_calls) == (2, 4)  # the backward really re-ran both blocks
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


# --- save / load --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_tied_embeddings_are_one_tensor_also_after_save_and_load(make, tmp_path, tied):
    model = make(tie_word_embeddings=tied)
    assert (model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()) == tied
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) != tied
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert (loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()) == tied
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)


def test_save_load_round_trip_through_auto_classes(make, tmp_path):
    model, x = make(), ids()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "recipe_gpt"
    assert saved["auto_map"] == {
        "AutoConfig": "configuration_gpt.GPTConfig",
        "AutoModel": "modeling_gpt.GPTModel",
        "AutoModelForCausalLM": "modeling_gpt.GPTForCausalLM",
    }
    assert (tmp_path / "modeling_gpt.py").is_file() and (tmp_path / "configuration_gpt.py").is_file()

    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, GPTConfig) and config.hidden_size == 32 and config.architecture == make.arch
    assert config.intermediate_size == model.config.intermediate_size
    lm = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(lm) is GPTForCausalLM
    torch.testing.assert_close(lm(x).logits, model(x).logits, rtol=0, atol=0)
    base = AutoModel.from_pretrained(tmp_path).eval()
    assert type(base) is GPTModel
    torch.testing.assert_close(
        base(x).last_hidden_state, model.transformer(x).last_hidden_state, rtol=0, atol=0
    )


def test_attn_implementation_switch_via_from_pretrained(make, tmp_path):
    model, x = make(), ids()
    model.save_pretrained(tmp_path)
    eager = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    out = eager(x, output_attentions=True)  # only the eager path returns attention probabilities
    assert len(out.attentions) == 2 and out.attentions[0].shape == (2, 4, 12, 12)
    torch.testing.assert_close(out.logits, model(x).logits, rtol=1e-5, atol=1e-5)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


def test_bf16_load(make, tmp_path):
    model, x = make(), ids()
    model.save_pretrained(tmp_path)
    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    tied = bf16.lm_head.weight.data_ptr() == bf16.transformer.wte.weight.data_ptr()
    assert tied == model.config.tie_word_embeddings
    out = bf16(x, labels=x)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    # Random tiny logits are O(1) for the modern model (gains ~1, no 1/sqrt(n) shrink): compare relative to them.
    torch.testing.assert_close(out.logits.float(), model(x).logits, rtol=2e-2, atol=2e-2)
    assert bf16.generate(x[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (2, 7)


REMOTE_SCRIPT = r"""
import sys
sys.modules["recipe"] = None  # the package must not be importable: everything comes from the checkpoint
import json, torch
from transformers import AutoModel, AutoModelForCausalLM
path = sys.argv[1]
try:
    import recipe  # noqa
    raise SystemExit("recipe is importable; the test would prove nothing")
except ImportError:
    pass
lm = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
base = AutoModel.from_pretrained(path, trust_remote_code=True)
x = torch.load(path + "/x.pt")
expected = torch.load(path + "/logits.pt")
with torch.no_grad():
    diff = (lm(x).logits - expected).abs().max().item()
gen = lm.generate(x[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
print(json.dumps({"module": type(lm).__module__, "base": type(base).__name__, "diff": diff,
                  "tied": lm.lm_head.weight.data_ptr() == lm.transformer.wte.weight.data_ptr(),
                  "generated": list(gen.shape)}))
"""


def test_trust_remote_code_in_a_process_without_recipe(make, tmp_path):
    model, x = make(), ids()
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    torch.save(x, ckpt / "x.pt")
    with torch.no_grad():
        torch.save(model(x).logits, ckpt / "logits.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run(
        [sys.executable, "-I", "-c", REMOTE_SCRIPT, str(ckpt)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["module"].startswith("transformers_modules.")
    assert result["base"] == "GPTModel"
    assert result["diff"] == 0.0
    assert result["tied"] == model.config.tie_word_embeddings and result["generated"] == [2, 7]


def test_text_generation_pipeline(make, tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    model = make(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    generator = pipeline("text-generation", model=str(tmp_path), trust_remote_code=True)
    out = generator("ROMEO:", max_new_tokens=5, do_sample=False)
    text = out[0]["generated_text"]
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")


def test_dropout_only_in_training(make):
    model, x = make(embd_pdrop=0.3, resid_pdrop=0.3, attn_pdrop=0.3), ids()
    torch.testing.assert_close(model(x).logits, model(x).logits, rtol=0, atol=0)
    model.train()
    assert not torch.allclose(model(x).logits, model(x).logits)
    model.eval()
    model.transformer.h[0].mlp.dropout.p = 0.0
    model.train()
    torch.manual_seed(0)
    a = model(x).logits
    model.transformer.h[0].mlp.dropout.p = 0.3
    torch.manual_seed(0)
    assert not torch.allclose(a, model(x).logits)  # the MLP's dropout is applied (both architectures)


# --- the training forward: attention without a mask, the loss without logits (issue 18) ---------------


def sdpa_nodes(graphs) -> list:
    return [
        n for g in graphs for n in g.nodes if n.target is torch.nn.functional.scaled_dot_product_attention
    ]


def recording_backend(graphs: list, then: str | None = None):
    """Records each graph dynamo traces; runs it as traced, or through the backend `then`."""
    from torch._dynamo.backends.registry import lookup_backend

    def backend(gm, inputs):
        graphs.append(gm.graph)
        return lookup_backend(then)(gm, inputs) if then else gm.forward

    return backend


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_unpadded_forward_reaches_attention_with_no_mask_and_keeps_the_gradients(make, monkeypatch):
    """An unpadded batch without cache or positions: every SDPA node of the compiled graph has no mask and
    is_causal=True; loss and gradients equal eager's; eager builds no mask either (create_causal_mask is
    where the host sync was)."""
    torch._dynamo.reset()
    model, x = make().train(), ids(seq=16)
    graphs = []
    # aot_eager: the backward is AOT autograd's traced one (decomposed ops), not eager autograd's again.
    compiled = torch.compile(model, backend=recording_backend(graphs, then="aot_eager"))
    compiled_loss = compiled(input_ids=x, labels=x, use_cache=False).loss
    compiled_loss.backward()
    compiled_grads = grads(model)
    model.zero_grad()
    import recipe.modeling_gpt as modeling

    def no_mask_expected(**kwargs):
        raise AssertionError("create_causal_mask called for an unpadded batch")

    monkeypatch.setattr(modeling, "create_causal_mask", no_mask_expected)
    eager_loss = model(input_ids=x, labels=x, use_cache=False).loss
    eager_loss.backward()
    torch.testing.assert_close(compiled_loss, eager_loss)
    eager_grads = grads(model)
    assert compiled_grads.keys() == eager_grads.keys() and len(eager_grads) == len(list(model.parameters()))
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], msg=name)
    nodes = sdpa_nodes(graphs)
    assert len(nodes) == 2
    for n in nodes:
        assert n.kwargs.get("attn_mask") is None and (len(n.args) < 4 or n.args[3] is None)
        assert n.kwargs.get("is_causal") is True


def test_flash_attention_gets_no_mask_for_an_unpadded_batch_and_one_for_a_padded_batch(make, monkeypatch):
    """flash_attention_2 (no kernel on a CPU): the function it is registered as sees mask None and the
    module's is_causal for an unpadded batch, and the padding mask for a padded one."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    seen = []

    def recording_flash(module, query, key, value, attention_mask, **kwargs):
        seen.append((attention_mask, module.is_causal))
        return modeling_eager(module, query, key, value, None, **kwargs)

    from recipe.modeling_gpt import eager_attention_forward as modeling_eager

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flash_attention_2", recording_flash)
    model, x = make(), ids()
    model.config._attn_implementation = "flash_attention_2"
    model(input_ids=x, use_cache=False)
    assert [m is None and causal for m, causal in seen] == [True, True]
    seen.clear()
    model(
        input_ids=x, attention_mask=torch.ones_like(x).index_fill_(1, torch.tensor([0]), 0), use_cache=False
    )
    assert len(seen) == 2 and all(m is not None for m, _ in seen)


def test_left_padded_batch_keeps_its_mask_when_compiled(make):
    """With padding the compiled graph still masks: a left-padded row scores its tokens as the row alone."""
    torch._dynamo.reset()
    model, x = make(), ids(seq=10)
    mask = torch.ones_like(x)
    mask[0, :4] = 0  # row 0: 4 pad tokens on the left, then 6 real ones
    graphs = []
    compiled = torch.compile(model, backend=recording_backend(graphs))
    padded = compiled(input_ids=x, attention_mask=mask, use_cache=False).logits
    nodes = sdpa_nodes(graphs)
    assert nodes and all(n.kwargs.get("attn_mask") is not None or n.args[3] is not None for n in nodes)
    # The same positions as in the padded forward (4..9), without the pad tokens to attend to.
    alone = model(input_ids=x[:1, 4:], position_ids=torch.arange(4, 10)[None], use_cache=False).logits
    torch.testing.assert_close(padded[0, 4:], alone[0], rtol=1e-4, atol=1e-5)
    unmasked = model(input_ids=x, use_cache=False).logits
    assert not torch.allclose(unmasked[0, 4:], alone[0], atol=1e-3)  # the padding would change them


def test_skip_logits_returns_the_same_loss_and_gradients_and_no_logits(make):
    model, x = make().train(), ids(batch=3)
    labels = x.clone()
    labels[0, 2:5] = -100
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)
    n = torch.tensor(50)
    reference = model(input_ids=x, shift_labels=shift_labels, num_items_in_batch=n)
    reference.loss.backward()
    expected = grads(model)
    model.zero_grad()
    out = model(input_ids=x, shift_labels=shift_labels, num_items_in_batch=n, skip_logits=True)
    assert out.logits is None
    out.loss.backward()
    torch.testing.assert_close(out.loss, reference.loss)
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, expected[name], msg=name)
    with_labels = model(input_ids=x, labels=labels, skip_logits=True).loss
    torch.testing.assert_close(with_labels, model(input_ids=x, labels=labels).loss)
    with pytest.raises(ValueError, match="skip_logits"):
        model(input_ids=x, skip_logits=True)


# --- the chunked head ---------------------------------------------------------------------------------------


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference over the reference's largest value."""
    return float((a - b).abs().max() / b.abs().max())


def head_batch(vocab: int = 97, chunk_tokens: int = 5):
    """(input_ids, shift_labels) of 3 x 12 tokens whose ignored targets (-100) start, end and straddle chunks
    of `chunk_tokens` tokens, and a whole ignored row."""
    x = ids(batch=3, vocab=vocab)
    y = F.pad(x[:, 1:], (0, 1), value=-100)
    y[0, :chunk_tokens] = -100  # exactly the first chunk
    y[1, chunk_tokens - 1 : chunk_tokens + 2] = -100  # across a chunk boundary (flattened: token 16-18)
    y[2] = -100  # a row with nothing to score
    return x, y


@pytest.mark.parametrize("chunk_tokens", [5, 1, 10**6])  # several chunks, one token each, one for all
def test_chunked_loss_and_gradients_equal_transformers_loss(make, monkeypatch, chunk_tokens):
    """skip_logits's chunked cross-entropy against the plain path (full logits, transformers' ForCausalLMLoss):
    loss within 1e-5 relative, every gradient within 1e-5 of its largest value, with num_items_in_batch and
    without (the mean), ignored targets on chunk boundaries."""
    import recipe.modeling_gpt as modeling

    monkeypatch.setattr(modeling, "HEAD_CHUNK_LOGITS", chunk_tokens * 97)
    model = make().train()
    x, y = head_batch()
    for n in (torch.tensor(41), None):
        model.zero_grad()
        plain = model(input_ids=x, shift_labels=y, num_items_in_batch=n)
        plain.loss.backward()
        expected = grads(model)
        model.zero_grad()
        chunked = model(input_ids=x, shift_labels=y, num_items_in_batch=n, skip_logits=True)
        chunked.loss.backward()
        assert abs(float(chunked.loss.detach() / plain.loss.detach()) - 1) < 1e-5
        got = grads(model)
        assert got.keys() == expected.keys()
        for name in expected:
            assert relative(got[name], expected[name]) < 1e-5, name


def test_chunked_loss_under_bf16_autocast_and_accumulation(make, monkeypatch):
    """Under bf16 autocast the head's matmuls run in bf16 as nn.Linear's do: the loss and gradients stay within
    bf16's tolerance of the plain path; two micro-batches accumulated over num_items_in_batch give one batch's
    gradients."""
    import recipe.modeling_gpt as modeling

    monkeypatch.setattr(modeling, "HEAD_CHUNK_LOGITS", 5 * 97)
    model = make().train()
    x, y = head_batch()
    n = y.ne(-100).sum()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(input_ids=x, shift_labels=y, num_items_in_batch=n)
        plain.loss.backward()
        expected = grads(model)
        model.zero_grad()
        for rows in (
            slice(0, 2),
            slice(2, 3),
        ):  # accumulation: each micro-batch's sum over the window's count
            model(
                input_ids=x[rows], shift_labels=y[rows], num_items_in_batch=n, skip_logits=True
            ).loss.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked = model(input_ids=x, shift_labels=y, num_items_in_batch=n, skip_logits=True).loss
    assert abs(float(chunked.detach() / plain.loss.detach()) - 1) < 2e-2
    for name, grad in grads(model).items():
        assert relative(grad, expected[name]) < 3e-2, name


def test_chunked_loss_under_fp16_keeps_a_large_windows_gradients(make, monkeypatch):
    """fp16 autocast with the count of a large window (1e5 targets): (softmax - onehot) / count is below fp16's
    smallest value, so the division comes after the matmuls, in fp32; with the loss scaled as GradScaler
    scales it, the gradients stay within fp16's tolerance of the fp32 plain path instead of underflowing."""
    import recipe.modeling_gpt as modeling

    monkeypatch.setattr(modeling, "HEAD_CHUNK_LOGITS", 5 * 97)
    model = make().train()
    x, y = head_batch()
    n = torch.tensor(100_000)
    model(input_ids=x, shift_labels=y, num_items_in_batch=n).loss.backward()
    expected = grads(model)
    model.zero_grad()
    scale = 2.0**16  # as GradScaler does: the loss scaled up, so the blocks' fp16 backward does not underflow
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(input_ids=x, shift_labels=y, num_items_in_batch=n, skip_logits=True).loss
    (loss * scale).backward()
    for name, grad in grads(model).items():
        assert relative(grad / scale, expected[name]) < 2e-2, name


def test_compiled_chunked_loss_matches_eager(tiny_gpt, monkeypatch):
    """torch.compile with fullgraph (the chunk loop and the autograd.Function trace without a break; AOT
    autograd builds the backward from the Function's) gives eager's loss and gradients; compiled, the loop is
    cut into at most HEAD_COMPILED_CHUNKS chunks (it is unrolled in the graph), where eager runs 36 of 1 token."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    import recipe.modeling_gpt as modeling

    monkeypatch.setattr(modeling, "HEAD_CHUNK_LOGITS", 1 * 97)
    model = randomise(tiny_gpt(architecture="modern")).train()
    x, y = head_batch()
    n = torch.tensor(41)
    eager = model(input_ids=x, shift_labels=y, num_items_in_batch=n, skip_logits=True).loss
    eager.backward()
    expected = grads(model)
    model.zero_grad()
    head_matmuls = []  # in the forward graph: the matmuls whose output is (chunk, V), one per chunk

    def count(gm, example_inputs):
        head_matmuls.extend(
            node for node in gm.graph.nodes
            if node.target is torch.ops.aten.mm.default and node.meta["val"].shape[-1] == 97
        )  # fmt: skip
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=count, bw_compiler=lambda gm, _: make_boxed_func(gm.forward))
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    loss = compiled(input_ids=x, shift_labels=y, num_items_in_batch=n, skip_logits=True).loss
    loss.backward()
    assert abs(float(loss.detach() / eager.detach()) - 1) < 1e-5
    for name, grad in grads(model).items():
        assert relative(grad, expected[name]) < 1e-5, name
    assert len(head_matmuls) == modeling.HEAD_COMPILED_CHUNKS  # 36 tokens: 8 chunks of 5 (the last of 1)


def test_token_scores_equal_log_softmax_of_the_whole_logits(make, monkeypatch):
    """Evaluation's entry: each target's log-probability over all rows and its argmax hit, as from the full
    logits, 0 / False where ignored; its loss is the plain loss."""
    import recipe.modeling_gpt as modeling

    monkeypatch.setattr(modeling, "HEAD_CHUNK_LOGITS", 5 * 97)
    model = make()
    x, y = head_batch()
    with torch.no_grad():
        out = model(input_ids=x, shift_labels=y, token_scores=True)
        logits = model(input_ids=x).logits
        plain = model(input_ids=x, shift_labels=y).loss
    keep = y.ne(-100)
    expected = torch.log_softmax(logits.float(), -1).gather(2, y.clamp(min=0)[..., None])[..., 0] * keep
    torch.testing.assert_close(out.token_logprobs, expected, rtol=0, atol=1e-5)
    assert torch.equal(out.token_correct, logits.argmax(-1).eq(y) & keep)
    assert out.logits is None and abs(float(out.loss / plain) - 1) < 1e-5
    with pytest.raises(ValueError, match="token_scores"):
        model(input_ids=x, token_scores=True)


class LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the most elements any op's output had."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_op_builds_the_whole_logits(make, monkeypatch):
    """With chunks of 5 tokens, no tensor in the training step (forward and backward) or the evaluation forward
    has more elements than a chunk's logits (5 x V) or a weight's, while the plain path builds (B*T, V)."""
    import recipe.modeling_gpt as modeling

    monkeypatch.setattr(modeling, "HEAD_CHUNK_LOGITS", 5 * 512)
    model = make(vocab_size=512).train()
    x, y = head_batch(vocab=512)
    bound = max(5 * 512, max(p.numel() for p in model.parameters()))
    with LargestTensor() as seen:
        model(input_ids=x, shift_labels=y, skip_logits=True).loss.backward()
    assert seen.largest <= bound
    with LargestTensor() as seen, torch.no_grad():
        model(input_ids=x, shift_labels=y, token_scores=True)
    assert seen.largest <= bound
    with LargestTensor() as seen:
        model(input_ids=x, shift_labels=y).loss.backward()
    assert seen.largest >= x.numel() * 512  # the harness sees the whole logits where they are built
