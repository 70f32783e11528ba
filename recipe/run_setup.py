"""A run's set-up before its loop: the Accelerator (precision, compile, accumulation, process group, CPU
threads), trackers, progress messages, the data loaders, the model, and output_dir's checks. Every check
here comes before anything is written."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import (
    DistributedType,
    GradientAccumulationPlugin,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    TorchDynamoPlugin,
)
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from recipe import GPTForCausalLM
from recipe.checkpoint import (
    delete_folder,
    generation_config,
    holds_checkpoints,
    list_checkpoints,
    load_weights_from_model_folder,
    skip_weights_in_save_state,
)
from recipe.config import ConfigError, RunConfig, available_cores, gpt_config

if TYPE_CHECKING:  # recipe.data (and `datasets`) is imported in train.main(): `make gpu-check` runs without
    from recipe.data import PreparedData


def check_trackers(cfg: RunConfig) -> None:
    for tracker in {"wandb": ["wandb"], "trackio": ["trackio"], "all": []}.get(cfg.report_to, []):
        if importlib.util.find_spec(tracker) is None:  # accelerate would silently log nowhere
            raise ConfigError(
                f"report_to is {cfg.report_to} but {tracker} is not installed: "
                f"`pip install {tracker}`, or --report_to tensorboard / none"
            )


def has_accelerator() -> bool:
    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def make_accelerator(cfg: RunConfig) -> Accelerator:
    accelerator = Accelerator(
        # Without cpu=True, `accelerate launch --multi_gpu` on a machine with no GPU starts N unrelated
        # single processes: accelerate only picks MULTI_CPU (gloo) when told it is on the CPU.
        cpu=not has_accelerator(),
        mixed_precision=cfg.mixed_precision,
        # Windows span epochs; the loop steps the optimizer once per window of micro-batches.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        # One scheduler step per optimizer step, whatever the number of processes: the horizon is max_steps.
        step_scheduler_with_optimizer=False,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(
            project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "runs")
        ),
        # non_blocking: the prepared loader's host-to-GPU copies overlap compute (the batches are pinned).
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, non_blocking=True),
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if cfg.torch_compile else None,
        # Data preparation runs on one process per node while the others wait at a barrier.
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.ddp_timeout))],
    )
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ConfigError(
            "FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config "
            "(configs/accelerate/fsdp.yaml does)"
        )
    if cfg.optim == "muon" and accelerator.distributed_type in (
        DistributedType.FSDP,
        DistributedType.DEEPSPEED,
    ):
        raise ConfigError(
            f"optim muon is not supported under {accelerator.distributed_type} (its Newton-Schulz step needs "
            "whole matrices): use --optim adamw, or DDP"
        )
    accelerator.register_save_state_pre_hook(skip_weights_in_save_state)
    accelerator.register_load_state_pre_hook(load_weights_from_model_folder)
    if accelerator.device.type == "cpu":
        # `accelerate launch` pins each CPU process to one thread (OMP_NUM_THREADS=1): use the cores we have.
        torch.set_num_threads(cfg.num_threads or default_threads())
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def default_threads() -> int:
    return max(1, available_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def show_progress_messages(is_main: bool) -> None:
    """Our INFO lines (fetching the corpus once, training the tokenizer) explain the pauses before step 1;
    transformers' own progress bars (writing and loading weights) would cut through ours at every save."""
    logging.basicConfig(format="%(message)s")
    logging.getLogger("recipe").setLevel(logging.INFO if is_main else logging.WARNING)
    hf_logging.disable_progress_bar()


def dataloaders(data: PreparedData, cfg: RunConfig, device: torch.device) -> tuple[DataLoader, dict[str, DataLoader]]:  # fmt: skip
    """Training: full batches only (fixed shapes: no recompiles under torch.compile, equal work on every
    process); a stream gets a stateful loader whose position is saved per process. Evaluation: every block
    at the end ("final"); along the way ("along") the first max_eval_batches x per_device_eval_batch_size
    blocks, the same ones at any number of processes."""
    from recipe.data import train_dataloader

    pin, batch = device.type == "cuda", cfg.per_device_eval_batch_size
    evals = {"final": DataLoader(data.validation, batch_size=batch, pin_memory=pin)}
    blocks = len(data.validation) if cfg.max_eval_batches is None else cfg.max_eval_batches * batch
    if blocks < len(data.validation):
        subset = torch.utils.data.Subset(data.validation, range(blocks))
        evals["along"] = DataLoader(subset, batch_size=batch, pin_memory=pin)
    return train_dataloader(data, cfg, pin_memory=pin), evals


def build_model(cfg: RunConfig, tokenizer) -> GPTForCausalLM:
    if not cfg.model_name_or_path:
        model = GPTForCausalLM(gpt_config(cfg, tokenizer))
        # Sampling defaults, and the vocabulary padding never generated (as the saved folders have it).
        model.generation_config = generation_config(model.config, tokenizer)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.model_name_or_path,
            trust_remote_code=cfg.trust_remote_code,  # our own folders need none: `import recipe` registers them
            attn_implementation=cfg.attn_implementation,
        )
        if model.config.vocab_size < len(tokenizer):
            raise ConfigError(
                f"model_name_or_path: the model's vocabulary ({model.config.vocab_size}) is "
                f"smaller than the tokenizer's ({len(tokenizer)})"
            )
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model


def check_output_dir(cfg: RunConfig) -> None:
    if (
        holds_checkpoints(Path(cfg.output_dir))
        and not cfg.resume_from_checkpoint
        and not cfg.overwrite_output_dir
    ):
        raise ConfigError(
            f"output_dir {cfg.output_dir} already holds checkpoints: continue with "
            "--resume_from_checkpoint latest, or start over with --overwrite_output_dir true"
        )


def start_output_dir(cfg: RunConfig, accelerator: Accelerator) -> None:
    """Called once every check has passed: a refused run leaves output_dir as it was. Checkpoints are
    renamed and rotated by the main process, so every process must see the same output_dir."""
    output_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite_output_dir and not cfg.resume_from_checkpoint:
            for old in list_checkpoints(output_dir):
                delete_folder(old)  # renamed first: a crash midway leaves no checkpoint that looks whole
        cfg.save(output_dir / "run_config.yaml")
    accelerator.wait_for_everyone()
    if not (output_dir / "run_config.yaml").is_file():
        raise ConfigError(
            f"output_dir: {output_dir} is not shared with the main process (process {accelerator.process_index} "
            "cannot see its files); with several nodes, put output_dir on a filesystem every node mounts"
        )


# The Accelerators whose trackers started: `end_trackers` ends them when a run stops with an error.
TRACKING: list[Accelerator] = []


def init_trackers(accelerator: Accelerator, cfg: RunConfig) -> None:
    if cfg.report_to != "none":
        hparams = {
            k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.to_dict().items()
        }
        accelerator.init_trackers(cfg.run_name or Path(cfg.output_dir).name, config=hparams)
        TRACKING.append(accelerator)


def end_trackers() -> None:
    """After an error: finish each started tracker (TensorBoard closes its files, wandb marks the run ended
    instead of leaving it running), never raising over the error itself. A finished run's end_training and
    a stop's do this themselves."""
    while TRACKING:
        for tracker in TRACKING.pop().trackers:
            try:
                tracker.finish()
            except Exception as err:
                print(
                    f"report_to: {tracker.name} did not end cleanly ({type(err).__name__}: {err})",
                    file=sys.stderr,
                )
