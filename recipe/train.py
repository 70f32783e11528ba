"""Pretrain a GPT with a hand-written Accelerate loop.

    accelerate launch recipe/train.py --config configs/tiny.yaml [--key value ...]
    python recipe/train.py --config configs/tiny.yaml            # one process

Reads top to bottom: configuration, accelerator, data, model, optimizer and schedule, resume, the loop
(accumulate, clip, step, log, evaluate, save), export. Helpers sit above `main()`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration, TorchDynamoPlugin, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    get_cosine_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
)

from recipe import GPTConfig, GPTForCausalLM
from recipe.config import ConfigError, RunConfig, load_config
from recipe.data import PreparedData, prepare_data
from recipe.metrics import (
    JsonlLog,
    bits_per_byte,
    flops_per_token,
    gpu_peak_flops,
    measure_matmul_peak,
    perplexity,
    results_table,
)
from recipe.model_card import write_model_card
from recipe.plots import plot_loss, plot_lr

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


# ----------------------------------------------------------------------------- helpers


def has_accelerator() -> bool:
    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def check_hub_access(cfg: RunConfig) -> None:
    """Fail before training, not after hours of it, when the model could not be pushed."""
    from huggingface_hub import HfApi

    try:
        user = HfApi().whoami()
    except Exception as err:  # offline, no token or a bad token: all mean the same to the user
        raise ConfigError(
            f"push_to_hub is true but the Hub is not usable ({type(err).__name__}: {err}). "
            "Log in with `hf auth login` (or set HF_TOKEN) on a machine with network access, "
            "or run with --push_to_hub false."
        ) from None
    print(f"push_to_hub: logged in as {user.get('name')}, will push to {cfg.hub_model_id}")


def build_model(cfg: RunConfig, data: PreparedData) -> GPTForCausalLM:
    tok = data.tokenizer
    if cfg.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.model_name_or_path, trust_remote_code=True, attn_implementation=cfg.attn_implementation
        )
        if model.config.vocab_size < len(tok):
            raise ConfigError(
                f"model_name_or_path: the model's vocabulary ({model.config.vocab_size}) is "
                f"smaller than the tokenizer's ({len(tok)})"
            )
        return model
    config = GPTConfig(
        vocab_size=len(tok),
        max_position_embeddings=cfg.max_position_embeddings or cfg.block_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        embd_pdrop=cfg.dropout,
        resid_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        bias=cfg.bias,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config._attn_implementation = cfg.attn_implementation
    return GPTForCausalLM(config)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay the matmul weights only: biases, LayerNorm gains and embeddings are left alone (GPT-2/3)."""
    no_decay_types = (torch.nn.Embedding, torch.nn.LayerNorm)
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue  # the tied LM head is the embedding: counted once, undecayed
            seen.add(id(p))
            (
                no_decay if isinstance(module, no_decay_types) or name == "bias" or p.ndim < 2 else decay
            ).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_schedule(optimizer, cfg: RunConfig, num_processes: int = 1):
    # A prepared scheduler steps once per process per optimizer step, so its horizon is scaled to match.
    warmup, total = cfg.warmup_steps * num_processes, cfg.max_steps * num_processes
    if cfg.min_lr_ratio > 0:
        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, warmup, total, min_lr_rate=cfg.min_lr_ratio
        )
    return get_cosine_schedule_with_warmup(optimizer, warmup, total)


def schedule_curve(cfg: RunConfig) -> tuple[list[int], list[float]]:
    """The whole learning-rate schedule, step by step, for lr.png (independent of what was logged)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.learning_rate)
    sched = make_schedule(opt, cfg)
    steps, lrs = [], []
    for step in range(cfg.max_steps):
        steps.append(step + 1)
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return steps, lrs


def find_checkpoint(cfg: RunConfig) -> Path | None:
    if not cfg.resume_from_checkpoint:
        return None
    if cfg.resume_from_checkpoint != "latest":
        path = Path(cfg.resume_from_checkpoint)
        if not (path / STATE_FILE).is_file():
            raise ConfigError(
                f"resume_from_checkpoint: {path} is not a complete checkpoint (no {STATE_FILE})"
            )
        return path
    found = list_checkpoints(Path(cfg.output_dir))
    if not found:
        raise ConfigError(
            f"resume_from_checkpoint is 'latest' but {cfg.output_dir} holds no checkpoint-<step> folder"
        )
    return found[-1]


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A folder is complete once renamed from its temporary name."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if CHECKPOINT_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def save_checkpoint(accelerator: Accelerator, cfg: RunConfig, state: dict[str, Any]) -> Path:
    """`save_state` into a temporary folder, then rename: a crash mid-write never costs the last good one."""
    output_dir = Path(cfg.output_dir)
    final = output_dir / f"checkpoint-{state['global_step']}"
    tmp = output_dir / f"tmp-checkpoint-{state['global_step']}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if cfg.save_total_limit:
            for old in list_checkpoints(output_dir)[: -cfg.save_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def micro_batches(dataloader, start_epoch: int, skip: int, accelerator: Accelerator):
    """An endless stream of (epoch, batch) across epochs, resuming `skip` batches into `start_epoch`."""
    epoch = start_epoch
    while True:
        if hasattr(dataloader, "set_epoch"):
            dataloader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
        for batch in loader:
            yield epoch, {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
        epoch, skip = epoch + 1, 0


class StopSignal:
    """SIGTERM / Ctrl-C: finish the current step, save, exit. A second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)


@torch.no_grad()
def evaluate(
    model, dataloader, accelerator: Accelerator, max_batches: int | None, bytes_per_token: float
) -> dict[str, float]:
    """Token-weighted validation loss over all processes (gather_for_metrics drops the padding duplicates)."""
    model.eval()
    nll_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    # max_batches counts batches of all processes together, so the same blocks are scored at any scale.
    limit = None if max_batches is None else math.ceil(max_batches / accelerator.num_processes)
    for i, batch in enumerate(dataloader):
        if limit is not None and i >= limit:
            break
        logits = model(input_ids=batch["input_ids"]).logits  # (B, T, V)
        labels = batch["shift_labels"]  # (B, T)
        nll = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), reduction="none"
        ).view_as(labels)
        mask = labels.ne(-100)
        per_row = torch.stack([(nll * mask).sum(1), mask.sum(1)], dim=1).double()  # (B, 2)
        per_row = accelerator.gather_for_metrics(per_row)
        nll_sum += per_row[:, 0].sum()
        count += per_row[:, 1].sum()
    model.train()
    loss = (nll_sum / count.clamp(min=1)).item()
    return {
        "eval_loss": loss,
        "perplexity": perplexity(loss),
        "eval_bits_per_byte": bits_per_byte(loss, bytes_per_token),
    }


def stop_requested(stop: StopSignal, accelerator: Accelerator) -> bool:
    """Whether any process got a stop signal; all processes must agree, or the next collective hangs."""
    if accelerator.num_processes == 1:
        return stop.received is not None
    flag = torch.tensor(float(stop.received is not None), device=accelerator.device)
    return bool(accelerator.reduce(flag, "sum").item())


@torch.no_grad()
def write_sample(model, tokenizer, cfg: RunConfig) -> str | None:
    if cfg.sample_max_new_tokens <= 0:
        return None
    model.eval()
    ids = tokenizer(cfg.sample_prompt, return_tensors="pt").input_ids.to(model.device)
    if ids.shape[1] == 0:
        ids = torch.tensor([[tokenizer.eos_token_id]], device=model.device)
    torch.manual_seed(cfg.seed)
    room = model.config.max_position_embeddings - ids.shape[1]  # learned positions end at the context length
    out = model.generate(
        ids, max_new_tokens=min(cfg.sample_max_new_tokens, room), do_sample=True, temperature=0.8, top_k=200
    )
    return tokenizer.decode(out[0], skip_special_tokens=True)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, float]:
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    output_dir = Path(cfg.output_dir)
    if list_checkpoints(output_dir) and not cfg.resume_from_checkpoint and not cfg.overwrite_output_dir:
        raise ConfigError(
            f"output_dir {output_dir} already holds checkpoints: continue with "
            "--resume_from_checkpoint latest, or start over with --overwrite_output_dir true"
        )
    if cfg.push_to_hub:
        check_hub_access(cfg)
    for tracker in {"wandb": ["wandb"], "trackio": ["trackio"], "all": []}.get(cfg.report_to, []):
        if importlib.util.find_spec(tracker) is None:  # accelerate would silently log nowhere
            raise ConfigError(
                f"report_to is {cfg.report_to} but {tracker} is not installed: "
                f"`pip install {tracker}`, or --report_to tensorboard / none"
            )

    # --- accelerator
    accelerator = Accelerator(
        # Without cpu=True, `accelerate launch --multi_gpu` on a machine with no GPU starts N unrelated
        # single processes: accelerate only picks MULTI_CPU (gloo) when told it is on the CPU.
        cpu=not has_accelerator(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.gradient_accumulation_steps, sync_with_dataloader=False
        ),  # windows span epochs
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "runs")
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if cfg.torch_compile else None,
    )
    main_proc = accelerator.is_main_process
    set_seed(cfg.seed)
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if main_proc:
        output_dir.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite_output_dir and not cfg.resume_from_checkpoint:
            for old in list_checkpoints(output_dir):
                shutil.rmtree(old)
        cfg.save(output_dir / "run_config.yaml")

    # --- data: tokenised once (main process first), the others read the datasets cache
    data = prepare_data(
        cfg, accelerator.main_process_first, accelerator.process_index, accelerator.num_processes
    )
    streaming = not hasattr(data.train, "__len__")
    pin = accelerator.device.type == "cuda"
    # Full batches only: fixed shapes (no recompiles under torch.compile) and equal work on every process.
    train_dl = DataLoader(
        data.train,
        batch_size=cfg.per_device_train_batch_size,
        shuffle=not streaming,
        drop_last=True,
        num_workers=cfg.dataloader_num_workers,
        pin_memory=pin,
    )
    eval_dl = DataLoader(data.validation, batch_size=cfg.per_device_eval_batch_size, pin_memory=pin)

    # --- model, optimizer, schedule
    model = build_model(cfg, data)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    n_params = sum(p.numel() for p in model.parameters())
    fused = accelerator.device.type == "cuda"
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        fused=fused or None,
        foreach=None if fused else True,
    )
    scheduler = make_schedule(optimizer, cfg, accelerator.num_processes)
    if streaming:  # already split across ranks by prepare_data; accelerate must not shard it again
        model, optimizer, eval_dl, scheduler = accelerator.prepare(model, optimizer, eval_dl, scheduler)
    else:
        model, optimizer, train_dl, eval_dl, scheduler = accelerator.prepare(
            model, optimizer, train_dl, eval_dl, scheduler
        )
    if not streaming and len(train_dl) == 0:
        raise ConfigError(
            f"per_device_train_batch_size ({cfg.per_device_train_batch_size}) x processes "
            f"({accelerator.num_processes}) is more than the {len(data.train)} training blocks"
        )

    if cfg.report_to != "none":
        hparams = {
            k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.to_dict().items()
        }
        accelerator.init_trackers(cfg.run_name or output_dir.name, config=hparams)

    # --- resume: weights, optimizer, scheduler and RNG states from save_state; the data position from our state
    state = {"global_step": 0, "tokens_seen": 0, "train_runtime": 0.0}
    checkpoint = find_checkpoint(cfg)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        state.update(json.loads((checkpoint / STATE_FILE).read_text()))
        accelerator.print(f"Resumed from {checkpoint} at step {state['global_step']}")
    accum = cfg.gradient_accumulation_steps
    consumed = state["global_step"] * accum  # micro-batches per process
    start_epoch, skip = (0, consumed) if streaming else divmod(consumed, len(train_dl))
    batches = micro_batches(train_dl, start_epoch, skip, accelerator)

    log = JsonlLog(output_dir / "metrics.jsonl", enabled=main_proc, keep_until_step=state["global_step"])
    model_config = accelerator.unwrap_model(model).config
    flops_token = flops_per_token(model_config, cfg.block_size)
    peak = gpu_peak_flops(accelerator.device, cfg.mixed_precision)
    if peak is None and accelerator.device.type == "cpu":
        peak = measure_matmul_peak("cpu") * accelerator.num_processes  # 2 processes on one CPU share it
    stop = StopSignal()

    if main_proc:
        print(
            f"Model: {n_params / 1e6:.2f}M parameters, vocab {model_config.vocab_size}, context {cfg.block_size}"
        )
        print(
            f"Training {cfg.max_steps} steps x {cfg.per_device_train_batch_size} blocks x {accum} accumulation "
            f"x {accelerator.num_processes} processes = "
            f"{cfg.per_device_train_batch_size * accum * accelerator.num_processes * cfg.block_size} tokens per step"
        )

    # --- the loop
    model.train()
    progress = tqdm(
        total=cfg.max_steps,
        initial=state["global_step"],
        disable=not main_proc,
        desc="train",
        dynamic_ncols=True,
    )
    loss_sum = torch.zeros((), device=accelerator.device)  # summed on device; read only every logging_steps
    first_bad_step = torch.full((), -1, device=accelerator.device)
    steps_since_log, tokens_since_log, t_log = 0, 0, time.perf_counter()
    t_start, runtime_before = time.perf_counter(), state["train_runtime"]
    last_eval: dict[str, float] = {}
    last_train_loss = float("nan")
    epoch = start_epoch
    while state["global_step"] < cfg.max_steps:
        window = [next(batches) for _ in range(accum)]
        epoch = window[-1][0]
        # Normalise by the target tokens of the whole window on every process, so that 2 processes x 1
        # micro-batch and 1 process x 2 micro-batches take the same step (HF_NOTES section 4).
        n_items = sum(b["shift_labels"].ne(-100).sum() for _, b in window)
        n_items = accelerator.reduce(n_items, "sum") if accelerator.num_processes > 1 else n_items
        for _, batch in window:
            with accelerator.accumulate(model):
                out = model(
                    input_ids=batch["input_ids"],
                    shift_labels=batch["shift_labels"],
                    num_items_in_batch=n_items,
                )
                # backward divides by accum and DDP averages over processes; undo both: the sum is exact.
                accelerator.backward(out.loss * accum * accelerator.num_processes)
                loss_sum += out.loss.detach()
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        window_tokens = (
            sum(b["input_ids"].numel() for _, b in window) * accelerator.num_processes
        )  # shapes: no sync
        tokens_since_log += window_tokens
        state["tokens_seen"] += window_tokens

        state["global_step"] += 1
        steps_since_log += 1
        step = state["global_step"]
        first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss_sum), step, first_bad_step)
        progress.update(1)

        is_log = step % cfg.logging_steps == 0 or step == cfg.max_steps
        is_eval = step % cfg.eval_steps == 0 or step == cfg.max_steps
        is_save = step % cfg.save_steps == 0
        if is_log or is_eval or is_save or stop.received:
            # Every process must agree to stop, or the ones that go on hang in the next collective.
            bad = int(accelerator.gather(first_bad_step.view(1)).max().item())
            if bad > 0:
                accelerator.print(
                    f"\nLoss became NaN or infinite at step {bad}; stopping. The last good "
                    f"checkpoint stays in {output_dir}. Try a lower learning_rate or max_grad_norm."
                )
                accelerator.end_training()
                sys.exit(1)
        if is_log:
            elapsed = time.perf_counter() - t_log
            last_train_loss = (
                accelerator.reduce(loss_sum, "sum") if accelerator.num_processes > 1 else loss_sum
            ).item() / steps_since_log
            tok_s = tokens_since_log / elapsed
            row = {
                "step": step,
                "epoch": epoch,
                "loss": last_train_loss,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "tokens_per_second": tok_s,
                "tokens_seen": state["tokens_seen"],
            }
            if peak:
                row["mfu"] = tok_s * flops_token / peak
            log.write(row)
            accelerator.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=step)
            progress.set_postfix(loss=f"{last_train_loss:.3f}", lr=f"{row['lr']:.2e}", tok_s=f"{tok_s:,.0f}")
            loss_sum.zero_()
            steps_since_log, tokens_since_log, t_log = 0, 0, time.perf_counter()
        if is_eval:
            t_eval = time.perf_counter()
            # The final evaluation scores the whole validation split; the ones along the way may sample it.
            max_batches = None if step == cfg.max_steps else cfg.max_eval_batches
            last_eval = evaluate(
                model, eval_dl, accelerator, max_batches, data.summary["validation"].bytes_per_token
            )
            log.write({"step": step, **last_eval})
            accelerator.log({f"eval/{k}": v for k, v in last_eval.items()}, step=step)
            progress.write(
                f"step {step}: eval loss {last_eval['eval_loss']:.4f}, "
                f"ppl {last_eval['perplexity']:.2f}, bpb {last_eval['eval_bits_per_byte']:.4f}"
            )
            t_log += time.perf_counter() - t_eval  # evaluation time is not training throughput
        state["train_runtime"] = runtime_before + time.perf_counter() - t_start
        stopping = stop_requested(stop, accelerator) and step < cfg.max_steps  # at the end: just finish
        if is_save or stopping:
            path = save_checkpoint(accelerator, cfg, state)
            if stopping:
                progress.close()
                resume = (
                    " ".join(a for a in sys.argv if a)
                    if argv is None
                    else f"recipe/train.py {' '.join(argv)}"
                )
                launcher = (
                    "accelerate launch <the same launch options> "
                    if accelerator.num_processes > 1
                    else "python "
                )
                accelerator.print(
                    f"\nStopped by signal at step {step}; saved {path}.\n"
                    f"Resume with: {launcher}{resume} --resume_from_checkpoint latest"
                )
                accelerator.end_training()
                sys.exit(128 + (stop.received or signal.SIGTERM))
    progress.close()

    # --- export: output_dir becomes an HF model folder
    results = {
        "train_loss": last_train_loss,
        **last_eval,
        "eval_bytes_per_token": data.summary["validation"].bytes_per_token,
        "train_tokens": state["tokens_seen"],
        "train_runtime": state["train_runtime"],
        "train_tokens_per_second": state["tokens_seen"] / max(state["train_runtime"], 1e-9),
        "global_step": state["global_step"],
        "num_parameters": n_params,
    }
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    unwrapped.save_pretrained(
        output_dir,
        is_main_process=main_proc,
        save_function=accelerator.save,
        state_dict=accelerator.get_state_dict(model),
    )
    sample = None
    if main_proc:
        data.tokenizer.save_pretrained(output_dir)
        sample = write_sample(unwrapped, data.tokenizer, cfg)
        unwrapped.generation_config = GenerationConfig(
            bos_token_id=model_config.bos_token_id,
            eos_token_id=model_config.eos_token_id,
            pad_token_id=model_config.pad_token_id,
            do_sample=True,
            temperature=0.8,
            top_k=200,
            max_length=model_config.max_position_embeddings,
        )  # learned positions end there
        unwrapped.generation_config.save_pretrained(output_dir)
        (output_dir / "all_results.json").write_text(json.dumps(results, indent=2))
        plot_loss(log.rows, output_dir / "loss.png", model_config.vocab_size)
        plot_lr(*schedule_curve(cfg), output_dir / "lr.png")
        table = results_table(results, model_config.vocab_size)
        write_model_card(output_dir, cfg, data, results, table, sample)
        print(f"\n{table}\n")
        print(
            f"Model saved to {output_dir}/ (tokens seen {state['tokens_seen']:,}, "
            f"{results['train_tokens_per_second']:,.0f} tokens/s)\n"
            f'Sample it:   python -m recipe.generate --model {output_dir} --prompt "Romeo."\n'
            f'Load it:     AutoModelForCausalLM.from_pretrained("{output_dir}", trust_remote_code=True)'
        )
        if sample:
            print(f"\nA sample at temperature 0.8:\n{sample}")
    accelerator.end_training()
    if cfg.push_to_hub and main_proc:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(cfg.hub_model_id, private=cfg.hub_private_repo, exist_ok=True)
        api.upload_folder(
            repo_id=cfg.hub_model_id,
            folder_path=str(output_dir),
            ignore_patterns=["checkpoint-*", "tmp-checkpoint-*", "runs/*", "*/events.out.*"],
        )
        print(f"Pushed to https://huggingface.co/{cfg.hub_model_id}")
    return results


if __name__ == "__main__":
    try:
        main()
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
