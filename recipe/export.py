"""Export a recipe GPT checkpoint to a stock transformers architecture (no remote code needed to load it).

    python -m recipe.export --model outputs/shakespeare-gpt2 --to gpt2 --output outputs/shakespeare-gpt2-hf
    python -m recipe.export --model outputs/shakespeare --to qwen3 --output outputs/shakespeare-qwen3

- `architecture: gpt2` -> `GPT2LMHeadModel`. The module names already match GPT-2's, so the export is a copy
  plus a transpose: GPT-2 stores its projections in `Conv1D`, whose weight is `nn.Linear`'s transposed.
- `architecture: modern` -> `Qwen3ForCausalLM` (with QK-norm) or `LlamaForCausalLM` (without): a rename plus a
  split of the fused [q; k; v] and [gate; up] matrices; rotary layout, norm placement and scaling are the same.
Without `--to`, the target follows the architecture. Logits of both models are compared on a random batch
before anything is written; a mismatch above 1e-4 is an error.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from recipe.config import padding_ids
from recipe.configuration_gpt import GPTConfig

MODEL_TYPE = GPTConfig.model_type
TARGETS = ("gpt2", "qwen3", "llama")
TOLERANCE = 1e-4
# Linear weights inside the blocks; GPT-2 keeps them as Conv1D (in_features, out_features).
_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _check_ours(config) -> None:
    if getattr(config, "model_type", None) != MODEL_TYPE:
        raise ValueError(
            f"expected a {MODEL_TYPE!r} model, got model_type={getattr(config, 'model_type', None)!r}"
        )


def default_target(config) -> str:
    """The stock architecture that represents `config` exactly."""
    if getattr(config, "architecture", "gpt2") == "gpt2":
        return "gpt2"
    return "qwen3" if config.qk_norm else "llama"


def gpt2_config_from(config) -> GPT2Config:
    """The stock GPT-2 config that computes exactly what our config does."""
    _check_ours(config)
    if getattr(config, "architecture", "gpt2") != "gpt2":
        raise ValueError(
            f"this is a {config.architecture!r} model (rotary, RMSNorm, gated MLP): GPT-2 cannot represent it; "
            f"export it with --to {default_target(config)}"
        )
    if not config.bias:
        raise ValueError(
            "this model was trained with bias=False, but GPT-2 always has biases in its linear layers and "
            "LayerNorms; it cannot be exported to gpt2 exactly (train with bias=True to export)"
        )
    return GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.max_position_embeddings,
        n_embd=config.hidden_size,
        n_layer=config.num_hidden_layers,
        n_head=config.num_attention_heads,
        n_inner=config.intermediate_size,
        activation_function=config.hidden_act,
        resid_pdrop=config.resid_pdrop,
        embd_pdrop=config.embd_pdrop,
        attn_pdrop=config.attn_pdrop,
        layer_norm_epsilon=config.layer_norm_epsilon,
        initializer_range=config.initializer_range,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        tie_word_embeddings=config.tie_word_embeddings,
        use_cache=True,
    )


def gpt2_state_dict_from(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Same keys; block projections transposed into Conv1D layout."""
    return {
        key: value.t().contiguous() if key.endswith(_CONV1D_SUFFIXES) else value
        for key, value in state_dict.items()
    }


def modern_config_from(config, target: str) -> Qwen3Config | LlamaConfig:
    """The stock Qwen3 / Llama config that computes exactly what our modern config does (inference: the
    stock models have attention dropout only, so training dropout is not carried over)."""
    _check_ours(config)
    if getattr(config, "architecture", "gpt2") != "modern":
        raise ValueError(f"this is a GPT-2 architecture model: export it with --to gpt2, not --to {target}")
    if target == "qwen3" and not config.qk_norm:
        raise ValueError(
            "this model has qk_norm=False, but Qwen3 always normalises q and k; export it with --to llama"
        )
    if target == "llama" and config.qk_norm:
        raise ValueError("this model has qk_norm=True, which Llama does not have; export it with --to qwen3")
    common = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        head_dim=config.hidden_size // config.num_attention_heads,
        hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        rms_norm_eps=config.layer_norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_theta)},
        attention_bias=False,
        attention_dropout=config.attn_pdrop,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        use_cache=True,
    )
    if target == "qwen3":
        return Qwen3Config(**common)
    return LlamaConfig(**common, mlp_bias=False)


def modern_state_dict_from(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Qwen3 / Llama names; fused [q; k; v] and [gate; up] split along the output dimension."""
    top = {
        "transformer.wte.weight": "model.embed_tokens.weight",
        "transformer.ln_f.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    }
    inside = {
        "ln_1.weight": ["input_layernorm.weight"],
        "ln_2.weight": ["post_attention_layernorm.weight"],
        "attn.c_attn.weight": [
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.weight",
        ],
        "attn.q_norm.weight": ["self_attn.q_norm.weight"],
        "attn.k_norm.weight": ["self_attn.k_norm.weight"],
        "attn.c_proj.weight": ["self_attn.o_proj.weight"],
        "mlp.c_fc.weight": ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
        "mlp.c_proj.weight": ["mlp.down_proj.weight"],
    }
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")  # transformer.h.{i}.{rest}
        rest = ".".join(parts[3:])
        if key in top:
            out[top[key]] = value
        elif parts[:2] == ["transformer", "h"] and rest in inside:
            names = inside[rest]
            for name, chunk in zip(names, value.chunk(len(names), dim=0)):
                out[f"model.layers.{parts[2]}.{name}"] = chunk.contiguous()
        else:
            out[key] = value  # reported as unexpected by the caller
    return out


@torch.no_grad()
def max_logit_diff(ours, gpt2: PreTrainedModel, seed: int = 0) -> float:
    """Largest |logit difference| on a random batch, both models in eval mode."""
    config = ours.config
    generator = torch.Generator().manual_seed(seed)
    seq_len = min(16, config.max_position_embeddings)
    input_ids = torch.randint(0, config.vocab_size, (2, seq_len), generator=generator).to(ours.device)
    return (ours(input_ids).logits.float() - gpt2(input_ids).logits.float()).abs().max().item()


def export_model(
    model, output_dir: str | os.PathLike, to: str | None = None, tokenizer=None
) -> PreTrainedModel:
    """Convert `model` (a recipe GPTForCausalLM, local or remote-code class) to the stock architecture `to`
    (gpt2, qwen3, llama; None: the one its architecture maps to), verify, save, return it.

    Verification runs in fp32 whatever the checkpoint dtype; the saved model keeps the checkpoint's dtype.
    Raises ValueError for a model that cannot be exported and RuntimeError if the logits differ.
    """
    to = to or default_target(model.config)
    if to == "gpt2":
        stock_config, convert, stock_class = (
            gpt2_config_from(model.config),
            gpt2_state_dict_from,
            GPT2LMHeadModel,
        )
    elif to in ("qwen3", "llama"):
        stock_config, convert = modern_config_from(model.config, to), modern_state_dict_from
        stock_class = Qwen3ForCausalLM if to == "qwen3" else LlamaForCausalLM
    else:
        raise ValueError(f"unknown export target {to!r}; use one of {', '.join(TARGETS)}")
    reference = model if model.dtype == torch.float32 else copy.deepcopy(model).float()
    was_training = reference.training
    reference.eval()

    stock = stock_class(stock_config).to(reference.device)
    missing, unexpected = stock.load_state_dict(convert(reference.state_dict()), strict=False)
    # The tied lm_head may be absent from a state dict; anything else missing means the layouts diverged.
    missing = [k for k in missing if not (k == "lm_head.weight" and stock_config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(
            f"state dict does not map onto {stock_class.__name__}: missing {missing}, unexpected {unexpected}"
        )
    stock.eval()

    diff = max_logit_diff(reference, stock)
    reference.train(was_training)
    if not diff <= TOLERANCE:  # also catches NaN
        raise RuntimeError(
            f"exported {stock_class.__name__} logits differ from the original by {diff:.3g} (> {TOLERANCE}); "
            "nothing saved"
        )

    stock = stock.to(model.dtype)
    if getattr(model, "generation_config", None) is not None:  # keep sampling defaults saved with the model
        stock.generation_config = copy.deepcopy(model.generation_config)
    padding = padding_ids(stock_config.vocab_size, tokenizer)
    if padding and not stock.generation_config.suppress_tokens:  # a model built here, never saved by a run
        stock.generation_config.suppress_tokens = padding
    stock.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    return stock


def export_to_gpt2(model, output_dir: str | os.PathLike, tokenizer=None) -> GPT2LMHeadModel:
    """`export_model(..., to="gpt2")`."""
    return export_model(model, output_dir, to="gpt2", tokenizer=tokenizer)


def load_checkpoint(path: str | os.PathLike):
    """Load our model (and its tokenizer, if the folder has one) with clear errors for anything else."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json)")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    if getattr(config, "model_type", None) != MODEL_TYPE:
        raise ValueError(
            f"{folder} holds a {config.model_type!r} model, not a recipe GPT ({MODEL_TYPE!r}); nothing to export"
        )
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    has_tokenizer = any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True) if has_tokenizer else None
    return model, tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipe.export", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", required=True, help="a recipe GPT checkpoint folder (save_pretrained output)"
    )
    parser.add_argument(
        "--to",
        choices=TARGETS,
        default=None,
        help="target architecture (default: gpt2 for architecture gpt2; qwen3, or llama without qk_norm, for modern)",
    )
    parser.add_argument("--output", required=True, help="folder to write the exported model to")
    args = parser.parse_args(argv)

    try:
        model, tokenizer = load_checkpoint(args.model)
        stock = export_model(model, args.output, to=args.to, tokenizer=tokenizer)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"export failed: {err}", file=sys.stderr)
        return 1
    n_params = sum(p.numel() for p in stock.parameters())
    print(
        f"exported {args.model} -> {args.output} as {type(stock).__name__} ({n_params / 1e6:.2f}M parameters, "
        f"logits verified within {TOLERANCE}){'' if tokenizer is None else ', with tokenizer'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
