"""Checkpoints: every `checkpoint-<step>` is a Hugging Face model folder plus what exact resume needs.

    checkpoint-300/
      config.json  model.safetensors  modeling_gpt.py  configuration_gpt.py      the model (clean keys)
      tokenizer.json  tokenizer_config.json  generation_config.json            so from_pretrained, pipeline,
      README.md  loss.png                                                       generate and export work on it
      training_state/    accelerate's save_state: optimizer(s), scheduler(s), RNG, stream positions (no weights)
      trainer_state.json step, tokens, runtime and the batch layout; written last

A checkpoint is written as `tmp-checkpoint-<step>` and renamed when complete, so a crash mid-write never costs
the last good one; a folder is deleted by renaming it `deleting-<name>` first (a name never listed), so a crash
mid-delete never leaves a `checkpoint-<step>` that looks complete but is not. `tidy_output_dir` finishes at the
next start what such a crash left. The weights are saved once, from the plain model: never with the wrappers of
torch.compile (`_orig_mod.`), DDP (`module.`) or FSDP (whose class `fully_shard` swaps in); under FSDP the
full state dict is gathered (a collective: every rank calls) and rank 0 saves a plain copy. Nothing here
unpickles freely: weights are safetensors, our state is JSON, and accelerate loads the rest with
`weights_only=True`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from recipe.config import ConfigError, padding_ids

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_CHECKPOINT_RE = re.compile(r"^tmp-checkpoint-(\d+)$")
DELETING = "deleting-"  # the prefix of a folder being deleted: never a checkpoint, removed at the next start
DELETING_RE = re.compile(r"^deleting-(tmp-)?checkpoint-\d+$")
STATE_FILE = "trainer_state.json"
TRAINING_STATE = "training_state"
# The sampling defaults saved with every model: generate(), pipeline() and `recipe.generate` read them.
SAMPLING = {"do_sample": True, "temperature": 0.8, "top_k": 200}
# Configuration keys that may change between a checkpoint and its resumed run (no effect on the weights).
_RESUMABLE_CONFIG_KEYS = {
    "transformers_version", "architectures", "auto_map", "dtype", "torch_dtype", "_name_or_path",
    "embd_pdrop", "resid_pdrop", "attn_pdrop", "use_cache", "_attn_implementation", "attn_implementation",
}  # fmt: skip


# ----------------------------------------------------------------------------- finding and rotating


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A folder is complete once renamed from its temporary name."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if CHECKPOINT_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def holds_checkpoints(output_dir: Path) -> bool:
    """Whether output_dir holds a checkpoint: a complete one, or a complete one a crash left unrenamed."""
    pending = output_dir.glob("tmp-checkpoint-*") if output_dir.is_dir() else []
    return bool(list_checkpoints(output_dir)) or any((p / STATE_FILE).is_file() for p in pending)


def rotate_checkpoints(output_dir: Path, keep: int | None, uploading: str | None = None) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (None: keep all), sparing the one being uploaded
    to the Hub (it goes at a later rotation). Returns what was deleted."""
    old = [p for p in (list_checkpoints(output_dir)[:-keep] if keep else []) if p.name != uploading]
    for path in old:
        delete_folder(path)
    return old


def set_aside(path: Path) -> Path:
    """Rename `path` to `deleting-<name>` beside it (one atomic rename): from then on it is no checkpoint,
    whatever a crash leaves of it. Returns the new path."""
    aside = path.with_name(DELETING + path.name)
    if aside.exists():  # what an earlier crash left of the same name: garbage already
        shutil.rmtree(aside)
    os.replace(path, aside)
    return aside


def delete_folder(path: Path) -> None:
    """Delete a folder so that a crash midway (kill -9 inside rmtree) leaves only `deleting-<name>`."""
    shutil.rmtree(set_aside(path))


def promote(tmp: Path, final: Path) -> None:
    """Rename a complete `tmp` to `final`. os.replace cannot replace a non-empty folder, so an existing
    `final` is set aside first and deleted after: at every instant one of them is complete and findable
    (a crash between the two renames leaves the complete `tmp`, which `tidy_output_dir` promotes)."""
    old = set_aside(final) if final.exists() else None
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old)


def tidy_output_dir(output_dir: Path) -> str | None:
    """Finish what a crash left in output_dir (the main process, at the start, before any checkpoint is
    looked for): a `tmp-checkpoint-<step>` holding its state file is complete and becomes `checkpoint-<step>`;
    one without is half-written, and a `deleting-*` folder half-deleted: both are removed. Returns the line
    that says so, or None when there was nothing to do."""
    if not output_dir.is_dir():
        return None
    done = []
    for path in sorted(output_dir.iterdir()):
        match = TMP_CHECKPOINT_RE.match(path.name)
        if match and path.is_dir() and (path / STATE_FILE).is_file():
            promote(path, output_dir / f"checkpoint-{match.group(1)}")
            done.append(f"completed {path.name} as checkpoint-{match.group(1)}")
        elif match and path.is_dir():
            delete_folder(path)
            done.append(f"removed the half-written {path.name}")
    for path in sorted(output_dir.iterdir()):
        if DELETING_RE.match(path.name) and path.is_dir():
            shutil.rmtree(path)
            done.append(f"removed the half-deleted {path.name.removeprefix(DELETING)}")
    if not done:
        return None
    return f"output_dir: an interrupted run left unfinished folders in {output_dir}: {'; '.join(done)}"


def find_checkpoint(
    resume_from: str | None,
    output_dir: Path,
    download: Callable[..., Path | None],
    hub_repo: str | None = None,
) -> Path | None:
    """`resume_from_checkpoint`: a checkpoint folder, "latest" (in output_dir), a Hub repo id whose
    `last-checkpoint/` is downloaded once (`download(repo_id)` returns the local folder), or "auto": the newest
    checkpoint in output_dir, else `hub_repo`'s last-checkpoint (`download(repo, missing_ok=True)` gives None
    where there is none), else None: a fresh start. The same command then starts a run and resumes it."""
    if not resume_from:
        return None
    if resume_from == "auto":
        found = list_checkpoints(output_dir)
        if found:
            return found[-1]
        return download(hub_repo, missing_ok=True) if hub_repo else None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise ConfigError(
                f"resume_from_checkpoint is 'latest' but {output_dir} holds no checkpoint-<step> folder"
            )
        return found[-1]
    path = Path(resume_from).expanduser()
    if not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", resume_from):
        path = download(resume_from)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"resume_from_checkpoint: {path} is not a complete checkpoint (no {STATE_FILE})")
    return path


# ----------------------------------------------------------------------------- the model, without wrappers


def plain_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside the compile / DDP wrappers, without touching the live wrapped model.

    (`accelerator.unwrap_model` with its default keep_torch_compile=True writes the unwrapped module back
    into the compiled wrapper: on a compiled DDP model that silently drops DDP from the live model.)"""
    return extract_model_from_parallel(model, keep_fp32_wrapper=True, keep_torch_compile=False)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(plain_model(model), FSDPModule)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights with plain keys. Under FSDP2 a collective (every rank must call it) that
    leaves the full dict on rank 0 (in CPU memory) and an empty one elsewhere."""
    inner = plain_model(model)
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(inner, options=options)
    return inner.state_dict()


def unsharded_copy(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> PreTrainedModel:
    """A plain model of the original class holding `state_dict` (the sharded model's class is torch's, and
    transformers would record it in auto_map)."""
    from accelerate import init_empty_weights
    from torch.distributed.fsdp import FSDPModule

    inner = plain_model(model)
    cls = next(
        c for c in type(inner).__mro__ if issubclass(c, PreTrainedModel) and not issubclass(c, FSDPModule)
    )
    with init_empty_weights(include_buffers=False):  # no random init of a 7B model on every save
        copy = cls(inner.config)
    load_weights(copy, state_dict, assign=True)
    copy.tie_weights()
    return copy


def load_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], assign: bool = False) -> None:
    """Load every weight or fail: only a tied LM head may be absent from the dict."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=assign)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint weights do not fit the model: missing {missing}, unexpected {unexpected}"
        )


def generation_config(config, tokenizer=None) -> GenerationConfig:
    """Sampling defaults; the vocabulary padding (ids past the tokenizer's) is suppressed: never generated.
    No max_length: callers pass max_new_tokens, and both together warn. The context limit is in config.json."""
    return GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        suppress_tokens=padding_ids(config.vocab_size, tokenizer),
        **SAMPLING,
    )


def save_model_folder(
    model: torch.nn.Module, folder: Path, tokenizer, is_main: bool
) -> PreTrainedModel | None:
    """Write an HF model folder (weights, config with auto_map, modeling code, tokenizer, generation config).

    Call on every rank (gathering a sharded model is a collective). Returns, on the main process, the plain
    model that was saved (the live model's own module when unsharded), for sampling; None elsewhere."""
    sharded = is_sharded(model)
    state_dict = full_state_dict(model) if sharded else None
    if not is_main:
        return None
    saved = unsharded_copy(model, state_dict) if sharded else plain_model(model)
    saved.generation_config = generation_config(saved.config, tokenizer)
    saved.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return saved


# ----------------------------------------------------------------------------- save and resume


def skip_weights_in_save_state(models, weights, output_dir) -> None:
    """accelerate save_state pre-hook: the checkpoint already holds the weights, clean, in the model folder
    (accelerate would save them again with wrapper prefixes). Under FSDP the list is empty: accelerate saves
    its own copy of the weights in training_state/ (sharded with SHARDED_STATE_DICT, as
    configs/accelerate/fsdp.yaml sets) and loads it back."""
    weights.clear()


def load_weights_from_model_folder(models, input_dir) -> None:
    """accelerate load_state pre-hook: load the weights from the checkpoint's model folder instead (one
    file, or the shards its index names: save_pretrained shards above 50 GB)."""
    from safetensors.torch import load_file

    folder = Path(input_dir).parent
    index = folder / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    state_dict = {k: v for name in files for k, v in load_file(str(folder / name)).items()}
    for model in models:
        load_weights(plain_model(model), state_dict)
    models.clear()


def save_checkpoint(
    accelerator,
    model: torch.nn.Module,
    output_dir: Path,
    state: dict[str, Any],
    tokenizer,
    save_total_limit: int | None,
    rank_state: dict[str, Any] | None = None,
    write_card: Callable[[Path, Any], None] | None = None,
    uploading: str | None = None,
) -> Path:
    """Write checkpoint-<step> as tmp-checkpoint-<step>, then rename; rotate. Every rank calls it.

    `rank_state`: this rank's own resumable state (e.g. a stream's position), saved per rank.
    `write_card(folder, model_config)` adds the model card and plots on the main process."""
    final = output_dir / f"checkpoint-{state['global_step']}"
    tmp = output_dir / f"tmp-checkpoint-{state['global_step']}"
    if accelerator.is_main_process and tmp.exists():
        delete_folder(tmp)
    accelerator.wait_for_everyone()
    saved = save_model_folder(model, tmp, tokenizer, accelerator.is_main_process)
    config = None if saved is None else saved.config
    del saved  # under FSDP a full copy on the main process: freed before save_state gathers again
    accelerator.save_state(str(tmp / TRAINING_STATE))
    if rank_state is not None:  # torch.save of plain types: loaded back with weights_only=True
        torch.save(rank_state, tmp / TRAINING_STATE / f"rank_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if write_card is not None:
            write_card(tmp, config)
        # Last, and whole or not at all (a kill -9 mid-write must not leave a truncated file that marks the
        # folder complete for tidy_output_dir): written aside, then renamed into place.
        (tmp / f"{STATE_FILE}.partial").write_text(json.dumps(state, indent=2))
        os.replace(tmp / f"{STATE_FILE}.partial", tmp / STATE_FILE)
        promote(tmp, final)  # a step saved again (a resumed run) replaces its old folder, never loses both
        rotate_checkpoints(output_dir, save_total_limit, uploading)
    accelerator.wait_for_everyone()
    return final


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text())


def read_rank_state(checkpoint: Path, rank: int) -> dict[str, Any] | None:
    path = checkpoint / TRAINING_STATE / f"rank_state_{rank}.pt"
    return torch.load(path, weights_only=True) if path.is_file() else None


def check_model_matches(checkpoint: Path, config) -> None:
    """One clear line when the run's model differs from the checkpoint's (instead of a load_state_dict
    traceback): the keys of config.json whose values differ."""
    saved = json.loads((checkpoint / "config.json").read_text())
    ours = config.to_dict()
    differ = [
        f"{key} (checkpoint {saved[key]!r}, this run {ours[key]!r})"
        for key in sorted(saved.keys() & ours.keys())
        if key not in _RESUMABLE_CONFIG_KEYS and saved[key] != ours[key]
    ]
    if differ:
        # A checkpoint from before the vocabulary was padded (pad_vocab_size_to_multiple_of) has the tokenizer's.
        hint = " (--pad_vocab_size_to_multiple_of 1 builds the unpadded vocabulary)" if "vocab_size" in saved and saved["vocab_size"] < ours.get("vocab_size", 0) else ""  # fmt: skip
        raise ConfigError(
            f"resume_from_checkpoint: {checkpoint} holds a different model: {'; '.join(differ)}{hint}. "
            "Resume with the checkpoint's settings, or start a new output_dir"
        )


SCHEDULE_KEYS = ("max_steps", "warmup_steps", "min_lr_ratio", "learning_rate", "muon_learning_rate")
# Restored from the optimizer's saved param groups whatever the run says: a change would be silently dropped.
OPTIMIZER_KEYS = (
    "optim",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "muon_momentum",
    "muon_split_fused",
)


def run_identity(cfg, data) -> dict[str, Any]:
    """What a resume must continue: the tokenizer, the data (and the seed that shuffles it) and the
    learning-rate schedule (saved with every checkpoint; `check_same_run` compares them)."""
    from recipe.tokenizer import tokenizer_fingerprint

    return {"tokenizer_fingerprint": tokenizer_fingerprint(data.tokenizer), "data_content_fingerprint": data.fingerprint,
            "data_files": data.files, "dataset_revision": cfg.dataset_revision, "seed": cfg.seed,
            "schedule": {k: getattr(cfg, k) for k in SCHEDULE_KEYS},
            "optimizer": {k: getattr(cfg, k) for k in OPTIMIZER_KEYS}}  # fmt: skip


def applies(key: str, optim: str) -> bool:
    """Whether a schedule or optimizer setting has any effect with `optim` (AdamW runs ignore muon_*)."""
    return optim == "muon" or not key.startswith("muon_")


def check_same_run(checkpoint: Path, saved: dict[str, Any], cfg, data) -> list[str]:
    """One line naming what differs from the checkpoint: another tokenizer or other data are refused; another
    schedule too, unless resume_new_schedule. Returns the schedule changes that will run (to print)."""
    ours = run_identity(cfg, data)
    differ = [
        what
        for key, what in [
            ("tokenizer_fingerprint", "the tokenizer"),
            ("data_content_fingerprint", "the data"),
            ("data_files", "the data files' content (sizes and sampled bytes)"),
            (
                "dataset_revision",
                f"the dataset's commit (resume with --dataset_revision {saved.get('dataset_revision')})",
            ),
            # the seed orders map-style data (accelerate's seedable sampler) and a stream's shuffle buffer
            ("seed", f"the seed (it shuffles the data: resume with --seed {saved.get('seed')})"),
        ]  # fmt: skip
        # not checked: what a checkpoint written before these were saved lacks, or a commit not resolved
        if saved.get(key) is not None and ours[key] is not None and saved[key] != ours[key]
    ]
    schedule = saved.get("schedule", ours["schedule"])
    changes = [
        f"{k} {schedule[k]} -> {v}"
        for k, v in ours["schedule"].items()
        if k in schedule and schedule[k] != v and applies(k, cfg.optim)
    ]
    if changes and not cfg.resume_new_schedule:
        differ.append(f"the schedule ({', '.join(changes)}; --resume_new_schedule true runs the new one)")
    # Keys a checkpoint written before they existed lacks are their defaults then (not unknown: skipped).
    optimizer = (
        {"muon_split_fused": False, **saved["optimizer"]} if "optimizer" in saved else ours["optimizer"]
    )
    other = [
        f"{k} {optimizer[k]} -> {v}"
        for k, v in ours["optimizer"].items()
        if k in optimizer and optimizer[k] != v and applies(k, cfg.optim)  # optim itself is always compared
    ]
    if other:
        differ.append(f"the optimizer settings ({', '.join(other)}: the checkpoint's are what would run)")
    if differ:
        raise ConfigError(
            f"resume_from_checkpoint: {' and '.join(differ)} differ from {checkpoint}'s; resume with the "
            "checkpoint's tokenizer, data and schedule, or start a new output_dir"
        )
    return changes


def resume_accumulation(saved: dict[str, Any], cfg, num_processes: int, streaming: bool) -> int:
    """The gradient accumulation that keeps the checkpoint's tokens per optimizer step with this run's
    number of processes, so the schedule and the data position continue exactly; or a clear refusal."""
    old_world = saved.get("num_processes", num_processes)
    old_accum = saved.get("gradient_accumulation_steps", cfg.gradient_accumulation_steps)
    for key in ("per_device_train_batch_size", "block_size"):
        if key in saved and saved[key] != getattr(cfg, key):
            raise ConfigError(
                f"resume_from_checkpoint: the checkpoint was trained with {key} {saved[key]}, this run has "
                f"{getattr(cfg, key)}; resume with --{key} {saved[key]}"
            )
    if old_world == num_processes:
        if old_accum != cfg.gradient_accumulation_steps:
            raise ConfigError(
                f"resume_from_checkpoint: the checkpoint was trained with gradient_accumulation_steps "
                f"{old_accum}, this run has {cfg.gradient_accumulation_steps}; resume with "
                f"--gradient_accumulation_steps {old_accum}"
            )
        return old_accum
    per_step = old_world * old_accum  # micro-batches per optimizer step, all processes together
    if streaming or per_step % num_processes:
        why = (
            "a streamed run's position is saved per process"
            if streaming
            else f"{per_step} micro-batches per step cannot be split evenly over {num_processes} processes"
        )
        raise ConfigError(
            f"resume_from_checkpoint: the checkpoint was written by {old_world} process(es), this run has "
            f"{num_processes}, and {why}; resume with {old_world} process(es)"
        )
    return per_step // num_processes


EXPORT_TOLERANCE = 1e-5


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
