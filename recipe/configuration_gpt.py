"""Configuration of the recipe GPT: a GPT-2 style decoder with standard transformers field names.

This file is copied into every saved checkpoint (with `modeling_gpt.py`), so it must only import
`transformers` and the standard library.
"""

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN


class GPTConfig(PreTrainedConfig):
    r"""
    A GPT-2 family decoder: learned positions, pre-LayerNorm blocks, fused QKV, GELU MLP, tied embeddings.

    `intermediate_size=None` means `4 * hidden_size`; it is resolved when the config is built, so the saved
    `config.json` holds the number. Invalid values raise `ValueError` naming the field.

    Example:

    ```python
    >>> from recipe import GPTConfig, GPTForCausalLM
    >>> model = GPTForCausalLM(GPTConfig(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4))
    ```
    """

    # Not "gpt2": built-in names cannot be registered again, and ours saves its own code.
    model_type = "recipe_gpt"

    vocab_size: int = 50257
    max_position_embeddings: int = 1024
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int | None = None
    hidden_act: str = "gelu_pytorch_tanh"
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    bias: bool = True
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    # transformers 5 no longer declares these on the base config: without the field the embeddings stay untied.
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
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
        if not isinstance(self.bias, bool):
            raise ValueError(f"GPTConfig.bias must be true or false, got {self.bias!r}")


__all__ = ["GPTConfig"]
