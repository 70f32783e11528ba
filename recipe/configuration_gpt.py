"""Configuration of the recipe GPT: a decoder in two architectures, with standard transformers field names.

This file is copied into every saved checkpoint (with `modeling_gpt.py`), so it must only import
`transformers` and the standard library.
"""

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN

ARCHITECTURES = ("gpt2", "modern")


class GPTConfig(PreTrainedConfig):
    r"""
    A pre-norm decoder with fused QKV, in one of two architectures:

    - `"gpt2"`: GPT-2 exactly (learned positions, LayerNorm, GELU MLP, biases); exports to `GPT2LMHeadModel`.
    - `"modern"`: rotary positions, RMSNorm, optional QK-norm (RMSNorm per head), gated MLP (SwiGLU with
      `hidden_act="silu"`), no biases, untied embeddings, zero-initialised output projections; exports to `Qwen3ForCausalLM`
      (with QK-norm) or `LlamaForCausalLM` (without).

    Fields left `None` take the architecture's default when the config is built, so the saved `config.json`
    holds the value: `intermediate_size` (gpt2: 4 x hidden; modern: 8/3 x hidden rounded up to a multiple of
    64, the gated MLP's parameter count), `hidden_act` (gelu_pytorch_tanh / silu), `bias` (true / false),
    `qk_norm` (false / true), `tie_word_embeddings` (true / false). Invalid values raise `ValueError` naming the field.

    Example:

    ```python
    >>> from recipe import GPTConfig, GPTForCausalLM
    >>> model = GPTForCausalLM(GPTConfig(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4))
    ```
    """

    # Not "gpt2": built-in names cannot be registered again, and ours saves its own code.
    model_type = "recipe_gpt"

    architecture: str = "gpt2"
    vocab_size: int = 50257
    max_position_embeddings: int = 1024
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int | None = None
    hidden_act: str | None = None
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    bias: bool | None = None
    qk_norm: bool | None = None
    rope_theta: float = 10000.0
    layer_norm_epsilon: float = 1e-5  # LayerNorm (gpt2) or RMSNorm (modern) epsilon
    initializer_range: float = 0.02
    # transformers 5 no longer declares these on the base config: without the field the embeddings stay untied.
    tie_word_embeddings: bool | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"GPTConfig.architecture must be one of {ARCHITECTURES}, got {self.architecture!r}"
            )
        modern = self.architecture == "modern"
        if self.intermediate_size is None:
            # The gated MLP has three matrices instead of two: 8/3 keeps the parameter count of 4 x hidden.
            self.intermediate_size = (
                -(-8 * self.hidden_size // 3 // 64) * 64 if modern else 4 * self.hidden_size
            )
        if self.hidden_act is None:
            self.hidden_act = "silu" if modern else "gelu_pytorch_tanh"
        if self.bias is None:
            self.bias = not modern
        if self.qk_norm is None:
            self.qk_norm = modern
        if self.tie_word_embeddings is None:
            self.tie_word_embeddings = not modern
        self._check()
        super().__post_init__(**kwargs)

    def _check(self) -> None:
        """Raise `ValueError` naming the first invalid field (a user mistake, so not an assert)."""
        for name in (
            "vocab_size",
            "max_position_embeddings",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"GPTConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        for name in ("embd_pdrop", "resid_pdrop", "attn_pdrop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"GPTConfig.{name} must be a probability in [0, 1), got {value!r}")
        if self.hidden_act not in ACT2FN:
            raise ValueError(
                f"GPTConfig.hidden_act {self.hidden_act!r} is not a transformers activation; "
                f"use one of {sorted(ACT2FN)}"
            )
        for name in ("layer_norm_epsilon", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive number, got {value!r}")
        for name in ("bias", "qk_norm", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be true or false, got {getattr(self, name)!r}")
        # The modern architecture takes only what a stock architecture (Qwen3 / Llama) expresses exactly.
        if self.architecture == "modern" and self.bias:
            raise ValueError("GPTConfig.bias must be false for the modern architecture (it has no biases)")
        if self.architecture == "gpt2" and self.qk_norm:
            raise ValueError(
                "GPTConfig.qk_norm is only available with architecture='modern' (GPT-2 has none)"
            )
        if self.architecture == "modern" and (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("GPTConfig.hidden_size / num_attention_heads must be even for rotary positions")
        if (
            isinstance(self.rope_theta, bool)
            or not isinstance(self.rope_theta, (int, float))
            or self.rope_theta <= 0
        ):
            raise ValueError(f"GPTConfig.rope_theta must be a positive number, got {self.rope_theta!r}")


__all__ = ["ARCHITECTURES", "GPTConfig"]
