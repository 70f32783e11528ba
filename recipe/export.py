"""Export a recipe GPT checkpoint to a stock `GPT2LMHeadModel` folder (no remote code needed to load it).

    python -m recipe.export --model outputs/shakespeare --to gpt2 --output outputs/shakespeare-gpt2

The module names already match GPT-2's, so the export is a copy plus a transpose: GPT-2 stores its projections
in `Conv1D`, whose weight is `nn.Linear`'s transposed. Logits of both models are compared on a random batch
before anything is written; a mismatch above 1e-4 is an error.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

MODEL_TYPE = "recipe_gpt"
TOLERANCE = 1e-4
# Linear weights inside the blocks; GPT-2 keeps them as Conv1D (in_features, out_features).
_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt2_config_from(config) -> GPT2Config:
    """The stock GPT-2 config that computes exactly what our config does."""
    if getattr(config, "model_type", None) != MODEL_TYPE:
        raise ValueError(
            f"expected a {MODEL_TYPE!r} model, got model_type={getattr(config, 'model_type', None)!r}"
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


@torch.no_grad()
def max_logit_diff(ours, gpt2: GPT2LMHeadModel, seed: int = 0) -> float:
    """Largest |logit difference| on a random batch, both models in eval mode."""
    config = ours.config
    generator = torch.Generator().manual_seed(seed)
    seq_len = min(16, config.max_position_embeddings)
    input_ids = torch.randint(0, config.vocab_size, (2, seq_len), generator=generator).to(ours.device)
    return (ours(input_ids).logits.float() - gpt2(input_ids).logits.float()).abs().max().item()


def export_to_gpt2(model, output_dir: str | os.PathLike, tokenizer=None) -> GPT2LMHeadModel:
    """Convert `model` (a recipe GPTForCausalLM, local or remote-code class) to GPT-2, verify, save, return it.

    Verification runs in fp32 whatever the checkpoint dtype; the saved model keeps the checkpoint's dtype.
    Raises ValueError for a model that cannot be exported and RuntimeError if the logits differ.
    """
    gpt2_config = gpt2_config_from(model.config)
    reference = model if model.dtype == torch.float32 else copy.deepcopy(model).float()
    was_training = reference.training
    reference.eval()

    gpt2 = GPT2LMHeadModel(gpt2_config).to(reference.device)
    missing, unexpected = gpt2.load_state_dict(gpt2_state_dict_from(reference.state_dict()), strict=False)
    # The tied lm_head may be absent from a state dict; anything else missing means the layouts diverged.
    missing = [k for k in missing if not (k == "lm_head.weight" and gpt2_config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"state dict does not map onto GPT-2: missing {missing}, unexpected {unexpected}")
    gpt2.eval()

    diff = max_logit_diff(reference, gpt2)
    reference.train(was_training)
    if not diff <= TOLERANCE:  # also catches NaN
        raise RuntimeError(
            f"exported GPT-2 logits differ from the original by {diff:.3g} (> {TOLERANCE}); nothing saved"
        )

    gpt2 = gpt2.to(model.dtype)
    if getattr(model, "generation_config", None) is not None:  # keep sampling defaults saved with the model
        gpt2.generation_config = copy.deepcopy(model.generation_config)
    gpt2.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    return gpt2


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
    parser.add_argument("--to", choices=["gpt2"], default="gpt2", help="target architecture")
    parser.add_argument("--output", required=True, help="folder to write the exported model to")
    args = parser.parse_args(argv)

    try:
        model, tokenizer = load_checkpoint(args.model)
        gpt2 = export_to_gpt2(model, args.output, tokenizer=tokenizer)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"export failed: {err}", file=sys.stderr)
        return 1
    n_params = sum(p.numel() for p in gpt2.parameters())
    print(
        f"exported {args.model} -> {args.output} as GPT2LMHeadModel ({n_params / 1e6:.2f}M parameters, "
        f"logits verified within {TOLERANCE}){'' if tokenizer is None else ', with tokenizer'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
