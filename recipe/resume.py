"""Resuming a run: which checkpoint (the main process picks it, every process loads that one), whether it fits
this run (model, tokenizer, data, schedule, launch), loading it, and checking that every process resumed
alike. `layout` is what a checkpoint records of the data position and the tokens per step."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from recipe.checkpoint import (
    TRAINING_STATE,
    check_model_matches,
    check_same_run,
    find_checkpoint,
    read_rank_state,
    read_state,
    resume_accumulation,
    run_identity,
    tidy_output_dir,
)
from recipe.config import ConfigError, RunConfig
from recipe.hub import download_last_checkpoint, make_api

COMMIT = re.compile(r"[0-9a-f]{40}")  # a dataset_revision that is a commit already, not a branch or tag

if TYPE_CHECKING:  # recipe.data (and `datasets`) is imported in train.main(): `make gpu-check` runs without
    from recipe.data import PreparedData


def pin_dataset_revision(cfg: RunConfig, accelerator: Accelerator, checkpoint: Path | None = None) -> None:
    """A Hub dataset is read at one commit: a resumed run's checkpoint's, else the one dataset_revision (a
    branch or tag such as `main`; unset: the default branch) points at now, which the main process asks the
    Hub for, and every process uses that, so a push to the dataset mid-launch cannot give nodes different
    data. The commit is what run_config.yaml and every checkpoint record, so a resume after the branch moved
    is refused in one line (check_same_run). Offline: left as given."""
    if not cfg.dataset_name or (cfg.dataset_revision and COMMIT.fullmatch(cfg.dataset_revision)):
        return
    if checkpoint is not None:  # read by every process, a bad copy stopping all
        saved = collectively(accelerator, lambda: read_state(checkpoint)).get("dataset_revision")
        if saved and not cfg.dataset_revision:
            cfg.dataset_revision = saved
            return
        if saved and saved == cfg.dataset_revision:  # an older checkpoint recorded the branch, not its commit
            accelerator.print(f"dataset_revision: {saved} as the checkpoint recorded it (a branch, not a commit: "
                              "the data it was read at cannot be checked)")  # fmt: skip
            return
    from accelerate.utils import broadcast_object_list
    from huggingface_hub import constants

    revision = [cfg.dataset_revision]
    if accelerator.is_main_process and not constants.HF_HUB_OFFLINE:
        try:
            revision = [
                make_api(cfg.hub_token).dataset_info(cfg.dataset_name, revision=cfg.dataset_revision).sha
            ]
        except Exception as err:  # load_dataset says what is wrong with the name or the network
            accelerator.print(
                f"dataset_name: could not resolve {cfg.dataset_name}'s commit ({type(err).__name__})"
            )
    if accelerator.num_processes > 1:
        broadcast_object_list(revision)
    if cfg.dataset_revision and revision[0] != cfg.dataset_revision:
        accelerator.print(
            f"dataset_revision: {cfg.dataset_revision} is commit {revision[0]} (recorded as that)"
        )
    cfg.dataset_revision = revision[0]


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
    check_optimizer_state(accelerator, cfg, model, checkpoint)
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


def check_optimizer_state(accelerator: Accelerator, cfg: RunConfig, model, checkpoint: Path) -> None:
    """The checkpoint's saved optimizers hold the parameter groups this run builds (how many optimizers,
    groups and parameters in each), or one line now: torch's load_state_dict would raise a ValueError after
    output_dir was written. What it catches: a checkpoint of an earlier recipe (a Muon of one group, before
    Muon's groups per row-block count, saved no optimizer settings to compare) or of another optimizer."""
    import dataclasses

    from recipe.optim import optimizer_groups

    if accelerator.distributed_type == DistributedType.FSDP:  # saved sharded, in folders; AdamW only
        return

    def sizes(run: RunConfig) -> list[list[int]]:
        return [[len(g["params"]) for g in groups] for groups in optimizer_groups(model, run)]

    folder, ours = checkpoint / TRAINING_STATE, sizes(cfg)
    files = [folder / ("optimizer.bin" if i == 0 else f"optimizer_{i}.bin") for i in range(len(ours) + 1)]
    # mmap: only the group lists are read, not the moments (twice the model's size)
    saved = [
        [len(g["params"]) for g in torch.load(f, map_location="cpu", weights_only=True, mmap=True)["param_groups"]]
        for f in files
        if f.is_file()
    ]  # fmt: skip
    if saved == ours:
        return
    hint, other = "", not cfg.muon_split_fused
    if cfg.optim == "muon" and saved == sizes(dataclasses.replace(cfg, muon_split_fused=other)):
        hint = f"; --muon_split_fused {str(other).lower()} builds the checkpoint's groups"
    raise ConfigError(
        f"resume_from_checkpoint: {checkpoint}'s optimizer state holds parameter groups of {saved} parameters, "
        f"this run builds {ours} (optim {cfg.optim}): it was written by an earlier version of the recipe or with "
        f"other optimizer settings{hint}; resume with those, or start a new output_dir"
    )


def resolve_checkpoint(accelerator: Accelerator, cfg: RunConfig) -> Path | None:
    """The main process finishes what a crash left in output_dir (`tidy_output_dir`, one line) and picks the
    checkpoint (a local folder, or a Hub snapshot: its commit); every process then loads exactly that one, or
    every process stops with one line. Each process listing output_dir itself
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
            tidied = tidy_output_dir(Path(cfg.output_dir))  # a complete tmp-checkpoint may be the newest
            if tidied:
                accelerator.print(tidied)
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

    from recipe.replicas import weights_checksum
    from recipe.tokenizer import tokenizer_fingerprint

    checksum = None
    if accelerator.distributed_type != DistributedType.FSDP:
        checksum = int(weights_checksum(model))
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
