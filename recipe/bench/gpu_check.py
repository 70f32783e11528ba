"""`make gpu-check`: spend a GPU machine's first minutes measuring, not debugging.

    python3 recipe/bench/gpu_check.py                # GPUs: 124M, bf16 + compile + fused AdamW; with 2+ GPUs DDP and FSDP too
    python3 recipe/bench/gpu_check.py --dry-run      # the same code paths on a CPU: a tiny model, 2 gloo processes

Needs torch, transformers and accelerate (and safetensors and pyyaml, which they install), nothing else: no
`datasets`, no tokenizer files, no network. The batches are random token ids (a pool of them, revisited, so
the loss falls as the model memorises them). The steps, checkpoint, export and resume are the project's own
(`make_accelerator`, `build_model`, `build_optimizers`, `save_checkpoint`, `verify_export`, `load_state`), so
the check exercises the code a run uses. It ends with a table for BENCHMARKS.md.

Run as a script (not `-m`): `import recipe` needs transformers, and the first thing this prints is what is
missing. With 2+ GPUs (or `--dry-run`) it re-launches itself as `--worker ddp|fsdp|fsdp-cpu` processes.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if __package__ in (None, ""):  # run as a script: import `recipe` from this tree (it need not be installed)
    sys.path[0] = str(ROOT)

# What pyproject.toml pins; older versions are tried with a warning, a failed import is the verdict.
NEEDS = {"torch": "2.4", "transformers": "5.24", "accelerate": "1.15", "safetensors": "0.4", "pyyaml": "6.0"}
BELOW = {"transformers": "6"}
IMPORT_NAME = {"pyyaml": "yaml"}
TOOL = "gpu-check"  # what its lines start with; recipe/bench/gpu.py reuses the preflight as bench-gpu
RESULT = "gpu-check result: "  # a worker's one JSON line for the parent's summary
EXPORT_TOLERANCE = 1e-5  # checkpoint.verify_export's

# (single-device steps, warm-up steps, resumed steps, steps under DDP / FSDP): GPU and CPU rehearsal.
GPU_STEPS = (300, 20, 20, 30)
DRY_STEPS = (20, 3, 4, 6)


def log(message: str) -> None:
    print(f"{TOOL}: {message}", flush=True)


def fail(message: str) -> None:
    print(f"{TOOL}: FAIL: {message}", flush=True)
    raise SystemExit(2)


# ----------------------------------------------------------------------------- what it needs, what is here


def preflight(dry_run: bool) -> dict[str, str]:
    """Print what the check needs and what this machine has; stop with one line if something is missing."""
    log(
        "needs python3 with torch>=2.4 (a CUDA build), transformers>=5.24,<6, accelerate>=1.15, safetensors, "
        "pyyaml; not datasets, matplotlib or a tokenizer (random token ids); no network"
    )
    found, missing = {}, []
    for dist, minimum in NEEDS.items():
        try:
            importlib.import_module(IMPORT_NAME.get(dist, dist))
            found[dist] = importlib.metadata.version(dist)
        except Exception:  # noqa: BLE001  (a broken install counts as missing)
            missing.append(dist)
            continue
        if _older(found[dist], minimum):
            log(f"WARNING: {dist} {found[dist]} is older than the pinned {minimum}; trying anyway")
    log(f"found python {platform.python_version()} ({sys.executable}); "
        + "; ".join(f"{d} {v}" for d, v in found.items()))  # fmt: skip
    if missing:
        specs = " ".join(f"'{d}>={NEEDS[d]}" + (f",<{BELOW[d]}'" if d in BELOW else "'") for d in missing)
        fail(
            f"missing {', '.join(missing)}. Install from wheels brought along: {sys.executable} -m pip install "
            f"--no-index --find-links <wheel folder> {specs}  (or: make {TOOL} WHEELS=<wheel folder>)"
        )
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    found["cuda"] = torch.version.cuda or "none"
    found["gpus"] = ", ".join(f"{gpus.count(n)} x {n}" for n in dict.fromkeys(gpus)) or "none"
    log(f"devices: {found['gpus']} (torch built for CUDA {found['cuda']})")
    if not gpus and not dry_run:
        fail(
            "no CUDA GPU: torch.cuda.is_available() is False (a CPU build of torch, or no driver). "
            f"Rehearse on a CPU with: make {TOOL} DRY_RUN=1"
        )
    if gpus and not dry_run and not torch.cuda.is_bf16_supported():
        log("WARNING: this GPU has no bf16; pass --mixed_precision fp16 or no")
    try:
        importlib.import_module("recipe.run_setup").show_progress_messages(True)
    except Exception as err:  # noqa: BLE001
        fail(f"cannot import the project's training code with these versions: {type(err).__name__}: {err}")
    return found


def _older(version: str, minimum: str) -> bool:
    from packaging.version import Version  # a dependency of transformers and accelerate

    return Version(version).release < Version(minimum).release


# ----------------------------------------------------------------------------- shared pieces


class SyntheticTokenizer:
    """What `gpt_config` reads of a tokenizer: the vocabulary size and the special ids."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.bos_token_id = self.eos_token_id = vocab_size - 1
        self.pad_token_id = None

    def __len__(self) -> int:
        return self.vocab_size


def run_config(args: argparse.Namespace, max_steps: int, output_dir: Path):
    from recipe.config import load_config

    config = args.config or str(ROOT / ("configs/tiny.yaml" if args.dry_run else "configs/gpt2-124m.yaml"))
    overrides = ["--output_dir", str(output_dir), "--report_to", "none", "--max_steps", str(max_steps),
                 "--gradient_accumulation_steps", "1", "--warmup_steps", str(max(1, max_steps // 10))]  # fmt: skip
    if args.dry_run:  # bf16 is ~20x slower on CPUs without native bf16 (BENCHMARKS.md); a tiny model gains
        # nothing from threads, and spinning threads on a busy machine made its steps 10x slower
        overrides += ["--mixed_precision", "no", "--num_threads", "1"]
    if args.compile is not None:
        overrides += ["--torch_compile", str(args.compile).lower()]
    return load_config(["--config", config, *overrides, *args.overrides])


class Batches:
    """`n` batches of random token ids cut from one random stream, on the device; step i uses batch i mod n.
    Each process gets its own stream (seed + rank)."""

    def __init__(self, cfg, n: int, seed: int, device):
        import torch

        b, t = cfg.per_device_train_batch_size, cfg.block_size
        stream = torch.randint(
            0, cfg.vocab_size, (n * b * (t + 1),), generator=torch.Generator().manual_seed(seed)
        )
        windows = stream.view(n, b, t + 1).to(device)  # (n, B, T + 1)
        self.inputs = windows[:, :, :-1].contiguous()  # (n, B, T)
        self.targets = windows[:, :, 1:].contiguous()  # (n, B, T): the next token at each position
        self.tokens_per_batch = b * t

    def __call__(self, step: int):
        return self.inputs[step % len(self.inputs)], self.targets[step % len(self.targets)]


def model_inputs(x, y) -> dict:
    """The forward's arguments for a batch, as recipe/train.py's `training_loss` passes them: input ids, the
    pre-shifted targets, the loss alone."""
    return {"input_ids": x, "shift_labels": y, "skip_logits": True}


def train_steps(model, optimizers, schedulers, batches: Batches, steps: range, max_grad_norm: float, accelerator=None,
                inputs: Callable[..., dict] = model_inputs):  # fmt: skip
    """The step of recipe/train.py: forward, backward, clip, step. Returns the losses (on the device, no sync).
    Without an accelerator (FSDP2 applied by hand, in the CPU rehearsal) backward and clip are torch's.
    `inputs(x, y)` gives the forward's arguments (recipe/bench/gpu.py varies them)."""
    import torch

    losses = []
    for step in steps:
        x, y = batches(step)
        if accelerator is not None:
            with accelerator.accumulate(model):
                out = model(**inputs(x, y))
                accelerator.backward(out.loss)
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        else:
            out = model(**inputs(x, y))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        for optimizer, scheduler in zip(optimizers, schedulers):
            optimizer.step()
            scheduler.step()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.detach())
    return losses


def timed(fn, device):
    """(result, seconds) with the device's queue drained at both ends."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return result, time.perf_counter() - start


def build(cfg, accelerator, seed: int):
    """A fresh model, its optimizers and schedules, prepared by `accelerator` (as recipe/train.py does)."""
    from accelerate.utils import set_seed

    from recipe.optim import build_optimizers
    from recipe.run_setup import build_model

    set_seed(seed)
    model = build_model(cfg, SyntheticTokenizer(cfg.vocab_size))
    optimizers = build_optimizers(model, cfg, accelerator.device.type, accelerator.num_processes)
    return prepare(cfg, accelerator, model, optimizers)


def prepare(cfg, accelerator, model, optimizers: list) -> tuple:
    """(model, optimizers, schedulers): a schedule for each optimizer, all prepared as recipe/train.py does."""
    from recipe.optim import make_schedule

    schedulers = [make_schedule(opt, cfg) for opt in optimizers]
    prepared = accelerator.prepare(model, *optimizers, *schedulers)
    n = len(optimizers)
    return prepared[0], list(prepared[1 : 1 + n]), list(prepared[1 + n :])


def throughput(cfg, accelerator, model, optimizers, schedulers, batches, steps: int, warmup: int) -> dict:
    """Warm-up (the first step compiles), then timed steps: tokens/s over all processes, MFU, peak memory."""
    import torch

    from recipe.checkpoint import plain_model
    from recipe.metrics import flops_per_token, gpu_card, run_peak_flops

    device, world = accelerator.device, accelerator.num_processes
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    run = lambda r: train_steps(model, optimizers, schedulers, batches, r, cfg.max_grad_norm, accelerator)  # noqa: E731
    first, t_first = timed(lambda: run(range(0, 1)), device)
    rest, t_rest = timed(lambda: run(range(1, warmup)), device)
    measured, seconds = timed(lambda: run(range(warmup, steps)), device)
    losses = [x.item() for x in first + rest + measured]
    tok_s = (steps - warmup) * batches.tokens_per_batch * world / seconds
    peak = run_peak_flops(device, cfg.mixed_precision, world)
    flops = flops_per_token(plain_model(model).config, cfg.block_size)
    return {
        "first_step_s": t_first,
        "warmup_s": t_first + t_rest,
        "measured_steps": steps - warmup,
        "measured_s": seconds,
        "tokens_per_second": tok_s,
        "mfu": tok_s * flops / peak if peak else None,
        "peak_flops": peak,
        "card": (gpu_card(device) or ("unknown",))[0] if device.type == "cuda" else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "finite": all(x == x and abs(x) != float("inf") for x in losses),
    }


def export_check(folder: Path, model) -> float:
    """checkpoint.verify_export: clean keys, logits within 1e-5 (raises otherwise); returns the max logit gap."""
    from recipe.checkpoint import verify_export

    return verify_export(folder, model)


def cpu_weights(model) -> dict:
    from recipe.checkpoint import plain_model

    return {k: v.detach().to("cpu", copy=True).float() for k, v in plain_model(model).state_dict().items()}


def max_gap(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def l2_gap(a: dict, b: dict) -> float:
    return sum(((a[k] - b[k]) ** 2).sum().item() for k in a) ** 0.5


def trainer_state(cfg, step: int, world: int, runtime: float) -> dict:
    return {"global_step": step, "tokens_seen": step * cfg.per_device_train_batch_size * cfg.block_size * world,
            "train_runtime": runtime, "epoch": 0, "num_processes": world, "gradient_accumulation_steps": 1,
            "per_device_train_batch_size": cfg.per_device_train_batch_size, "block_size": cfg.block_size}  # fmt: skip


# ----------------------------------------------------------------------------- one device


def single_device(args: argparse.Namespace, out: Path, res: dict) -> None:
    """Throughput, checkpoint + export, then resume: a fresh model loads the checkpoint and repeats the
    uninterrupted run's next steps on the same batches. Fills `res` as it goes, so that a failure late in the
    check keeps the figures measured before it."""
    import torch

    from recipe.checkpoint import save_checkpoint
    from recipe.run_setup import make_accelerator

    steps, warmup, resumed, _ = args.steps_plan
    cfg = run_config(args, steps + resumed, out)
    accelerator = make_accelerator(cfg)
    device = accelerator.device
    log(f"one device ({device}): {cfg.hidden_size} hidden x {cfg.num_hidden_layers} layers, batch "
        f"{cfg.per_device_train_batch_size} x {cfg.block_size}, {_precision(cfg)}, compile "
        f"{cfg.torch_compile}; {steps} steps ({warmup} warm-up), checkpoint, export, resume for {resumed}")  # fmt: skip
    (model, optimizers, schedulers), t_build = timed(lambda: build(cfg, accelerator, cfg.seed), device)
    batches = Batches(cfg, 16, cfg.seed, device)
    res.update(throughput(cfg, accelerator, model, optimizers, schedulers, batches, steps, warmup))
    res.update(build_s=t_build, parameters=sum(p.numel() for p in model.parameters()), device=str(device),
               fused_adamw=bool(optimizers[0].defaults.get("fused")), compile=cfg.torch_compile, arch=f"{cfg.architecture} + {cfg.optim}",
               precision=_precision(cfg), batch=f"{cfg.per_device_train_batch_size} x {cfg.block_size}")  # fmt: skip
    log(f"first step {res['first_step_s']:.1f} s{' (compiles)' if cfg.torch_compile else ''}, warm-up {res['warmup_s']:.1f} s; {res['measured_steps']} "
        f"steps in {res['measured_s']:.2f} s: {res['tokens_per_second']:,.0f} tokens/s, MFU {_pct(res['mfu'])}, "
        f"peak memory {_gib(res['peak_memory_gib'])}; loss {res['loss_first']:.3f} -> {res['loss_last']:.3f}")  # fmt: skip
    if not res["finite"]:
        raise RuntimeError("the loss became NaN or infinite")

    checkpoint, res["save_s"] = timed(
        lambda: save_checkpoint(
            accelerator, model, out, trainer_state(cfg, steps, 1, res["measured_s"]), None, None
        ),
        device,
    )
    res["checkpoint_mb"] = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file()) / 1e6
    res["export_diff"] = export_check(checkpoint, _plain(model))
    log(f"checkpoint {checkpoint} ({res['checkpoint_mb']:,.0f} MB) in {res['save_s']:.1f} s; export reloads, "
        f"max logit diff {res['export_diff']:.3g} (tolerance {EXPORT_TOLERANCE:g}): PASS")  # fmt: skip

    at_save = cpu_weights(model)
    saved_state = snapshot(model, optimizers, schedulers)  # on the device, for the noise floor below
    span = range(steps, steps + resumed)
    go_on = train_steps(model, optimizers, schedulers, batches, span, cfg.max_grad_norm, accelerator)
    losses_a, weights_a = [x.item() for x in go_on], cpu_weights(model)
    restore(model, optimizers, schedulers, saved_state)  # the same steps again from memory: no save, no load
    again = train_steps(model, optimizers, schedulers, batches, span, cfg.max_grad_norm, accelerator)
    weights_floor = cpu_weights(model)
    accelerator.free_memory()
    del again
    model = optimizers = schedulers = go_on = saved_state = None  # free the GPU before the resumes
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # fp32 on a CPU repeats bit for bit. On a GPU atomics in backward (embedding, attention) sum in any order and
    # Adam turns the tiniest gradient gap into a full-size step for weights whose gradient is near zero, so a
    # max-element gap says nothing there (seen on an H100: 35% of the steps' largest move after a correct
    # resume). So the check compares L2 gaps, as a share of how far the steps moved all weights: the resumed
    # run's gap to the uninterrupted one must stay near the gap between two uninterrupted runs (the noise
    # floor, taken without any save or load, so a resume bug cannot inflate it). Two spoiled resumes, the
    # optimizer state or the schedule lost, must fail the same test, or the check cannot tell and fails.
    runs = resumed_runs(cfg, checkpoint, batches, span, cfg.seed + 1, res)
    losses_b, weights_b = runs.pop("resume")
    motion = l2_gap(weights_a, at_save)
    exact = device.type == "cpu" and cfg.mixed_precision == "no"
    res["resume_floor"] = l2_gap(weights_a, weights_floor) / motion
    allowed = 1e-6 if exact else max(0.05, 2 * res["resume_floor"])
    loss_tol = 1e-6 if exact else 1e-2 * min(losses_a) + 1e-5
    res["resume_loss_diff"] = max(abs(a - b) for a, b in zip(losses_a, losses_b))
    res["resume_weight_diff"] = max_gap(weights_a, weights_b)
    res["resume_share"] = l2_gap(weights_a, weights_b) / motion  # share of the steps' motion
    res["resume_controls"] = {name: l2_gap(weights_a, w) / motion for name, (_, w) in runs.items()}
    res["resume_tolerance"] = f"loss {loss_tol:.2g}, weights {100 * allowed:.3g}% = " + (
        "exact (fp32 CPU)" if exact else f"max(5%, 2 x the floor {100 * res['resume_floor']:.1f}%)"
    )
    controls_fail = all(share > allowed for share in res["resume_controls"].values())
    res["resume_ok"] = (
        res["resume_loss_diff"] <= loss_tol and res["resume_share"] <= allowed and controls_fail and res["resume_floor"] <= 0.2
    )  # fmt: skip
    controls = ", ".join(f"{k} {100 * v:.3g}%" for k, v in res["resume_controls"].items())
    log(f"resume: {resumed} steps after loading {checkpoint.name} vs the uninterrupted run: max loss diff "
        f"{res['resume_loss_diff']:.3g}, weights apart by {100 * res['resume_share']:.3g}% of the steps' motion "
        f"(L2; max element {res['resume_weight_diff']:.3g}); two uninterrupted runs {100 * res['resume_floor']:.3g}%; "
        f"tolerance {res['resume_tolerance']}; controls that must fail: {controls}"
        f"{'' if controls_fail else ' (one passed: the check cannot tell)'}: {'PASS' if res['resume_ok'] else 'FAIL'}")  # fmt: skip


def snapshot(model, optimizers, schedulers) -> tuple:
    import copy

    from recipe.checkpoint import plain_model

    weights = {k: v.detach().clone() for k, v in plain_model(model).state_dict().items()}
    return weights, [copy.deepcopy(o.state_dict()) for o in optimizers], [s.state_dict() for s in schedulers]


def restore(model, optimizers, schedulers, state: tuple) -> None:
    from recipe.checkpoint import plain_model

    weights, optimizer_states, scheduler_states = state
    plain_model(model).load_state_dict(weights)
    for o, st in zip(optimizers, optimizer_states):
        o.load_state_dict(st)
    for s, st in zip(schedulers, scheduler_states):
        s.load_state_dict(st)


def lose_optimizer_state(optimizers, schedulers) -> None:
    for o in optimizers:
        o.optimizer.state.clear()


def restart_schedule(optimizers, schedulers) -> None:
    for s in schedulers:
        s.scheduler.last_epoch = -1
        s.scheduler.step()  # as at construction: back to the first warm-up step


def resumed_runs(cfg, checkpoint: Path, batches: Batches, steps: range, seed: int, res: dict) -> dict:
    """A fresh accelerator and a differently seeded model load `checkpoint` (so every weight must come from
    it) and take `steps`; then, on the same objects, the checkpoint is loaded again and spoiled before the
    steps, once per control. {name: (losses, weights on the CPU)}."""
    import warnings

    import torch

    from recipe.run_setup import make_accelerator

    accelerator = make_accelerator(cfg)
    model, optimizers, schedulers = build(cfg, accelerator, seed)
    runs = {}
    for name, spoil in (("resume", None), ("optimizer state lost", lose_optimizer_state),
                        ("schedule restarted", restart_schedule)):  # fmt: skip
        _, load_s = timed(lambda: accelerator.load_state(str(checkpoint / "training_state")), accelerator.device)  # fmt: skip
        res.setdefault("load_s", load_s)
        accelerator.step = 0
        if spoil is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                spoil(optimizers, schedulers)
        out = train_steps(model, optimizers, schedulers, batches, steps, cfg.max_grad_norm, accelerator)
        runs[name] = [x.item() for x in out], cpu_weights(model)
    accelerator.free_memory()
    del model, optimizers, schedulers
    if accelerator.device.type == "cuda":
        torch.cuda.empty_cache()
    return runs


def _precision(cfg) -> str:
    return "fp32" if cfg.mixed_precision == "no" else cfg.mixed_precision


def _plain(model):
    from recipe.checkpoint import plain_model

    return plain_model(model)


# ----------------------------------------------------------------------------- several processes (workers)


def worker(args: argparse.Namespace) -> None:
    """One process of `--worker ddp|fsdp` (under accelerate launch) or `fsdp-cpu` (under torchrun): a few
    steps, then the export, checked on the main process. Prints one RESULT line there."""
    import torch

    from recipe.checkpoint import save_checkpoint, save_model_folder
    from recipe.run_setup import show_progress_messages

    show_progress_messages(False)
    out = Path(args.output_dir) / args.worker
    _, _, _, steps = args.steps_plan
    warmup = min(2, steps - 1)
    cfg = run_config(args, steps, out)
    if args.worker == "fsdp-cpu":
        accelerator, rank, world, device = None, *_shard_on_cpu_mesh(cfg)
        model, optimizers, schedulers = _fully_sharded(cfg)
    else:
        from recipe.run_setup import make_accelerator

        accelerator = make_accelerator(cfg)
        rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
        model, optimizers, schedulers = build(cfg, accelerator, cfg.seed)
    is_main = rank == 0
    batches = Batches(cfg, 4, cfg.seed + rank, device)
    if accelerator is not None:
        res = throughput(cfg, accelerator, model, optimizers, schedulers, batches, steps, warmup)
    else:
        losses, seconds = timed(lambda: train_steps(model, optimizers, schedulers, batches, range(steps), cfg.max_grad_norm), device)  # fmt: skip
        losses = [x.item() for x in losses]
        res = {"tokens_per_second": steps * batches.tokens_per_batch * world / seconds, "loss_first": losses[0],
               "loss_last": losses[-1], "finite": all(x == x and abs(x) != float("inf") for x in losses)}  # fmt: skip
    res.update(mode=args.worker, processes=world, steps=steps)

    if args.worker == "ddp":  # a whole checkpoint, as train.py writes it (every rank calls)
        folder = save_checkpoint(accelerator, model, out, trainer_state(cfg, steps, world, 0.0), None, None)
        saved = _plain(model) if is_main else None
    else:  # the FSDP2 export: a full state dict gathered from the shards (a collective), saved by rank 0
        folder = out / "export"
        saved = save_model_folder(model, folder, None, is_main)
        res["live_vs_export"] = _live_vs_export(model, folder, cfg, is_main)
    if is_main:
        res["export_diff"] = export_check(folder, saved)
        res["folder"] = str(folder)
        print(RESULT + json.dumps(res), flush=True)
    if accelerator is not None:
        accelerator.wait_for_everyone()
        accelerator.end_training()
    else:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def _shard_on_cpu_mesh(cfg):
    """The CPU rehearsal of FSDP: accelerate selects FSDP only on GPUs, so shard with torch's `fully_shard`
    on a gloo mesh (HF_NOTES section 12)."""
    import torch
    import torch.distributed as dist

    from recipe.run_setup import default_threads

    dist.init_process_group("gloo")
    torch.set_num_threads(cfg.num_threads or default_threads())
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


def _fully_sharded(cfg):
    """Each GPTBlock, then the root (embeddings, tied head, final norm), as configs/accelerate/fsdp.yaml wraps."""
    import torch.distributed as dist
    from accelerate.utils import set_seed
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from recipe.optim import build_optimizers, make_schedule
    from recipe.run_setup import build_model

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    set_seed(cfg.seed)
    model = build_model(cfg, SyntheticTokenizer(cfg.vocab_size))
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizers = build_optimizers(model, cfg, "cpu")
    return model, optimizers, [make_schedule(opt, cfg) for opt in optimizers]


def _live_vs_export(model, folder: Path, cfg, is_main: bool) -> float | None:
    """The sharded model's own logits against the exported folder's: a gather that mixed up shards would
    pass verify_export (which compares the gathered copy with its reload) but not this. Every rank runs
    the forward (FSDP gathers the weights); the main process compares. Relative to the largest logit,
    since under bf16 the live model computes in bf16 and the reload in fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = _plain(model)  # the FSDP module itself: a compiled wrapper would recompile for eval mode
    device = next(p for p in model.parameters()).device
    ids = torch.randint(
        0, cfg.vocab_size, (2, min(32, cfg.block_size)), generator=torch.Generator().manual_seed(0)
    )
    model.eval()
    with torch.no_grad():
        live = model(input_ids=ids.to(device)).logits.float().cpu()
    model.train()
    if not is_main:
        return None
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        ref = reloaded(input_ids=ids).logits.float()
    return ((live - ref).abs().max() / ref.abs().max().clamp(min=1e-6)).item()


# ----------------------------------------------------------------------------- launching the workers


def launch(mode: str, processes: int, args: argparse.Namespace, out: Path) -> dict:
    """Run `--worker mode` in `processes` processes; returns its RESULT (or {"error": ...}). The log is kept."""
    py = sys.executable
    script = [str(Path(__file__).resolve()), "--worker", mode, "--output_dir", str(out)]
    script += ["--dry-run"] if args.dry_run else []
    script += [] if args.compile is None else ["--compile" if args.compile else "--no-compile"]
    script += ["--config", args.config] if args.config else []
    script += ["--steps", str(args.steps_plan[3])] if args.multi_steps else []
    script += args.overrides
    if mode == "fsdp-cpu":
        cmd = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes), *script]
    else:
        port = ["--main_process_port", str(_free_port())]
        where = (
            ["--multi_gpu"]
            if mode == "ddp"
            else ["--config_file", str(ROOT / "configs/accelerate/fsdp.yaml")]
        )
        # The Accelerator takes its precision and compile settings from the run config; these quiet the launcher.
        precision = ["--mixed_precision", run_config(args, 1, out).mixed_precision, "--dynamo_backend", "no"]
        cmd = [py, "-m", "accelerate.commands.launch", *where, "--num_processes", str(processes),
               "--num_machines", "1", *precision, *port, *script]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "HF_HUB_OFFLINE": "1"}  # fmt: skip
    log_file = out / f"{mode}.log"
    out.mkdir(parents=True, exist_ok=True)
    log(f"{mode}: {processes} processes, {' '.join(cmd[1:5])} ... (log: {log_file})")
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
        output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        output = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        log_file.write_text(output)
        return {"error": f"timed out after {args.timeout} s (see {log_file})"}
    log_file.write_text(output)
    results = [json.loads(line[len(RESULT) :]) for line in output.splitlines() if line.startswith(RESULT)]
    if proc.returncode or not results:
        tail = "\n".join(output.strip().splitlines()[-25:])
        print(tail, flush=True)
        return {"error": f"exit code {proc.returncode} (see {log_file})"}
    return results[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the summary


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _mfu(s: dict) -> str:
    if s["peak_flops"] is None:  # recipe.metrics has no data-sheet figure for this GPU
        return "n/a (no peak FLOP/s known for this GPU: add it to GPU_PEAKS in recipe/metrics.py)"
    source = "measured CPU matmul peak" if s["device"] == "cpu" else f"{s.get('card')}, data sheet, dense"
    return f"{_pct(s['mfu'])} of {s['peak_flops'] / 1e12:,.4g} TFLOP/s ({source})"


def _gib(x: float | None) -> str:
    return "n/a (CPU)" if x is None else f"{x:.2f} GiB"


def summary(found: dict, single: dict, multi: dict, args: argparse.Namespace, wall: float) -> tuple[str, bool]:  # fmt: skip
    rows, ok, s = [], "error" not in single, single
    if "tokens_per_second" in s:
        rows += [
            ("model", f"{s['arch']}, {s['parameters'] / 1e6:.1f}M parameters, batch {s['batch']}, {s['precision']}, "
                      f"compile {s['compile']}, fused AdamW {s['fused_adamw']}"),
            (f"build + prepare; first step{' (compiles)' if s['compile'] else ''}; warm-up", f"{s['build_s']:.1f} s; {s['first_step_s']:.1f} s; {s['warmup_s']:.1f} s"),
            (f"tokens/s ({s['measured_steps']} steps after warm-up)", f"{s['tokens_per_second']:,.0f}"),
            ("MFU", _mfu(s)),
            ("peak memory (max_memory_allocated)", _gib(s["peak_memory_gib"])),
            ("loss on 16 repeated random batches", f"{s['loss_first']:.3f} -> {s['loss_last']:.3f}"),
        ]  # fmt: skip
    if "export_diff" in s:
        rows += [
            ("checkpoint save", f"{s['save_s']:.1f} s, {s['checkpoint_mb']:,.0f} MB"),
            (
                "export reload: max logit diff",
                f"{s['export_diff']:.3g} (tolerance {EXPORT_TOLERANCE:g}) PASS",
            ),
        ]
    if "resume_ok" in s:
        controls = ", ".join(f"{k} {100 * v:.3g}%" for k, v in s.get("resume_controls", {}).items())
        rows.append(("resume: max loss diff / weight gap (L2 share of the steps' motion; max element)",
                     f"{s['resume_loss_diff']:.3g} / {100 * s['resume_share']:.3g}%; {s['resume_weight_diff']:.3g}; "
                     f"two uninterrupted runs {100 * s.get('resume_floor', 0):.3g}% (tolerance {s['resume_tolerance']}); "
                     f"controls that must fail: {controls} {'PASS' if s['resume_ok'] else 'FAIL'}"))  # fmt: skip
        ok = ok and s["resume_ok"]
    if "error" in s:
        rows.append(("one device", f"FAIL: {s['error']}"))
    for mode, r in multi.items():
        name = {"ddp": "DDP", "fsdp": "FSDP2 (accelerate)", "fsdp-cpu": "FSDP2 (fully_shard, gloo)"}[mode]
        if "error" in r:
            rows.append((name, f"FAIL: {r['error']}"))
            ok = False
            continue
        good = r["finite"] and r.get("live_vs_export", 0.0) <= (1e-4 if args.dry_run else 0.05)
        live = (
            ""
            if "live_vs_export" not in r
            else f", sharded vs export logits {r['live_vs_export']:.2g} (relative)"
        )
        rows.append((f"{name} x {r['processes']}, {r['steps']} steps",
                     f"{r['tokens_per_second']:,.0f} tokens/s; export max logit diff {r['export_diff']:.3g}{live} "
                     f"{'PASS' if good else 'FAIL'}"))  # fmt: skip
        ok = ok and good
    rows.append(("wall time", f"{int(wall // 60)} min {wall % 60:.0f} s"))
    title = (
        "### gpu-check DRY RUN on CPU: a rehearsal, not a GPU figure (do not paste)"
        if args.dry_run
        else f"### {time.strftime('%Y-%m-%d')} | `make gpu-check` | {found['gpus']}"
    )
    versions = f"torch {found['torch']} (CUDA {found['cuda']}), transformers {found['transformers']}, accelerate {found['accelerate']}"  # fmt: skip
    lines = [title, "", versions + "; synthetic token ids", "", "| check | result |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines), ok


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Other --key value pairs override the run config.")  # fmt: skip
    p.add_argument(
        "--dry-run", action="store_true", help="rehearse on this CPU: tiny model, fp32, 2 gloo processes"
    )
    p.add_argument("--config", help="default: configs/gpt2-124m.yaml (dry run: configs/tiny.yaml)")
    p.add_argument("--steps", type=int, help=f"single-device steps incl. warm-up (default {GPU_STEPS[0]}; dry run {DRY_STEPS[0]})")  # fmt: skip
    p.add_argument("--resume-steps", type=int, help="steps repeated after the resume")
    p.add_argument("--multi-steps", type=int, help="steps under DDP and FSDP")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: the config's torch_compile")  # fmt: skip
    p.add_argument(
        "--processes", type=int, help="processes for DDP/FSDP (default: every GPU; dry run 2; 1: skip)"
    )
    p.add_argument("--output_dir", default=str(ROOT / "outputs/gpu-check"))
    p.add_argument("--summary", help="also write the summary table to this file")
    p.add_argument("--timeout", type=int, default=300, help="seconds for each multi-process launch")
    p.add_argument("--worker", choices=["ddp", "fsdp", "fsdp-cpu"], help=argparse.SUPPRESS)
    args, args.overrides = p.parse_known_args(argv)
    plan = DRY_STEPS if args.dry_run else GPU_STEPS
    if args.worker and args.steps:  # a worker's --steps is the parent's --multi-steps
        args.multi_steps = args.steps
    args.steps_plan = (
        args.steps or plan[0],
        min(plan[1], max(1, (args.steps or plan[0]) // 2)),
        args.resume_steps or plan[2],
        args.multi_steps or plan[3],
    )
    if args.steps_plan[0] < 2 or args.steps_plan[3] < 2:
        p.error("--steps and --multi-steps must be at least 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the Hub; never wait on it
    if args.worker:
        worker(args)
        return 0
    start = time.perf_counter()
    found = preflight(args.dry_run)
    import shutil

    import torch

    out = Path(args.output_dir)
    if out.exists():
        shutil.rmtree(out)  # our own folder: a stale checkpoint would be mistaken for this run's
    out.mkdir(parents=True)
    single: dict = {}
    try:
        single_device(args, out / "single", single)
    except Exception as err:  # noqa: BLE001  (report, then go on to the multi-process checks)
        import traceback

        traceback.print_exc()
        single["error"] = f"{type(err).__name__}: {err}"[:300]
        log(f"FAIL: one device: {single['error']}")
    processes = args.processes or (2 if args.dry_run else torch.cuda.device_count())
    multi = {}
    if processes >= 2:
        for mode in ("ddp", "fsdp-cpu" if args.dry_run else "fsdp"):
            multi[mode] = launch(mode, processes, args, out)
            r = multi[mode]
            log(f"{mode}: " + (f"FAIL: {r['error']}" if "error" in r else
                f"{r['tokens_per_second']:,.0f} tokens/s, export max logit diff {r['export_diff']:.3g}"))  # fmt: skip
    else:
        log(f"{processes} process(es): DDP and FSDP need 2 or more (skipped)")
    table, ok = summary(found, single, multi, args, time.perf_counter() - start)
    print("\n" + table + "\n", flush=True)
    if args.summary:
        Path(args.summary).write_text(table + "\n")
    log("all checks passed" if ok else "FAILED (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
