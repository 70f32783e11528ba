"""Pretrain a GPT with a hand-written Accelerate loop.

    python recipe/train.py --config configs/tiny.yaml [--key value ...]          # one process, all cores
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml recipe/train.py --config ...

`main()` is the table of contents: set-up, data, model and optimizer, resume, the loop (forward, backward,
clip, step inline; log, evaluate, save and stop as helpers), finish. Checkpoints and the Hub live in
`recipe/checkpoint.py` and `recipe/hub.py`, the optimizer and schedule in `recipe/optim.py`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import logging
import os
import shutil
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import (
    DistributedType,
    GradientAccumulationPlugin,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    TorchDynamoPlugin,
    set_seed,
)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from recipe import GPTForCausalLM, hellaswag
from recipe.checkpoint import (
    SAMPLING,
    check_model_matches,
    check_same_run,
    find_checkpoint,
    list_checkpoints,
    load_weights_from_model_folder,
    plain_model,
    read_rank_state,
    read_state,
    resume_accumulation,
    run_identity,
    save_checkpoint,
    save_model_folder,
    skip_weights_in_save_state,
)
from recipe.config import ConfigError, RunConfig, available_cores, gpt_config, load_config
from recipe.hub import HubPusher, download_last_checkpoint, make_api
from recipe.metrics import (
    JsonlLog,
    bits_per_byte,
    describe_peak,
    flops_per_token,
    perplexity,
    results_table,
    run_peak_flops,
)
from recipe.model_card import write_model_card
from recipe.optim import build_optimizers, make_schedule, schedule_curve
from recipe.plots import plot_loss, plot_lr

if TYPE_CHECKING:  # recipe.data (and `datasets`) is imported in main(): `make gpu-check` runs without them
    from recipe.data import PreparedData

# How often (in steps) all processes agree on a stop signal or a NaN loss: one small gather, so a stop
# lands within this many steps (or logging_steps, if fewer). A single process stops at the next step.
AGREE_EVERY = 10
EXPORT_TOLERANCE = 1e-5

# ----------------------------------------------------------------------------- set-up


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


def pin_dataset_revision(cfg: RunConfig, accelerator: Accelerator, checkpoint: Path | None = None) -> None:
    """A Hub dataset is read at one commit: a resumed run's checkpoint's, else the current one, which the main
    process asks the Hub for (unless dataset_revision names one), and every process uses that, so a push to
    the dataset mid-launch cannot give nodes different data; it is saved in run_config.yaml and every
    checkpoint. Offline: left unset."""
    if not cfg.dataset_name or cfg.dataset_revision:
        return
    if checkpoint is not None:  # read by every process, a bad copy stopping all of them
        saved = collectively(accelerator, lambda: read_state(checkpoint)).get("dataset_revision")
        if saved:
            cfg.dataset_revision = saved
            return
    from accelerate.utils import broadcast_object_list
    from huggingface_hub import constants

    revision = [None]
    if accelerator.is_main_process and not constants.HF_HUB_OFFLINE:
        try:
            revision = [make_api(cfg.hub_token).dataset_info(cfg.dataset_name).sha]
        except Exception as err:  # load_dataset says what is wrong with the name or the network
            accelerator.print(
                f"dataset_name: could not resolve {cfg.dataset_name}'s commit ({type(err).__name__})"
            )
    if accelerator.num_processes > 1:
        broadcast_object_list(revision)
    cfg.dataset_revision = revision[0]


def check_output_dir(cfg: RunConfig) -> None:
    if (
        list_checkpoints(Path(cfg.output_dir))
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
                shutil.rmtree(old)
        cfg.save(output_dir / "run_config.yaml")
    accelerator.wait_for_everyone()
    if not (output_dir / "run_config.yaml").is_file():
        raise ConfigError(
            f"output_dir: {output_dir} is not shared with the main process (process {accelerator.process_index} "
            "cannot see its files); with several nodes, put output_dir on a filesystem every node mounts"
        )


def init_trackers(accelerator: Accelerator, cfg: RunConfig) -> None:
    if cfg.report_to != "none":
        hparams = {
            k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.to_dict().items()
        }
        accelerator.init_trackers(cfg.run_name or Path(cfg.output_dir).name, config=hparams)


# ----------------------------------------------------------------------------- resume


def check_resume(accelerator: Accelerator, cfg: RunConfig, model, data: PreparedData, streaming: bool, checkpoint: Path | None) -> Path | None:  # fmt: skip
    """Check the checkpoint to resume fits this run (model, tokenizer, data, schedule, layout), before
    anything is written."""
    if checkpoint is None:
        return None
    # Every process checks; one that refuses stops them all (a process raising alone would leave the others
    # waiting in the next collective).
    return collectively(
        accelerator, lambda: check_checkpoint(accelerator, cfg, model, data, streaming, checkpoint)
    )


def collectively(accelerator: Accelerator, check):
    """check()'s result, or its ConfigError raised on every process if it raised on any."""
    from accelerate.utils import gather_object

    error, result = None, None
    try:
        result = check()
    except Exception as err:  # a partial copy's bad JSON too: every process stops, none waits
        error = str(err) if isinstance(err, ConfigError) else f"{type(err).__name__}: {err}"
    errors = gather_object([error]) if accelerator.num_processes > 1 else [error]
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise ConfigError(first)
    return result


def check_checkpoint(accelerator: Accelerator, cfg: RunConfig, model, data, streaming: bool, checkpoint: Path) -> Path:  # fmt: skip
    check_model_matches(checkpoint, model.config)
    saved = read_state(checkpoint)
    changes = check_same_run(checkpoint, saved, cfg, data)
    if changes:
        accelerator.print(f"Resuming with a new schedule (resume_new_schedule): {', '.join(changes)}")
    sharded = accelerator.distributed_type == DistributedType.FSDP  # its optimizer state is saved sharded
    if ("FSDP" in saved.get("distributed_type", str(accelerator.distributed_type))) != sharded:
        raise ConfigError(
            f"resume_from_checkpoint: the checkpoint was written by a {saved['distributed_type']} run, this "
            f"run is {accelerator.distributed_type}; resume with the checkpoint's launch configuration"
        )
    accum = resume_accumulation(saved, cfg, accelerator.num_processes, streaming)
    if accum != cfg.gradient_accumulation_steps:
        accelerator.print(
            f"Resuming with {accelerator.num_processes} processes: gradient_accumulation_steps "
            f"{cfg.gradient_accumulation_steps} -> {accum} keeps the checkpoint's tokens per step"
        )
        cfg.gradient_accumulation_steps = accelerator.gradient_accumulation_steps = accum
    return checkpoint


def resolve_checkpoint(accelerator: Accelerator, cfg: RunConfig) -> Path | None:
    """The main process picks the checkpoint (a local folder, or a Hub snapshot: its commit); every process
    then loads exactly that one, or every process stops with one line. Each process listing output_dir itself
    could pick another "latest" (an NFS attribute cache hides a rename), and each node downloading the Hub
    repo itself another snapshot. Every process enters the same collectives on every path, errors included."""
    from accelerate.utils import broadcast_object_list, gather_object

    used: list[str] = []

    def download(repo: str, missing_ok: bool = False, revision: str | None = None) -> Path | None:
        used.append(repo)
        return download_last_checkpoint(repo, cfg.hub_token, missing_ok, revision)

    choice: list[Any] = [None, None, None, None]  # path, Hub repo, Hub commit, the main process's error
    if accelerator.is_main_process:
        try:
            found = find_checkpoint(
                cfg.resume_from_checkpoint, Path(cfg.output_dir), download, cfg.hub_model_id
            )
        except Exception as err:  # an OSError from a bad mount too: every process stops with it
            if accelerator.num_processes == 1:
                raise
            found, choice[3] = (
                None,
                str(err) if isinstance(err, ConfigError) else f"{type(err).__name__}: {err}",
            )
        if found is not None:
            snapshot = found.parent  # the HF cache keeps a download in snapshots/<commit sha>/
            commit = snapshot.name if used and snapshot.parent.name == "snapshots" else None
            choice = [str(found), used[-1] if used else None, commit, None]
    if accelerator.num_processes == 1:
        return None if choice[0] is None else Path(choice[0])
    broadcast_object_list(choice)
    where, repo, commit, error = choice
    if error is not None:
        raise ConfigError(error)
    if where is None:
        return None
    path, problem = Path(where), None
    need = repo is not None and not visible(path)  # another node: the same commit
    with accelerator.local_main_process_first():  # a barrier over all processes: every one enters it
        if need:
            try:
                path = download(repo, revision=commit)
            except Exception as err:
                problem = f"{type(err).__name__}: {err}"
    reports = gather_object([(problem, visible(path))])
    failed = next((p for p, _ in reports if p is not None), None)
    if failed is not None:
        raise ConfigError(
            f"resume_from_checkpoint: a process could not download {repo} at {commit}: {failed}"
        )
    blind = [rank for rank, (_, seen) in enumerate(reports) if not seen]
    if blind:
        raise ConfigError(
            f"resume_from_checkpoint: process(es) {blind} cannot see {where}, the checkpoint the main process "
            "resumes; with several nodes, put output_dir on a filesystem every node mounts"
        )
    return path


def visible(checkpoint: Path) -> bool:
    """Whether this process can read the checkpoint's state file (a permission error is "no", not a raise)."""
    try:
        return (checkpoint / "trainer_state.json").is_file()
    except OSError:
        return False


def check_resumed_alike(accelerator: Accelerator, model, state: dict, data: PreparedData) -> None:
    """After loading, every process holds the same step, weights (an integer sum of their bits; under FSDP each holds
    its own shard), tokenizer and data, or the run stops in one line: ranks on different steps would hang,
    ranks with different weights would diverge silently."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import gather_object

    from recipe.tokenizer import tokenizer_fingerprint

    checksum = None
    if accelerator.distributed_type != DistributedType.FSDP:
        # The weights' bits summed as integers: exact and order-free on any device (NaN weights compare too).
        ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
        with torch.no_grad():
            bits = [
                p.detach().contiguous().view(ints[p.element_size()]).long().sum() for p in model.parameters()
            ]
            checksum = int(sum(bits))
    mine = (state["global_step"], checksum, tokenizer_fingerprint(data.tokenizer), data.fingerprint)
    every = gather_object([mine])
    differ = [rank for rank, theirs in enumerate(every) if theirs != every[0]]
    if differ:
        raise ConfigError(
            f"resume_from_checkpoint: process(es) {differ} resumed another state than process 0 (step, weights "
            f"checksum, tokenizer, data: {every[differ[0]][:2]} against {every[0][:2]}); every process must "
            "see the same checkpoint and data"
        )


def resume(accelerator: Accelerator, checkpoint: Path | None, train_dl, schedulers) -> dict[str, Any]:
    """Weights, optimizer, scheduler and RNG states; the data position from our own state. The schedule is
    this run's (check_resume refused another one unless resume_new_schedule): its peak learning rates replace
    the checkpoint's, and each group's rate is set for the checkpoint's step."""
    state = {"global_step": 0, "tokens_seen": 0, "train_runtime": 0.0, "epoch": 0}
    if checkpoint is None:
        return state
    saved = read_state(checkpoint)
    here = epoch_length(train_dl, accelerator.num_processes)
    if saved.get("batches_per_epoch", here) != here:  # another process count drops another epoch tail
        raise ConfigError(
            f"resume_from_checkpoint: with {accelerator.num_processes} processes an epoch has {here} batches, "
            f"with the checkpoint's {saved['num_processes']} it had {saved['batches_per_epoch']}: the data "
            f"position would not continue exactly; resume with {saved['num_processes']} process(es)"
        )
    peaks = [list(s.scheduler.base_lrs) for s in schedulers]
    accelerator.load_state(str(checkpoint / "training_state"))
    for scheduler, base_lrs in zip(schedulers, peaks):
        inner = scheduler.scheduler
        inner.base_lrs = base_lrs  # a LambdaLR (optim.make_schedule): lambda x peak at the checkpoint's step
        for group, fn, peak in zip(inner.optimizer.param_groups, inner.lr_lambdas, base_lrs):
            group["lr"] = peak * fn(inner.last_epoch)
        inner._last_lr = [group["lr"] for group in inner.optimizer.param_groups]
    accelerator.step = 0  # every window starts at a step boundary, whatever the old accumulation was
    state.update(saved)
    rank_state = read_rank_state(checkpoint, accelerator.process_index)
    if rank_state is not None and is_stream(train_dl):  # a stream resumes where it was, without replay
        train_dl.load_state_dict(rank_state["dataloader"])
    state["stream_resumed"] = rank_state is not None and is_stream(train_dl)
    accelerator.print(f"Resumed from {checkpoint} at step {state['global_step']}")
    return state


def is_stream(dataloader) -> bool:
    return isinstance(dataloader.dataset, torch.utils.data.IterableDataset)


def epoch_length(train_dl, world: int) -> int | None:
    """Micro-batches per epoch, all processes together (each process drops the tail it cannot share)."""
    return None if is_stream(train_dl) else len(train_dl) * world


def layout(cfg: RunConfig, accelerator: Accelerator, train_dl, data: PreparedData) -> dict[str, Any]:
    """What decides the data position and the tokens per step, and what a resume must continue (tokenizer,
    data, schedule): saved with every checkpoint."""
    return {"num_processes": accelerator.num_processes, "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "per_device_train_batch_size": cfg.per_device_train_batch_size, "block_size": cfg.block_size,
            "batches_per_epoch": epoch_length(train_dl, accelerator.num_processes),
            "distributed_type": str(accelerator.distributed_type), **run_identity(cfg, data)}  # fmt: skip


def micro_batches(dataloader, state: dict[str, Any], accum: int, accelerator: Accelerator):
    """An endless stream of (epoch, batch) across epochs, starting where `state` left off."""
    if is_stream(dataloader):
        # The loader's own state holds the position and the epoch; without one (a checkpoint of another
        # layout) the stream is read again from the start of the run, to the step.
        epoch, skip = (
            (dataloader.epoch, 0) if state.get("stream_resumed") else (0, state["global_step"] * accum)
        )
    else:
        epoch, skip = divmod(state["global_step"] * accum, len(dataloader))
    while True:
        if hasattr(dataloader, "set_epoch"):
            dataloader.set_epoch(epoch)
        if not skip:
            loader = dataloader
        elif is_stream(dataloader):  # read past by the loader itself, so the position it saves next is true
            loader = itertools.islice(dataloader, skip, None)
        else:
            loader = accelerator.skip_first_batches(dataloader, skip)
        for batch in loader:
            yield epoch, {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
        epoch, skip = epoch + 1, 0


# ----------------------------------------------------------------------------- the loop's helpers


class StopSignal:
    """SIGTERM / Ctrl-C: finish the current step, save, exit. A second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.at: float | None = None  # time.monotonic() of the first signal: a stop's waits count from it
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum
        self.at = self.at or time.monotonic()
        signal.signal(signal.SIGINT, signal.default_int_handler)


def training_loss(model, batch: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor) -> torch.Tensor:
    """The training forward: the loss summed over the batch's targets / the window's. Our model returns it
    alone (`skip_logits`: no (B, T, V) logits leave the compiled graph, nor accelerate's fp32 copy of them);
    another model (model_name_or_path) returns its logits too."""
    ours = isinstance(plain_model(model), GPTForCausalLM)
    return model(input_ids=batch["input_ids"], shift_labels=batch["shift_labels"],
                 num_items_in_batch=num_items_in_batch, **({"skip_logits": True} if ours else {})).loss  # fmt: skip


def agree(stop: StopSignal, first_bad_step: torch.Tensor, accelerator: Accelerator) -> tuple[bool, int]:
    """(stop, first NaN step or 0), the same on every process: one gather that every process enters at
    the same steps, whether or not a signal reached it (ranks that disagree hang in the next collective)."""
    flags = torch.stack([first_bad_step.double(), torch.tensor(float(stop.received is not None), dtype=torch.float64,
                                                                device=first_bad_step.device)])  # fmt: skip
    if accelerator.num_processes > 1:
        flags = accelerator.gather(flags.view(1, 2))  # (processes, 2)
    flags = flags.view(-1, 2).cpu()
    bad = [int(b) for b in flags[:, 0].tolist() if b > 0]
    return bool(flags[:, 1].max() > 0), min(bad, default=0)


@torch.no_grad()
def evaluate(model, dataloader, accelerator: Accelerator, bytes_per_token: float, vocab: int) -> dict[str, float]:  # fmt: skip
    """Token-weighted loss and next-token accuracy over all processes (gather_for_metrics drops the padding
    duplicates), and how many blocks were scored, over the tokenizer's `vocab` ids (not the padded rows of
    the head). No KV cache: nothing is generated."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # nll, correct, count, blocks
    for batch in dataloader:
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits[..., :vocab]  # (B, T, V)
        labels = batch["shift_labels"]  # (B, T)
        nll = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), reduction="none"
        )
        mask = labels.ne(-100)
        correct = logits.argmax(-1).eq(labels) & mask
        rows = [(nll.view_as(labels) * mask).sum(1), correct.sum(1), mask.sum(1), torch.ones_like(mask[:, 0])]
        totals += accelerator.gather_for_metrics(torch.stack(rows, 1).double()).sum(
            0
        )  # (B * processes, 4) -> (4,)
    model.train()
    nll, correct, count, blocks = totals.tolist()
    loss = nll / max(count, 1)
    return {
        "eval_loss": loss,
        "perplexity": perplexity(loss),
        "eval_bits_per_byte": bits_per_byte(loss, bytes_per_token),
        "eval_accuracy": correct / max(count, 1),
        "eval_blocks": int(blocks),
    }


def hellaswag_items(
    cfg: RunConfig, accelerator: Accelerator, tokenizer, config
) -> list[hellaswag.Item] | None:
    """HellaSwag's items, tokenised once, or None when it is off. Fetched once per node, before step 1, so a
    missing source stops the run before anything is written."""
    if not cfg.hellaswag:
        return None
    with accelerator.local_main_process_first():
        dataset = hellaswag.load_hellaswag(cfg.cache_dir, cfg.hellaswag_path)
    return hellaswag.encode_items(dataset, tokenizer, hellaswag.context_length(config, tokenizer))


def score_hellaswag(model, items: list[hellaswag.Item], cfg: RunConfig, final: bool, vocab: int) -> dict[str, float]:  # fmt: skip
    """The fixed subset along the way, every item at the end (a compiled model runs eagerly: hellaswag.score)."""
    subset = items if final else hellaswag.evenly_spaced(items, cfg.hellaswag_items)
    return hellaswag.metrics(hellaswag.score(model, subset, cfg.hellaswag_batch_size, vocab_size=vocab))


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


def run_results(state, meter: Meter, last_eval: dict, data: PreparedData, n_params: int) -> dict[str, Any]:
    """What all_results.json, the model card and the table hold. train_loss is the mean over every logged step
    of the run, resumed parts included (Trainer's meaning); the last log window's mean is beside it."""
    return {
        "train_loss": state["train_loss_sum"] / state["train_loss_steps"]
        if state.get("train_loss_steps")
        else None,
        "train_loss_last_window": meter.train_loss if meter.window else None,  # None: nothing logged yet
        "train_loss_last_window_steps": meter.window,
        **last_eval,
        "eval_bytes_per_token": data.summary["validation"].bytes_per_token,
        "train_tokens": state["tokens_seen"],
        "train_runtime": state["train_runtime"],
        "train_tokens_per_second": state["tokens_seen"] / max(state["train_runtime"], 1e-9),
        "global_step": state["global_step"],
        "num_parameters": n_params,
    }


def card_writer(cfg: RunConfig, data: PreparedData, log: JsonlLog, results: dict, sample: str | None = None):
    """write_card(folder, model_config) for save_checkpoint and the end: model card, loss plot and results."""

    def write_card(folder: Path, config) -> None:
        vocab = len(data.tokenizer)  # the random-guess baseline: the ids text can hold, not the padded head
        plot_loss(log.rows, folder / "loss.png", vocab)
        write_model_card(folder, cfg, data, results, results_table(results, vocab), sample)

    return write_card


def verify_export(folder: Path, model) -> float:
    """The saved folder reloads with plain transformers, every key in place, every tensor equal to the trained
    model's and the same logits: a wrapper prefix or a lost tie would otherwise pass silently (random
    weights). Returns the largest logit difference."""
    reloaded, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise RuntimeError(f"the saved model in {folder} does not reload cleanly: {bad}")
    reloaded.to(device=model.device, dtype=model.dtype).eval()
    live = model.state_dict()
    differ = [k for k, v in reloaded.state_dict().items() if not torch.equal(v, live[k])]
    if differ:
        raise RuntimeError(f"the saved model in {folder} differs from the trained one in {differ[:5]}")
    # Under mixed precision accelerate wraps the live forward in autocast; compare the plain forwards.
    forward = model.__dict__.get("_original_forward", model.forward)
    was_training = model.training
    model.eval()
    shape = (2, min(32, model.config.max_position_embeddings))
    ids = torch.randint(0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(0))
    ids = ids.to(model.device)
    with torch.no_grad():
        diff = (forward(input_ids=ids).logits.float() - reloaded(input_ids=ids).logits.float()).abs().max()
    model.train(was_training)
    if not diff <= EXPORT_TOLERANCE:
        raise RuntimeError(
            f"the saved model in {folder} differs from the trained one: logits {diff:.3g} apart"
        )
    return float(diff)


def stop_run(accelerator: Accelerator, hub: HubPusher | None, code: int, message: str, timeout: float | None = None) -> None:  # fmt: skip
    """Say why, wait for the pending upload (if pushing; at most `timeout` s, default hub_upload_timeout), exit.
    The main process carries the exit code; the others leave with 0 first, since a launcher kills every
    process once one fails, the upload with it."""
    accelerator.print(message)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        accelerator.end_training()
        sys.exit(0)
    if hub is not None:
        if timeout is None:
            hub.wait("the last checkpoint")
        else:
            hub.wait("the last checkpoint", time.monotonic() + max(timeout, 0.0), "hub_stop_timeout")
    accelerator.end_training()
    sys.exit(code)


def resume_hint(argv: list[str] | None, num_processes: int) -> str:
    args = list(sys.argv if argv is None else ["recipe/train.py", *argv])
    for i, arg in enumerate(args):  # the token is never printed, in either argument form
        if arg in ("--hub_token", "--hub-token") and i + 1 < len(args):
            args[i + 1] = "<your token>"
        elif arg.startswith(("--hub_token=", "--hub-token=")):
            args[i] = arg.split("=", 1)[0] + "=<your token>"
    command = " ".join(a for a in args if a)
    launcher = "accelerate launch <the same launch options> " if num_processes > 1 else "python "
    if "--resume_from_checkpoint auto" in command or "--resume_from_checkpoint=auto" in command:
        return f"{launcher}{command}"  # the same command resumes
    return f"{launcher}{command} --resume_from_checkpoint latest"


# ----------------------------------------------------------------------------- main


def prepare(
    accelerator: Accelerator,
    cfg: RunConfig,
    model,
    optimizers,
    schedulers,
    train_dl,
    eval_dls: dict,
    streaming,
):
    """accelerate.prepare everything at once (FSDP needs model and optimizers together); each optimizer and
    scheduler on its own (a wrapper around several stops stepping once prepared)."""
    n, names = len(optimizers), list(eval_dls)
    prepared = accelerator.prepare(
        model, *eval_dls.values(), *optimizers, *schedulers, *([] if streaming else [train_dl])
    )
    model, e = prepared[0], 1 + len(names)
    eval_dls = dict(zip(names, prepared[1:e]))
    optimizers, schedulers = prepared[e : e + n], prepared[e + n : e + 2 * n]
    if not streaming:  # a stream is already split across processes by prepare_data; not sharded again
        train_dl = prepared[-1]
        if len(train_dl) == 0:
            raise ConfigError(
                f"per_device_train_batch_size ({cfg.per_device_train_batch_size}) x processes "
                f"({accelerator.num_processes}) is more than the {len(train_dl.dataset)} training blocks"
            )
    return model, optimizers, schedulers, train_dl, eval_dls


class Meter:
    """Loss, tokens and time between log steps. The loss and the flag for a non-finite loss or gradient norm
    stay on the device until read, so a step never waits for the host."""

    def __init__(self, accelerator: Accelerator, flops_per_token: float, peak_flops: float | None):
        self.accelerator, self.flops_per_token, self.peak = accelerator, flops_per_token, peak_flops
        self.loss_sum = torch.zeros((), device=accelerator.device)
        self.first_bad_step = torch.full((), -1, device=accelerator.device)
        self.steps, self.tokens, self.start = 0, 0, time.perf_counter()
        self.train_loss, self.window = float("nan"), 0

    def step_done(self, step: int, tokens: int, grad_norm: torch.Tensor | None) -> None:
        """`grad_norm` None: not checked (fp16's scaler skipped the step, or DeepSpeed keeps the norm)."""
        self.steps, self.tokens = self.steps + 1, self.tokens + tokens
        bad = ~torch.isfinite(self.loss_sum)
        if isinstance(grad_norm, torch.Tensor):
            bad = bad | ~torch.isfinite(grad_norm.to(bad.device))
        self.first_bad_step = torch.where((self.first_bad_step < 0) & bad, step, self.first_bad_step)

    def row(self, step: int, state: dict, lr: float, grad_norm) -> dict[str, float]:
        """The log row since the last one (a collective: every process calls it); then start afresh."""
        world = self.accelerator.num_processes
        # Each micro-batch loss is its share of the window's mean: their sum over processes is the step's loss.
        self.train_loss = (
            self.accelerator.reduce(self.loss_sum, "sum") if world > 1 else self.loss_sum
        ).item() / self.steps
        tok_s = self.tokens / (time.perf_counter() - self.start)
        # The whole run's mean (Trainer's train_loss) is kept in the state, which checkpoints save.
        state["train_loss_sum"] = state.get("train_loss_sum", 0.0) + self.train_loss * self.steps
        state["train_loss_steps"] = state.get("train_loss_steps", 0) + self.steps
        self.window = self.steps
        row = {"step": step, "epoch": state["epoch"], "loss": self.train_loss, "lr": lr, "grad_norm": float(grad_norm),
               "tokens_per_second": tok_s, "tokens_seen": state["tokens_seen"]}  # fmt: skip
        if self.peak:
            row["mfu"] = tok_s * self.flops_per_token / self.peak
        self.loss_sum.zero_()
        self.steps, self.tokens, self.start = 0, 0, time.perf_counter()
        return row

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (evaluating, saving) does not count as training throughput."""
        start = time.perf_counter()
        yield
        self.start += time.perf_counter() - start


def log_row(accelerator: Accelerator, log: JsonlLog, row: dict, progress: tqdm, prefix: str) -> None:
    log.write(row)
    accelerator.log({f"{prefix}/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])
    if prefix == "train":
        progress.set_postfix(
            loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_second']:,.0f}"
        )
    elif not accelerator.is_main_process:  # tqdm.write prints even where the bar is disabled
        return
    elif "eval_hellaswag_acc" in row:
        progress.write(hellaswag.line(row["step"], row))
    else:
        progress.write(
            f"step {row['step']}: eval loss {row['eval_loss']:.4f}, ppl {row['perplexity']:.2f}, "
            f"bpb {row['eval_bits_per_byte']:.4f}, accuracy {row['eval_accuracy']:.3f} "
            f"({row['eval_blocks']:,} blocks{', the whole split' if row.get('eval_whole') else ''})"
        )


def stream_summary(stream_loader, accelerator: Accelerator):
    """What all processes have read of a stream so far this epoch (a collective), for the model card."""
    from recipe.tokens import SplitSummary

    mine = stream_loader.consumed()
    counts = torch.tensor([mine.documents, mine.bytes, mine.tokens, mine.blocks], device=accelerator.device)
    total = accelerator.reduce(counts, "sum") if accelerator.num_processes > 1 else counts
    return SplitSummary(*[int(x) for x in total.tolist()], 0)


def describe_run(cfg: RunConfig, n_params: int, vocab: int, head: int, world: int) -> str:
    accum, batch = cfg.gradient_accumulation_steps, cfg.per_device_train_batch_size
    padded = f" (embedding and head padded to {head})" if head > vocab else ""
    return (
        f"Model: {n_params / 1e6:.2f}M parameters, vocab {vocab}{padded}, context {cfg.block_size}\n"
        f"Training {cfg.max_steps} steps x {batch} blocks x {accum} accumulation x {world} processes = "
        f"{batch * accum * world * cfg.block_size:,} tokens per step"
    )


def save(
    accelerator,
    model,
    cfg: RunConfig,
    state,
    data: PreparedData,
    log,
    results,
    hub,
    stream_loader,
    stopping=False,
) -> Path:
    """A checkpoint (every process), then its push to the Hub in the background (main process)."""
    # A stream's position is its loader's own state, one per process (map-style data: the step count says it).
    rank_state = None
    if stream_loader is not None:
        rank_state = {"dataloader": stream_loader.state_dict()}
        data.summary["train"] = stream_summary(stream_loader, accelerator)
    path = save_checkpoint(
        accelerator, model, Path(cfg.output_dir), state, data.tokenizer, cfg.save_total_limit, rank_state,
        card_writer(cfg, data, log, results), uploading=hub.uploading() if hub else None,
    )  # fmt: skip
    if hub is not None:
        hub.push_checkpoint(path, queue=stopping)
    return path


def finish(accelerator, model, cfg: RunConfig, data: PreparedData, log: JsonlLog, results: dict, hub) -> None:
    """output_dir becomes an HF model folder. Every process takes part (FSDP gathers the weights); the main
    process checks the saved folder, samples from it, writes the card and plots, and pushes."""
    output_dir = Path(cfg.output_dir)
    saved = save_model_folder(model, output_dir, data.tokenizer, accelerator.is_main_process)
    if accelerator.is_main_process:
        verify_export(output_dir, saved)
        sample = write_sample(saved, data.tokenizer, cfg)
        card_writer(cfg, data, log, results, sample)(output_dir, saved.config)
        (output_dir / "all_results.json").write_text(json.dumps(results, indent=2))
        plot_lr(*schedule_curve(cfg), output_dir / "lr.png")
        print(f"\n{results_table(results, len(data.tokenizer))}\n")
        if "eval_hellaswag_acc" in results:
            print(f"{hellaswag.table(results)}\n")
        print(
            f"Model saved to {output_dir}/ (tokens seen {results['train_tokens']:,}, "
            f"{results['train_tokens_per_second']:,.0f} tokens/s)\n"
            f'Sample it:   python -m recipe.generate --model {output_dir} --prompt "Romeo."\n'
            f'Load it:     AutoModelForCausalLM.from_pretrained("{output_dir}", trust_remote_code=True)'
        )
        if sample:
            print(
                f"\nA sample at temperature {SAMPLING['temperature']}, top-k {SAMPLING['top_k']}:\n{sample}"
            )
    accelerator.wait_for_everyone()  # the others may now exit, while the main process pushes
    if hub is not None:
        hub.push_final(output_dir)
    accelerator.end_training()


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, float]:
    # --- set-up: every check comes before anything is written
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    output_dir = Path(cfg.output_dir)
    check_output_dir(cfg)
    check_trackers(cfg)
    accelerator = make_accelerator(cfg)
    main_proc, world = accelerator.is_main_process, accelerator.num_processes
    stop = StopSignal()  # from here on a signal is a clean stop at the next agreed step
    show_progress_messages(main_proc)
    hub = HubPusher.from_config(cfg, log=accelerator.print) if cfg.push_to_hub and main_proc else None
    set_seed(cfg.seed)

    # --- data: prepared once per node (local main process first), the others read its caches
    from recipe.data import prepare_data

    checkpoint = resolve_checkpoint(accelerator, cfg)  # before the data: a Hub dataset's commit comes from it
    pin_dataset_revision(cfg, accelerator, checkpoint)

    data = prepare_data(cfg, accelerator.local_main_process_first, accelerator.process_index, world)
    train_dl, eval_dls = dataloaders(data, cfg, accelerator.device)
    streaming = is_stream(train_dl)

    # --- model, optimizers, schedules, resume
    model = build_model(cfg, data.tokenizer)
    checkpoint = check_resume(accelerator, cfg, model, data, streaming, checkpoint)
    n_params = sum(p.numel() for p in model.parameters())
    optimizers = build_optimizers(model, cfg, accelerator.device.type, world)
    schedulers = [make_schedule(opt, cfg) for opt in optimizers]
    hellaswag_data = hellaswag_items(cfg, accelerator, data.tokenizer, model.config)
    start_output_dir(cfg, accelerator)
    model, optimizers, schedulers, train_dl, eval_dls = prepare(
        accelerator, cfg, model, optimizers, schedulers, train_dl, eval_dls, streaming
    )
    init_trackers(accelerator, cfg)
    state = resume(accelerator, checkpoint, train_dl, schedulers)
    if checkpoint is not None:
        check_resumed_alike(accelerator, model, state, data)
    accum = cfg.gradient_accumulation_steps
    state.update(layout(cfg, accelerator, train_dl, data))
    batches = micro_batches(train_dl, state, accum, accelerator)
    log = JsonlLog(output_dir / "metrics.jsonl", enabled=main_proc, keep_until_step=state["global_step"])
    meter = Meter(accelerator, flops_per_token(plain_model(model).config, cfg.block_size),
                  run_peak_flops(accelerator.device, cfg.mixed_precision, world))  # fmt: skip
    accelerator.print(describe_run(cfg, n_params, len(data.tokenizer), plain_model(model).config.vocab_size, world))  # fmt: skip
    if accelerator.device.type == "cuda":
        accelerator.print(describe_peak(accelerator.device, cfg.mixed_precision))

    # --- the loop
    model.train()
    progress = tqdm(total=cfg.max_steps, initial=state["global_step"], disable=not main_proc, desc="train", dynamic_ncols=True)  # fmt: skip
    t_start, runtime_before, last_eval, last_hellaswag = time.perf_counter(), state["train_runtime"], {}, {}
    while state["global_step"] < cfg.max_steps:
        epochs, window = zip(*(next(batches) for _ in range(accum)))
        # Normalise by the target tokens of the whole window on every process, so that 2 processes x 1
        # micro-batch and 1 process x 2 micro-batches take the same step.
        n_items = sum(b["shift_labels"].ne(-100).sum() for b in window)
        n_items = accelerator.reduce(n_items, "sum") if world > 1 else n_items
        for batch in window:
            with accelerator.accumulate(model):  # DDP syncs gradients on the window's last micro-batch only
                loss = training_loss(model, batch, n_items)
                # backward divides by accum and DDP averages over processes; undo both: the sum is exact.
                accelerator.backward(loss * accum * world)
            meter.loss_sum += loss.detach()
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        skipped = False
        for optimizer, scheduler in zip(optimizers, schedulers):
            optimizer.step()
            skipped = skipped or optimizer.step_was_skipped
            if not optimizer.step_was_skipped:  # fp16: the scaler skips steps with inf gradients
                scheduler.step()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)

        step = state["global_step"] = state["global_step"] + 1
        window_tokens = sum(b["input_ids"].numel() for b in window) * world  # shapes only: no sync
        state["tokens_seen"] += window_tokens
        state["epoch"] = epochs[-1]
        meter.step_done(step, window_tokens, None if skipped else grad_norm)
        progress.update(1)
        is_log = step % cfg.logging_steps == 0 or step == cfg.max_steps
        is_eval = step % cfg.eval_steps == 0 or step == cfg.max_steps
        is_save = step % cfg.save_steps == 0
        stopping, bad = False, 0
        if is_log or is_eval or is_save or step % AGREE_EVERY == 0 or (world == 1 and stop.received):
            stopping, bad = agree(stop, meter.first_bad_step, accelerator)
        if bad:
            stop_run(accelerator, hub, 1, f"\nThe loss or the gradient norm became NaN or infinite at step {bad}; "
                     f"stopping, nothing saved since. The last good checkpoint stays in {output_dir}. Try a lower "
                     "learning_rate or max_grad_norm.")  # fmt: skip
        if is_log:
            row = meter.row(step, state, schedulers[0].get_last_lr()[0], grad_norm)
            log_row(accelerator, log, row, progress, "train")
        if is_eval and not (
            stopping and step < cfg.max_steps
        ):  # a stop saves first: the grace period is short
            with meter.paused():  # evaluation time is not training throughput
                # The final evaluation scores the whole validation split; the ones along the way a fixed subset.
                whole = step == cfg.max_steps or "along" not in eval_dls
                eval_dl = eval_dls["final" if whole else "along"]
                last_eval = evaluate(model, eval_dl, accelerator, data.summary["validation"].bytes_per_token,
                                     len(data.tokenizer))  # fmt: skip
                log_row(accelerator, log, {"step": step, **last_eval, "eval_whole": whole}, progress, "eval")
        if (
            hellaswag_data
            and not (stopping and step < cfg.max_steps)
            and (step == cfg.max_steps or (cfg.hellaswag_steps and step % cfg.hellaswag_steps == 0))
        ):
            with meter.paused():
                last_hellaswag = score_hellaswag(
                    model, hellaswag_data, cfg, step == cfg.max_steps, len(data.tokenizer)
                )
                log_row(accelerator, log, {"step": step, **last_hellaswag}, progress, "eval")
        state["train_runtime"] = runtime_before + time.perf_counter() - t_start
        stopping = stopping and step < cfg.max_steps  # a stop on the last step just finishes
        if is_save or stopping:
            with meter.paused():
                results = run_results(state, meter, {**last_eval, **last_hellaswag}, data, n_params)
                stream_loader = train_dl if streaming else None
                path = save(accelerator, model, cfg, state, data, log, results, hub, stream_loader, stopping)
        if stopping:
            progress.close()
            stop_run(accelerator, hub, 128 + (stop.received or signal.SIGTERM),
                     f"\nStopped by signal at step {step}; saved {path}.\nResume with: {resume_hint(argv, world)}",
                     cfg.hub_stop_timeout - (time.monotonic() - (stop.at or time.monotonic())))  # fmt: skip
    progress.close()

    # --- finish
    if streaming:
        data.summary["train"] = stream_summary(train_dl, accelerator)
    results = run_results(state, meter, {**last_eval, **last_hellaswag}, data, n_params)
    finish(accelerator, model, cfg, data, log, results, hub)
    return results


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
