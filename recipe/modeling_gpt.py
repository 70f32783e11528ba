"""The recipe GPT: a decoder in two architectures (`config.architecture`), written as a transformers 5 model.

Both use GPT-2's module names (`transformer.wte/wpe/h/ln_f`, `ln_1/attn/ln_2/mlp`, `c_attn/c_proj/c_fc`):
- "gpt2": the export to a stock `GPT2LMHeadModel` is a transpose, not a rename (GPT-2's `Conv1D` stores
  `nn.Linear`'s weight transposed).
- "modern": rotary positions (no `wpe`), RMSNorm, QK-norm (`attn.q_norm/k_norm`), a gated MLP whose `c_fc`
  holds [gate; up], no biases. The layouts are Qwen3's / Llama's (rotate-half rotary, norm per head before the
  rotation), so the export to them only splits the fused matrices.
This file and `configuration_gpt.py` are copied into every checkpoint, so imports between them are relative
and nothing else from `recipe` is imported.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_gpt import GPTConfig

# Attention functions that apply causality themselves when given no mask (`is_causal=True` on the module).
_IS_CAUSAL_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3")


# Logits in flight at once in the chunked head: 2**25 of them (128 MiB in fp32) caps a chunk at 667 tokens of a
# 50,304-token vocabulary and leaves a small vocabulary's batch whole (8,192 tokens of 4,096 ids). Measured in
# BENCHMARKS.md ("Chunked head"): 2**24-2**26 run alike; smaller chunks pay per-chunk overhead.
HEAD_CHUNK_LOGITS = 2**25
# Under torch.compile the chunk loop is unrolled into the graph, and compiling grows faster than the chunk count
# (a 1-layer model on this CPU: 45 s at 1 chunk, 60 s at 8, 209 s at 32): compiled, the tokens are cut into at
# most this many chunks, each larger where the batch is (fused by inductor, a chunk's logits cost ~4 bytes each).
HEAD_COMPILED_CHUNKS = 8


def head_chunks(tokens: int, vocab_size: int, chunk_logits: int | None = None) -> int:
    """Tokens per chunk of the head: as many as keep `chunk_logits` (default HEAD_CHUNK_LOGITS) logits in
    flight, at least one; under torch.compile enough for at most HEAD_COMPILED_CHUNKS chunks."""
    chunk = max(1, min(tokens, (chunk_logits or HEAD_CHUNK_LOGITS) // vocab_size))
    if torch.compiler.is_compiling():
        chunk = max(chunk, -(-tokens // HEAD_COMPILED_CHUNKS))
    return chunk


def _matmul_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's where it is on (as `nn.Linear` would), else the input's."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over targets of -log softmax(hidden @ weight.T)[target], divided by `count`, one chunk of tokens at a
    time, so no (N, V) logits exist beyond a chunk's. The forward also computes both gradients (a chunk's
    softmax is at hand then), as liger-kernel's fused linear cross-entropy does, so the backward only scales
    them by the loss's incoming gradient: the same three matmuls per token as the unchunked loss, no recompute.
    The matmuls run in autocast's dtype where it is on (bf16 logits, as `nn.Linear` gives), the softmax and the
    weight's gradient accumulate in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, count, chunk):  # (N, H), (V, H), (N,), scalar, int
        dtype = _matmul_dtype(hidden)
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            total = hidden.new_zeros((), dtype=torch.float32)
            grad_hidden = []  # per chunk, (c, H)
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start : start + chunk].to(dtype)  # (c, H)
                t = targets[start : start + chunk]  # (c,)
                keep = t.ne(-100)
                safe = t.masked_fill(~keep, 0).unsqueeze(1)  # (c, 1)
                logits = (h @ w.T).float()  # (c, V) fp32: the chunk's only logits
                lse = torch.logsumexp(logits, dim=-1)  # (c,)
                total = total + torch.where(keep, lse - logits.gather(1, safe).squeeze(1), 0.0).sum()
                if need_hidden or need_weight:
                    # d loss / d logits = (softmax - onehot(target)) / count, zero for ignored targets.
                    grad = logits.sub_(lse.unsqueeze(1)).exp_()
                    grad.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=grad.dtype))
                    # Divided by count only after the matmuls, in fp32: (softmax - onehot) / count is ~1e-9 for
                    # most ids of a large window, below fp16's smallest value (and the loss scale comes later).
                    grad = torch.where(keep.unsqueeze(1), grad, 0.0).to(dtype)  # (c, V)
                    if need_hidden:
                        grad_hidden.append(((grad @ w).float() / count).to(hidden.dtype))
                    if need_weight:  # fp16 sums over the chunk's tokens could overflow: fp32 there
                        grad_weight += (
                            grad.T.float() @ h.float() if dtype == torch.float16 else (grad.T @ h).float()
                        )
        if need_weight:
            grad_weight /= count
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(torch.cat(grad_hidden) if need_hidden else None, grad_weight)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def causal_lm_loss(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    shift_labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_logits: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of the head `hidden_states @ weight.T` ((B, T, H) and (V, H)) against already-shifted
    (B, T) targets (-100 = ignore), in fp32, one chunk of tokens at a time: no (B, T, V) logits are built,
    eager or compiled, in training or evaluation. Sum over targets / num_items_in_batch, or their mean without
    it; equal to `ForCausalLMLoss` on the full logits."""
    hidden, targets = hidden_states.flatten(0, 1), shift_labels.flatten()  # (N, H), (N,)
    count = targets.ne(-100).sum() if num_items_in_batch is None else num_items_in_batch
    count = torch.as_tensor(count, device=hidden.device, dtype=torch.float32)
    chunk = head_chunks(hidden.shape[0], weight.shape[0], chunk_logits)
    return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, count, chunk)


@torch.no_grad()
def head_token_scores(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    shift_labels: torch.Tensor,
    chunk_logits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each target over all V rows, whether it is the argmax), both (B, T), 0 and False
    where the target is -100; chunked like `causal_lm_loss`, so evaluation never builds (B, T, V) logits."""
    hidden, targets = hidden_states.flatten(0, 1), shift_labels.flatten()  # (N, H), (N,)
    dtype = _matmul_dtype(hidden)
    chunk = head_chunks(hidden.shape[0], weight.shape[0], chunk_logits)
    logprobs, correct = [], []
    with torch.autocast(hidden.device.type, enabled=False):
        w = weight.to(dtype)
        for start in range(0, hidden.shape[0], chunk):
            t = targets[start : start + chunk]
            keep = t.ne(-100)
            logits = hidden[start : start + chunk].to(dtype) @ w.T  # (c, V) in the matmul's dtype
            target_logits = logits.gather(1, t.masked_fill(~keep, 0).unsqueeze(1)).squeeze(1).float()
            logprobs.append(torch.where(keep, target_logits - torch.logsumexp(logits.float(), dim=-1), 0.0))
            correct.append(logits.argmax(-1).eq(t) & keep)
    return torch.cat(logprobs).view_as(shift_labels), torch.cat(correct).view_as(shift_labels)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain attention, used for `attn_implementation="eager"`. q: (B, nh, T, hs), k/v: (B, nh, S, hs)."""
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (B, nh, T, S)
    if attention_mask is not None:  # additive float mask from create_causal_mask: 0 or -inf-ish
        attn_weights = attn_weights + attention_mask
    # Softmax in fp32 so bf16 weights do not lose the small probabilities.
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(value.dtype)
    if dropout > 0.0:
        attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()  # (B, T, nh, hs)
    return attn_output, attn_weights


class GPTRMSNorm(nn.Module):
    """RMSNorm with a gain, computed in fp32 as Qwen3 / Llama compute it (so the export matches in bf16 too)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        hidden_states = hidden_states.float()
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden_states.to(dtype)


def make_norm(config: GPTConfig, size: int) -> nn.Module:
    if config.architecture == "modern":
        return GPTRMSNorm(size, config.layer_norm_epsilon)
    return nn.LayerNorm(size, eps=config.layer_norm_epsilon, bias=config.bias)


def rotary_cos_sin(config: GPTConfig, position_ids: torch.Tensor, dtype: torch.dtype):
    """cos, sin of shape (B or 1, T, hs) for the rotate-half layout (frequencies repeated in both halves).

    Computed per forward from the positions: a few KB, and no buffer to materialise when loading."""
    head_dim = config.hidden_size // config.num_attention_heads
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float, device=position_ids.device) / head_dim
    inv_freq = 1.0 / (config.rope_theta**exponent)  # (hs/2,)
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hs)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, nh, T, hs); rotates the pairs (i, i + hs/2), as transformers' `rotate_half` does."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hs)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class GPTAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True  # read by the sdpa / flash / flex attention functions
        self.attn_pdrop = config.attn_pdrop
        self.c_attn = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.bias)
        self.c_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.bias)
        self.c_proj.is_residual_projection = True
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        self.rotary = config.architecture == "modern"
        if config.qk_norm:
            self.q_norm = GPTRMSNorm(self.head_dim, config.layer_norm_epsilon)
            self.k_norm = GPTRMSNorm(self.head_dim, config.layer_norm_epsilon)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, C = hidden_states.shape
        # One matmul for q, k, v; the split is a view: (B, T, 3C) -> 3 x (B, nh, T, hs).
        qkv = self.c_attn(hidden_states).view(B, T, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.config.qk_norm:  # per head, over hs, before the rotation (Qwen3's order)
            query, key = self.q_norm(query), self.k_norm(key)
        if self.rotary:
            cos, sin = position_embeddings
            query, key = apply_rotary(query, cos, sin), apply_rotary(key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)  # (B, nh, S, hs), S = past + T

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attn_pdrop if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = self.c_proj(attn_output.reshape(B, T, C))  # (B, T, nh, hs) -> (B, T, C)
        if self.training and self.resid_dropout.p > 0:
            attn_output = self.resid_dropout(attn_output)
        return attn_output, attn_weights


class GPTMLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        # Gated (modern): one matmul computes [gate; up], (B, T, C) -> (B, T, 2 x intermediate).
        self.gated = config.architecture == "modern"
        fc_out = config.intermediate_size * (2 if self.gated else 1)
        self.c_fc = nn.Linear(config.hidden_size, fc_out, bias=config.bias)
        self.act = ACT2FN[config.hidden_act]
        self.c_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.bias)
        self.c_proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.gated:  # act(gate) * up, as Llama / Qwen3's MLP: (B, T, 2 x intermediate) -> (B, T, C)
            gate, up = self.c_fc(hidden_states).chunk(2, dim=-1)
            hidden_states = self.c_proj(self.act(gate) * up)
        else:  # (B, T, C) -> (B, T, intermediate) -> (B, T, C)
            hidden_states = self.c_proj(self.act(self.c_fc(hidden_states)))
        if self.training and self.dropout.p > 0:
            hidden_states = self.dropout(hidden_states)
        return hidden_states


class GPTBlock(GradientCheckpointingLayer):
    """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = make_norm(config, config.hidden_size)
        self.attn = GPTAttention(config, layer_idx)
        self.ln_2 = make_norm(config, config.hidden_size)
        self.mlp = GPTMLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        attn_output, _ = self.attn(self.ln_1(hidden_states), attention_mask, cache, **kwargs)
        hidden_states = hidden_states + attn_output
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class GPTPreTrainedModel(PreTrainedModel):
    config: GPTConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GPTBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {
        "hidden_states": GPTBlock,
        "attentions": OutputRecorder(GPTAttention, index=1),
    }

    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 init; modern: zero output projections. `init.*` skip tensors already loaded from a checkpoint."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            # Decided on the Linear itself: for remote code, transformers skips `_init_weights` on modules
            # without direct parameters (GPTAttention, GPTMLP).
            if getattr(module, "is_residual_projection", False):
                if self.config.architecture == "modern":
                    # Each block starts as the identity (modded-nanogpt, nanochat); gradients still reach
                    # the projection, and through it everything else from the second step on.
                    init.zeros_(module.weight)
                    return
                # The two residual projections per block are scaled by 1/sqrt(2 * n_layer) (GPT-2 paper) so
                # the residual stream's variance does not grow with depth.
                std = std / math.sqrt(2 * self.config.num_hidden_layers)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, GPTRMSNorm):
            init.ones_(module.weight)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # transformers writes only the saved class (and its config) into `auto_map`; add the base model so
        # `AutoModel.from_pretrained(path, trust_remote_code=True)` works on a causal-LM checkpoint too.
        if self._auto_class is not None:
            self.config.auto_map = {
                "AutoModel": f"{GPTModel.__module__.split('.')[-1]}.GPTModel",
                **(getattr(self.config, "auto_map", None) or {}),
            }
        return super().save_pretrained(save_directory, *args, **kwargs)


class GPTModel(GPTPreTrainedModel):
    def __init__(self, config: GPTConfig):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.architecture == "gpt2":  # modern: rotary positions inside attention
            self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([GPTBlock(config, i) for i in range(config.num_hidden_layers)])
        self.ln_f = make_norm(config, config.hidden_size)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.wte = new_embeddings

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)  # (B, T, C)
        # Training never reads a cache, so only build one by default in eval mode (generate passes use_cache).
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        positions_given = position_ids is not None  # may mark packed documents: create_causal_mask reads them
        if position_ids is None:
            start = cache.get_seq_length() if cache is not None else 0  # tokens already in the cache
            end = start + inputs_embeds.shape[1]
            if end > self.config.max_position_embeddings and self.config.architecture == "gpt2":
                raise ValueError(
                    f"sequence of {end} tokens is longer than max_position_embeddings "
                    f"({self.config.max_position_embeddings}): the learned positions end there"
                )
            position_ids = torch.arange(start, end, device=inputs_embeds.device).unsqueeze(0)  # (1, T)

        if (
            attention_mask is None
            and cache is None
            and not positions_given
            and self.config._attn_implementation in _IS_CAUSAL_ATTENTION
        ):
            # Training / eval forward without padding, positions or cache: no mask, so sdpa and flash attention
            # run with is_causal=True. create_causal_mask would build a (B, 1, T, T) mask while tracing.
            causal_mask = None
        else:
            # None when there is no padding (sdpa then uses is_causal); else a bool (sdpa) or additive (eager) mask.
            causal_mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
            )

        if self.config.architecture == "gpt2":
            hidden_states = inputs_embeds + self.wpe(position_ids)
        else:
            hidden_states = inputs_embeds
            kwargs["position_embeddings"] = rotary_cos_sin(self.config, position_ids, inputs_embeds.dtype)
        if self.training and self.drop.p > 0:
            hidden_states = self.drop(hidden_states)
        for block in self.h:
            # hidden_states positional: gradient checkpointing only tracks positional tensors.
            hidden_states = block(hidden_states, attention_mask=causal_mask, cache=cache, **kwargs)
        hidden_states = self.ln_f(hidden_states)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None)


@dataclass
class GPTCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast, plus evaluation's per-target scores (`token_scores=True`): (B, T) fp32
    log-probabilities and (B, T) bool argmax hits."""

    token_logprobs: torch.FloatTensor | None = None
    token_correct: torch.BoolTensor | None = None


class GPTForCausalLM(GPTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: GPTConfig):
        super().__init__(config)
        self.transformer = GPTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        self.transformer.wte = new_embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        skip_logits: bool | None = None,
        token_scores: bool | None = None,
        **kwargs,
    ) -> "GPTCausalLMOutput":
        r"""
        labels: (B, T) targets aligned with `input_ids` (shifted inside, -100 = ignore), the HF convention.
        shift_labels: (B, T) targets already shifted (`shift_labels[:, t]` is the token after position t), as
            our data pipeline packs them; takes precedence over `labels`.
        num_items_in_batch: total target tokens over the gradient-accumulation window; the loss becomes
            sum / num_items_in_batch instead of the micro-batch mean, so accumulated gradients are exact.
        logits_to_keep: int k > 0 computes logits for the last k positions only (generate uses 1).
        skip_logits: return the loss only (`logits=None`), the name Trainer and liger-kernel use. The training
            loop's forward: with logits in the output, a compiled graph must write the whole (B, T, V) tensor
            (and accelerate's mixed precision an fp32 copy of it) and keep it alive until the next step. Needs
            `labels` or `shift_labels`. The loss is computed from the hidden states a chunk of tokens at a time
            (`causal_lm_loss`): no (B, T, V) logits exist, eager or compiled.
        token_scores: evaluation's entry (no gradient): with `labels` or `shift_labels`, return each target's
            log-probability over all head rows (`token_logprobs`, (B, T) fp32) and whether it is the argmax
            (`token_correct`, (B, T) bool), 0 and False at ignored targets, chunked as `skip_logits`; no logits.
        """
        if (skip_logits or token_scores) and labels is None and shift_labels is None:
            raise ValueError(
                "skip_logits=True and token_scores=True need labels or shift_labels: the loss is all they return"
            )
        outputs: BaseModelOutputWithPast = self.transformer(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)  # (B, T', H)

        if skip_logits or token_scores:
            if shift_labels is None:  # HF labels: the target at t is the label at t + 1
                shift_labels = nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
            weight = self.lm_head.weight
            scores = {}
            if token_scores:  # evaluation: no gradient, the loss from the same scores
                logprobs, correct = head_token_scores(hidden_states, weight, shift_labels)
                count = shift_labels.ne(-100).sum() if num_items_in_batch is None else num_items_in_batch
                loss, scores = -logprobs.sum() / count, {"token_logprobs": logprobs, "token_correct": correct}
            else:
                loss = causal_lm_loss(hidden_states, weight, shift_labels, num_items_in_batch)
            return GPTCausalLMOutput(loss=loss, cache=outputs.cache, hidden_states=outputs.hidden_states,
                                     attentions=outputs.attentions, **scores)  # fmt: skip

        logits = self.lm_head(hidden_states)  # (B, T', V)
        loss = None
        if labels is not None or shift_labels is not None:
            # ForCausalLMLoss: `.float()` is a no-op for fp32 logits, so no extra (B, T, V) copy is made.
            loss = self.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=self.config.vocab_size,
                shift_labels=None
                if shift_labels is None
                else shift_labels.contiguous(),  # the loss views it flat
                num_items_in_batch=num_items_in_batch,
                **kwargs,
            )
        return GPTCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = ["GPTPreTrainedModel", "GPTModel", "GPTForCausalLM"]
