"""Learning efficiency: held-out bits per byte against wall seconds, today's default and a few candidates.

    python -m recipe.bench.learning                                  # ~45 min on 2 CPU cores
    python -m recipe.bench.learning --baseline_steps 150 --candidates modern-muon   # a quick look

Every run is `recipe/train.py --config configs/shakespeare-gpt2.yaml` plus a candidate's overrides, so the
corpus, tokenizer, held-out text (Hamlet + The Tempest) and its byte count are the same for all. Runs go one
after another (never two at once on a small machine). The baseline runs `--baseline_steps` (450: today's
`make train`); every other candidate gets the step count that fills the same wall time, from seconds per step
measured in this process just before (a bare training step of each candidate, interleaved). The baseline runs
again at the end with another seed: the two give the run-to-run noise of both the time and the bpb.
Writes a markdown section (returned, printed, appended to BENCHMARKS.md) and the plot docs/learning.png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
BASELINE = "gpt2-adamw"
# name -> (label, overrides on the base config). Only features a stock architecture expresses (Qwen3 here).
CANDIDATES: dict[str, tuple[str, dict[str, Any]]] = {
    # Every candidate names its architecture and optimizer, so the labels hold whatever --config says.
    BASELINE: ("GPT-2 + AdamW (today's default)", {"architecture": "gpt2", "optim": "adamw"}),
    "gpt2-muon": ("GPT-2 + Muon", {"architecture": "gpt2", "optim": "muon"}),
    "modern-adamw": ("modern + AdamW", {"architecture": "modern", "optim": "adamw"}),
    "modern-muon": ("modern + Muon", {"architecture": "modern", "optim": "muon"}),
    "modern-muon-whole": (
        "modern + Muon, fused matrices whole",
        {"architecture": "modern", "optim": "muon", "muon_split_fused": False},
    ),
    "modern-muon-lr4e-3": (
        "modern + Muon, lr 4e-3",
        {"architecture": "modern", "optim": "muon", "learning_rate": 4e-3},
    ),
}
DEFAULT_CANDIDATES = "modern-adamw,modern-muon,modern-muon-lr4e-3"


def seconds_per_step(configs: dict[str, Any], rounds: int = 3, steps: int = 4) -> dict[str, float]:
    """Median CPU seconds of a bare training step (forward, backward, clip, every optimizer) per candidate on
    one thread, the candidates interleaved round by round. CPU time of one thread is what a step costs
    whatever else runs on the machine (wall time on a shared machine is not); only the ratios are used."""
    from recipe import GPTForCausalLM
    from recipe.config import TokenizerSize, gpt_config
    from recipe.optim import build_optimizers

    setups = {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        model = GPTForCausalLM(gpt_config(cfg, TokenizerSize(cfg.vocab_size))).train()
        x = torch.randint(0, cfg.vocab_size, (cfg.per_device_train_batch_size, cfg.block_size))
        setups[name] = (model, build_optimizers(model, cfg, "cpu"), x, cfg.max_grad_norm)

    def step(model, optimizers, x, clip) -> None:
        model(input_ids=x, labels=x).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {name: [] for name in setups}
    for setup in setups.values():
        step(*setup)  # warm-up: allocations, optimizer state
    for _ in range(rounds):
        for name, setup in setups.items():
            t = time.thread_time()
            for _ in range(steps):
                step(*setup)
            times[name].append((time.thread_time() - t) / steps)
    torch.set_num_threads(threads)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run_training(
    name: str,
    config: str,
    overrides: dict[str, Any],
    steps: int,
    out_root: Path,
    seed: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """One `train.py` run in a subprocess; its final results plus the evaluations along the way."""
    out = out_root / (name if seed is None else f"{name}-seed{seed}")
    extra = {"seed": seed} if seed is not None else {}
    if threads:
        extra["num_threads"] = threads
    args = {
        "output_dir": str(out),
        "overwrite_output_dir": "true",
        "report_to": "none",
        "sample_max_new_tokens": 0,
        "max_steps": steps,
        "eval_steps": max(1, math.ceil(steps / 6)),  # six points along the way, the last one the whole split
        "save_steps": 10**9,  # no checkpoints along the way: same for all, and not part of learning
        **overrides,
        **extra,
    }
    cmd = [sys.executable, str(ROOT / "recipe" / "train.py"), "--config", config]
    for key, value in args.items():
        cmd += [f"--{key}", str(value)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    print(f"[bench_learning] {name}: {steps} steps ...", file=sys.stderr, flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    results = json.loads((out / "all_results.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    runtime = results["train_runtime"]
    # Evaluations along the way score the first max_eval_batches of the held-out split; the last, all of it.
    # Their time is placed in proportion to the step (the loop runs at a steady pace).
    curve = [
        (runtime * r["step"] / steps, r["eval_bits_per_byte"])
        for r in rows
        if "eval_bits_per_byte" in r and r["step"] < steps
    ]
    print(
        f"[bench_learning] {name}: bpb {results['eval_bits_per_byte']:.4f} in {runtime:.0f} s "
        f"(wall {time.perf_counter() - t:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
    return {
        "name": name,
        "seed": seed,
        "steps": steps,
        "bpb": results["eval_bits_per_byte"],
        "seconds": runtime,
        "tokens": results["train_tokens"],
        "eval_bytes_per_token": results["eval_bytes_per_token"],
        "num_parameters": results["num_parameters"],
        "curve": curve,
    }


def plot(runs: list[dict[str, Any]], path: Path, cost: bool = False) -> None:
    """bpb against wall seconds; with `cost`, against steps x one-thread CPU seconds per step instead (for
    runs that overlapped, whose wall times do not compare)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for run in runs:
        label = CANDIDATES[run["name"]][0] + ("" if run["seed"] is None else f" (seed {run['seed']})")
        color = f"C{list(CANDIDATES).index(run['name'])}"
        end = run["cost_seconds"] if cost else run["seconds"]
        xs, ys = zip(*run["curve"]) if run["curve"] else ((), ())
        xs = [x * end / run["seconds"] for x in xs]
        style = "--" if run["seed"] is not None else "-"
        ax.plot(list(xs) + [end], list(ys) + [run["bpb"]], style, color=color, alpha=0.6)
        ax.plot(end, run["bpb"], "o", color=color, label=f"{label}: {run['bpb']:.3f}")
    ax.set(
        xlabel="training cost: steps x one-thread CPU s per step" if cost else "training wall time (s)",
        ylabel="held-out bits per byte",
        title="Learning per second: Hamlet + The Tempest, held out",
    )
    ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.text(
        0.01, 0.01, "line: first 16 held-out batches along the way; dot: the whole held-out split", fontsize=7
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_learning(args: argparse.Namespace) -> list[str]:
    from recipe.config import load_config

    names = [BASELINE] + [n for n in args.candidates.split(",") if n and n != BASELINE]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        raise SystemExit(f"unknown candidate(s) {unknown}; choose from {', '.join(CANDIDATES)}")
    configs = {n: load_config(["--config", args.config, *_flags(CANDIDATES[n][1])]) for n in names}
    started = time.perf_counter()
    pace = seconds_per_step(configs)
    steps = {n: max(1, round(args.baseline_steps * pace[BASELINE] / pace[n])) for n in names}
    print(f"[bench_learning] seconds per step {pace}, steps {steps}", file=sys.stderr, flush=True)

    out_root = Path(args.output_dir)
    jobs = [(n, args.config, CANDIDATES[n][1], steps[n], out_root, None, args.threads) for n in names]
    if args.repeat_baseline:
        jobs.append((BASELINE, args.config, {}, steps[BASELINE], out_root, args.repeat_seed, args.threads))
    # --parallel 1 (the default): one after another, so the wall times compare. More only where the machine
    # is shared anyway: the bpb of a step count does not depend on what else runs, the wall time does.
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        runs = list(pool.map(lambda job: run_training(*job), jobs))
    for run in runs:
        run["cost_seconds"] = run["steps"] * pace[run["name"]]
    (out_root / "learning.json").write_text(json.dumps(runs, indent=1))
    plot(runs, Path(args.plot), cost=args.parallel > 1)

    base = runs[0]
    lines = [
        f"## {datetime.date.today()} | learning efficiency | {platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}",
        "",
        f"`python -m recipe.bench.learning --baseline_steps {args.baseline_steps}` on `{Path(args.config).name}` "
        f"plus each candidate's overrides: one run after another; the baseline's {args.baseline_steps} steps "
        f"set the wall budget, the others' step counts fill it (CPU seconds of a bare one-thread step, measured "
        f"just before: "
        + ", ".join(f"{n} {pace[n]:.2f}" for n in names)
        + f"). Held-out bpb over the whole of Hamlet + The Tempest ({base['eval_bytes_per_token']:.4f} bytes per "
        f"token, the same for all). Plot: `{_shown(args.plot)}`.",
        "",
        "| candidate | overrides | steps | tokens | train s | held-out bpb | vs default |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        label = CANDIDATES[run["name"]][0] + ("" if run["seed"] is None else f", seed {run['seed']}")
        overrides = " ".join(f"`{k}: {v}`" for k, v in CANDIDATES[run["name"]][1].items()) or "(none)"
        lines.append(
            f"| {label} | {overrides} | {run['steps']} | {run['tokens']:,} | {run['seconds']:.0f} | "
            f"{run['bpb']:.4f} | {run['bpb'] - base['bpb']:+.4f} |"
        )
    if args.repeat_baseline:
        again = runs[-1]
        time_noise = abs(again["seconds"] - base["seconds"]) / base["seconds"]
        lines += [
            "",
            f"Run-to-run noise (the baseline twice, seeds {configs[BASELINE].seed} and {args.repeat_seed}, "
            "first and last): "
            f"bpb {abs(again['bpb'] - base['bpb']):.4f}, time {100 * time_noise:.1f}%.",
        ]
    if args.parallel > 1:
        lines += [
            "",
            f"Runs overlapped ({args.parallel} at a time, {args.threads or 'default'} thread(s) each) on a shared "
            "machine: their `train s` are not comparable; the budget is the one-thread CPU-time ratio above.",
        ]
    lines += ["", f"_Learning-efficiency section: {time.perf_counter() - started:.0f} s._", ""]
    return lines


def _shown(path: str) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _flags(overrides: dict[str, Any]) -> list[str]:
    return [item for k, v in overrides.items() for item in (f"--{k}", str(v))]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m recipe.bench.learning", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "shakespeare-gpt2.yaml"))
    p.add_argument(
        "--baseline_steps", type=int, default=450, help="steps of the baseline: sets the wall budget"
    )
    p.add_argument(
        "--candidates", default=DEFAULT_CANDIDATES, help=f"comma-separated, from {', '.join(CANDIDATES)}"
    )
    p.add_argument("--repeat_baseline", type=int, default=1, help="1: run the baseline again at the end")
    p.add_argument("--repeat_seed", type=int, default=43)
    p.add_argument("--parallel", type=int, default=1, help="runs at a time (1: one after another)")
    p.add_argument("--threads", type=int, default=None, help="num_threads of each run (default: train.py's)")
    p.add_argument("--output_dir", default=str(ROOT / "outputs" / "bench-learning"))
    p.add_argument("--plot", default=str(ROOT / "docs" / "learning.png"))
    p.add_argument(
        "--output", default=str(ROOT / "BENCHMARKS.md"), help="markdown file to append to ('' for none)"
    )
    return p


def main(argv: list[str] | None = None) -> list[str]:
    args = parser().parse_args(argv)
    lines = bench_learning(args)
    text = "\n".join(lines)
    print(text)
    if args.output:
        with open(args.output, "a") as f:
            f.write(text + "\n")
    return lines


if __name__ == "__main__":
    main()
