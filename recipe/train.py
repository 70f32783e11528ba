"""Pretrain a GPT with a hand-written Accelerate loop.

    python recipe/train.py --config configs/tiny.yaml [--key value ...]          # one process, all cores
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml recipe/train.py --config ...

`main()` is the table of contents: set-up, data, model and optimizer, resume, the loop (forward, backward,
clip, step inline; log, evaluate, save and stop as helpers), finish. This file holds `main()` and the helpers
the loop itself needs; the set-up is in `recipe/run_setup.py`, resuming in `recipe/resume.py`, stopping in
`recipe/stopping.py`, scoring in `recipe/scoring.py`, checkpoints and the Hub in `recipe/checkpoint.py` and
`recipe/hub.py`, the optimizer and schedule in `recipe/optim.py`.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from recipe.checkpoint import (
    SAMPLING,
    plain_model,
    save_checkpoint,
    save_model_folder,
    verify_export,
)
from recipe.config import ConfigError, RunConfig, load_config
from recipe.downstream import report as downstream_report
from recipe.downstream.run import downstream_due, downstream_items, score_downstream
from recipe.hub import HubPusher, HubPushError
from recipe.metrics import (
    JsonlLog,
    Meter,
    describe_peak,
    flops_per_token,
    results_table,
    run_peak_flops,
)
from recipe.model_card import card_writer, write_sample
from recipe.optim import build_optimizers, make_schedule, schedule_curve
from recipe.plots import plot_lr
from recipe.replicas import check_replicas
from recipe.resume import (
    check_resume,
    check_resumed_alike,
    is_stream,
    layout,
    pin_dataset_revision,
    resolve_checkpoint,
    resume,
)
from recipe.run_setup import (
    build_model,
    check_output_dir,
    check_trackers,
    dataloaders,
    end_trackers,
    init_trackers,
    make_accelerator,
    show_progress_messages,
    start_output_dir,
)
from recipe.scoring import evaluate
from recipe.stopping import (
    AGREE_EVERY,
    StopSignal,
    agree,
    bad_loss_message,
    resume_hint,
    stop_for_signal,
    stop_run,
)

if TYPE_CHECKING:  # recipe.data (and `datasets`) is imported in main(): `make gpu-check` runs without them
    from recipe.data import PreparedData


# ----------------------------------------------------------------------------- the loop's helpers


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


@functools.cache
def takes_skip_logits(model_class: type) -> bool:
    """Whether the class's forward returns the loss alone on request (ours, also as a folder's remote code):
    read once per class, not at every micro-batch."""
    return "skip_logits" in inspect.signature(model_class.forward).parameters


def training_loss(model, batch: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor) -> torch.Tensor:
    """The training forward: the loss summed over the batch's targets / the window's. Our model (also loaded
    from a folder's own code) returns it alone (`skip_logits`: no (B, T, V) logits leave the compiled graph,
    nor accelerate's fp32 copy of them). Another model (model_name_or_path) computes a loss only when given
    `labels`, and its loss function takes the pre-shifted `shift_labels` before them."""
    targets = batch["shift_labels"].contiguous()  # a no-op for the loader's batches; the loss views it flat
    if takes_skip_logits(type(plain_model(model))):
        extra = {"skip_logits": True}
    else:
        extra = {"labels": targets}
    return model(input_ids=batch["input_ids"], shift_labels=targets, num_items_in_batch=num_items_in_batch,
                 **extra).loss  # fmt: skip


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


def log_row(accelerator: Accelerator, log: JsonlLog, row: dict, progress: tqdm, prefix: str) -> None:
    log.write(row)
    accelerator.log({f"{prefix}/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])
    if prefix == "train":
        progress.set_postfix(
            loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_second']:,.0f}"
        )
    elif not accelerator.is_main_process:  # tqdm.write prints even where the bar is disabled
        return
    elif "eval_loss" not in row:  # downstream tasks
        progress.write(downstream_report.line(row["step"], row))
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
        if downstream_report.scored_tasks(results):
            print(f"{downstream_report.table(results)}\n")
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
    if hub is not None and not hub.push_final(output_dir):
        raise HubPushError(
            f"push_to_hub: the final model is not on {hub.repo_id}; everything is in {output_dir.resolve()}/ "
            f"(`hf upload {hub.repo_id} {output_dir}` pushes it)"
        )
    accelerator.end_training()


# ----------------------------------------------------------------------------- main


def start_loop(accelerator: Accelerator, cfg: RunConfig, model, train_dl, data: PreparedData, state: dict,
               n_params: int) -> tuple[Any, JsonlLog, Meter]:  # fmt: skip
    """The loop's micro-batches (from the resumed position), its metrics.jsonl and meter; says what runs."""
    world = accelerator.num_processes
    state.update(layout(cfg, accelerator, train_dl, data))
    batches = micro_batches(train_dl, state, cfg.gradient_accumulation_steps, accelerator)
    log = JsonlLog(Path(cfg.output_dir) / "metrics.jsonl", enabled=accelerator.is_main_process,
                   keep_until_step=state["global_step"])  # fmt: skip
    meter = Meter(accelerator, flops_per_token(plain_model(model).config, cfg.block_size),
                  run_peak_flops(accelerator.device, cfg.mixed_precision, world))  # fmt: skip
    accelerator.print(describe_run(cfg, n_params, len(data.tokenizer), plain_model(model).config.vocab_size, world))  # fmt: skip
    if accelerator.device.type == "cuda":
        accelerator.print(describe_peak(accelerator.device, cfg.mixed_precision))
    return batches, log, meter


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
    downstream_data = downstream_items(cfg, accelerator, data.tokenizer, model.config)
    model, optimizers, schedulers, train_dl, eval_dls = prepare(
        accelerator, cfg, model, optimizers, schedulers, train_dl, eval_dls, streaming
    )
    if world > 1:
        HELD_UNTIL_EXIT.append(model)  # see cli(): never freed while the process lives
    state = resume(accelerator, checkpoint, train_dl, schedulers)
    if checkpoint is not None:
        check_resumed_alike(accelerator, model, state, data)
    start_output_dir(cfg, accelerator)  # every check has passed: output_dir is written from here on
    init_trackers(accelerator, cfg)
    accum = cfg.gradient_accumulation_steps
    batches, log, meter = start_loop(accelerator, cfg, model, train_dl, data, state, n_params)

    # --- the loop
    model.train()
    progress = tqdm(total=cfg.max_steps, initial=state["global_step"], disable=not main_proc, desc="train", dynamic_ncols=True)  # fmt: skip
    t_start, runtime_before, last_eval, last_downstream = time.perf_counter(), state["train_runtime"], {}, {}
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
            stop_run(accelerator, hub, 1, bad_loss_message(bad, output_dir))
        if is_log:
            row = meter.row(step, state, schedulers[0].get_last_lr()[0], grad_norm)
            log_row(accelerator, log, row, progress, "train")
        if is_eval or is_save or stopping:  # replicas that drifted apart end the run before anything is saved
            check_replicas(accelerator, model, step, hub, output_dir)
        if is_eval and not (
            stopping and step < cfg.max_steps
        ):  # a stop saves first: the grace period is short
            with meter.paused():  # evaluation time is not training throughput
                # The final evaluation scores the whole validation split; the ones along the way a fixed subset.
                whole = step == cfg.max_steps or "along" not in eval_dls
                eval_dl = eval_dls["final" if whole else "along"]
                last_eval = evaluate(model, eval_dl, accelerator, data.summary["validation"].bytes_per_token)
                log_row(accelerator, log, {"step": step, **last_eval, "eval_whole": whole}, progress, "eval")
        if downstream_data and not (stopping and step < cfg.max_steps) and downstream_due(cfg, step):
            with meter.paused():
                last_downstream = score_downstream(model, downstream_data, cfg, step == cfg.max_steps)
                log_row(accelerator, log, {"step": step, **last_downstream}, progress, "eval")
        state["train_runtime"] = runtime_before + time.perf_counter() - t_start
        stopping = stopping and step < cfg.max_steps  # a stop on the last step just finishes
        if is_save or stopping:
            with meter.paused():
                results = run_results(state, meter, {**last_eval, **last_downstream}, data, n_params)
                stream_loader = train_dl if streaming else None
                path = save(accelerator, model, cfg, state, data, log, results, hub, stream_loader, stopping)
        if stopping:
            progress.close()
            stop_for_signal(accelerator, hub, stop, step, path, resume_hint(argv, world), cfg)
    progress.close()

    # --- finish
    if streaming:
        data.summary["train"] = stream_summary(train_dl, accelerator)
    results = run_results(state, meter, {**last_eval, **last_downstream}, data, n_params)
    finish(accelerator, model, cfg, data, log, results, hub)
    return results


# The prepared model of a run with several processes. Freeing DDP's reducer destroys its gloo process group,
# and that waits, holding the GIL, for gloo's worker thread, which may itself be waiting for the GIL to free
# the tensors of the last collective: a deadlock (torch 2.13, seen in the tests when main() returned). So the
# model is never freed: cli() ends the process without the interpreter's teardown.
HELD_UNTIL_EXIT: list = []


def cli(argv: list[str] | None = None) -> None:
    """`python recipe/train.py ...`: main(), a ConfigError as one line (exit code 2), a stop's own exit
    code, then the process ends without the interpreter's teardown (HELD_UNTIL_EXIT). Everything a run writes
    is closed by then (end_training, the Hub's uploads waited for)."""
    code: int | str | None = 0
    try:
        main(argv)
    except (ConfigError, HubPushError) as err:
        end_trackers()  # raised after the trackers started (a failed final push): they are ended all the same
        print(f"error: {err}", file=sys.stderr)
        code = 2 if isinstance(err, ConfigError) else 1
    except SystemExit as stop:  # stop_run's exit codes (it ends the trackers itself)
        code = stop.code
    except BaseException:
        end_trackers()  # a run that crashes still ends its tracker runs (and flushes their files)
        raise
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if code is None else code if isinstance(code, int) else 1)  # sys.exit("text"): 1


if __name__ == "__main__":
    cli()
