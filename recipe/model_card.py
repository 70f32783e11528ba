"""The README.md model card written into every model folder a run saves, with its loss plot and a sample."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from recipe.downstream import report as downstream_report
from recipe.metrics import JsonlLog, results_table
from recipe.plots import plot_loss

if TYPE_CHECKING:
    from recipe.config import RunConfig
    from recipe.data import PreparedData

DESCRIPTION = {
    "gpt2": "GPT-2 architecture: pre-LayerNorm, learned positions, GELU MLP, tied embeddings",
    "modern": "modern architecture: rotary positions, RMSNorm, QK-norm, SwiGLU MLP, no biases, untied embeddings",
}


def stock_class(cfg: Any) -> str:
    """The stock transformers class `recipe.export` writes for this architecture."""
    if cfg.architecture == "gpt2":
        return "GPT2LMHeadModel"
    return "LlamaForCausalLM" if cfg.qk_norm is False else "Qwen3ForCausalLM"


def write_model_card(
    output_dir: Path, cfg: Any, data: Any, results: dict[str, Any], table: str, sample: str | None
) -> None:
    name = cfg.hub_model_id or output_dir.name
    train, val = data.summary["train"], data.summary["validation"]
    front = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["gpt-recipe", "causal-lm", "pretrained-from-scratch"],
        "license": "apache-2.0",
    }
    model_keys = [
        "architecture",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "block_size",
        "vocab_size",
        "dropout",
    ]
    train_keys = [
        "max_steps",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "optim",
        "learning_rate",
        "warmup_steps",
        "min_lr_ratio",
        "weight_decay",
        "max_grad_norm",
        "mixed_precision",
        "seed",
    ]
    settings = yaml.safe_dump({k: getattr(cfg, k) for k in model_keys + train_keys}, sort_keys=False).strip()
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {name}",
        "",
        f"A GPT ({results['num_parameters'] / 1e6:.2f}M parameters, {DESCRIPTION[cfg.architecture]}) "
        "pretrained from scratch with gpt-recipe on " + data.source + ".",
        "",
        "## Results",
        "",
        f"Held-out validation set ({val.documents} documents, {val.tokens:,} tokens, {val.bytes_per_token:.3f} "
        "bytes per token). Bits per byte do not depend on the tokenizer, so they compare across vocabularies.",
        "",
        table,
        "",
        *(
            [
                "Zero-shot downstream tasks, each scored as lm-evaluation-harness scores the task of that name "
                "(`python -m recipe.evaluate --model PATH` scores any folder the same way):",
                "",
                downstream_report.table(results),
                "",
            ]
            if downstream_report.scored_tasks(results)
            else []
        ),
        f"Trained for {results['global_step']} optimizer steps on {results['train_tokens']:,} tokens "
        + (
            f"(streamed: {train.documents:,} documents, {train.bytes:,} bytes, {train.tokens:,} tokens read this epoch) "
            if cfg.streaming
            else f"({train.tokens:,} tokens in the training split) "
        )
        + f"in {results['train_runtime']:.0f} s "
        f"({results['train_tokens_per_second']:,.0f} tokens/s).",
        "",
        "![loss](loss.png)",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'tok = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)',
        f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)',
        'ids = tok("Romeo.", return_tensors="pt").input_ids',
        "print(tok.decode(model.generate(ids, max_new_tokens=100, do_sample=True, top_k=200)[0]))",
        "```",
        "",
        f"`python -m recipe.export --model PATH --output DIR` turns it into a stock `{stock_class(cfg)}` "
        "that needs no remote code (vLLM, llama.cpp and other tools that know only stock architectures).",
        "",
        "## Training configuration",
        "",
        "```yaml",
        settings,
        "```",
        "",
    ]
    if sample:
        lines += ["## Sample (temperature 0.8, top-k 200)", "", "```text", sample.strip(), "```", ""]
    lines += [
        "## Limitations",
        "",
        "A small model trained briefly on a narrow corpus: it imitates the style of its training text "
        "and knows nothing reliable about the world. Do not use its output as fact.",
        "",
    ]
    (output_dir / "README.md").write_text("\n".join(lines))


@torch.no_grad()
def write_sample(model, tokenizer, cfg: RunConfig) -> str | None:
    """A sample with the sampling settings saved in the model's generation_config."""
    if cfg.sample_max_new_tokens <= 0 or model is None:
        return None
    model.eval()
    ids = tokenizer(cfg.sample_prompt, return_tensors="pt").input_ids.to(model.device)
    if ids.shape[1] == 0:
        ids = torch.tensor([[tokenizer.eos_token_id]], device=model.device)
    torch.manual_seed(cfg.seed)
    room = model.config.max_position_embeddings - ids.shape[1]  # learned positions end at the context length
    out = model.generate(ids, max_new_tokens=min(cfg.sample_max_new_tokens, room))
    model.train()
    return tokenizer.decode(out[0], skip_special_tokens=True)


def card_writer(cfg: RunConfig, data: PreparedData, log: JsonlLog, results: dict, sample: str | None = None):
    """write_card(folder, model_config) for save_checkpoint and the end: model card, loss plot and results."""

    def write_card(folder: Path, config) -> None:
        vocab = len(data.tokenizer)  # the random-guess baseline: the ids text can hold, not the padded head
        plot_loss(log.rows, folder / "loss.png", vocab)
        write_model_card(folder, cfg, data, results, results_table(results, vocab), sample)

    return write_card
