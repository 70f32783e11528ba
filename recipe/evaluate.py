"""Score any causal LM folder on the downstream suite (ten lm-evaluation-harness tasks, zero-shot, scored as
lm-eval scores them), beside chance and GPT-2 124M's published figures.

    python -m recipe.evaluate --model outputs/shakespeare [--tasks all] [--limit 500]   # or: make eval
    python -m recipe.evaluate --model outputs/shakespeare --tasks hellaswag,piqa
    accelerate launch -m recipe.evaluate --model outputs/gpt2-124m           # sharded over the processes

Our folders, their checkpoints, the stock exports of `recipe.export` and Hub models (where the Hub is
reachable) all load through `AutoModelForCausalLM`. `--limit N` scores the first N items of each task, as
`lm_eval --limit N` does. The tasks and their data: recipe/downstream/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from recipe.config import ConfigError, RunConfig
from recipe.downstream import data, report, scoring
from recipe.downstream.tasks import TASKS, resolve


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m recipe.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a model folder (e.g. outputs/shakespeare) or a Hub id")
    p.add_argument("--tasks", default="all", help=f"all, or a comma-separated list of: {', '.join(TASKS)}")
    p.add_argument("--limit", type=int, default=None, help="score only the first N items of each task")
    p.add_argument("--batch_size", type=int, default=32, help="sequences per forward (one per choice)")
    p.add_argument("--cache_dir", default=RunConfig.cache_dir, help="where the suite's data is cached")
    p.add_argument("--hellaswag_path", default=None, help="a local HellaSwag copy (datasets folder or jsonl)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on a GPU that has it, else the checkpoint's own (ours are float32)")  # fmt: skip
    p.add_argument("--trust_remote_code", action="store_true", help="run the folder's own modeling code")
    p.add_argument("--output", default=None, help="also write the results (and per-item scores) as JSON")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit <= 0:
        p.error(f"--limit must be positive, got {args.limit}")
    if args.batch_size <= 0:
        p.error(f"--batch_size must be positive, got {args.batch_size}")
    try:
        args.task_list = resolve(args.tasks)
    except ConfigError as err:
        p.error(f"--tasks: {err}")
    path = Path(args.model)
    if path.exists() and not (path / "config.json").is_file():
        p.error(f"--model: {args.model} is not a model folder (no config.json)")
    return args


def model_dtype(choice: str, device: torch.device):
    if choice != "auto":
        return getattr(torch, choice)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16  # the forwards are most of the time; log-probabilities stay fp32 (token_scores)
    return "auto"  # the checkpoint's own, as lm_eval's dtype=auto


def evaluate(args: argparse.Namespace) -> dict:
    from accelerate import PartialState

    import recipe  # noqa: F401  (registers our architecture with the Auto classes)

    state = PartialState()
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            args.model, trust_remote_code=args.trust_remote_code, dtype=model_dtype(args.dtype, state.device)
        )
    except (OSError, ValueError) as err:  # a missing folder, a bad Hub id, no network: one clear line
        raise SystemExit(f"error: cannot load a model from {args.model!r}: {err}") from None
    model.to(state.device).eval()
    max_length = data.context_length(model.config, tokenizer)
    with state.local_main_process_first():  # fetched once per machine
        splits = [data.load_split(t, args.cache_dir, args.hellaswag_path) for t in args.task_list]
    tasks = [
        data.encode_task(*pair, tokenizer, max_length, args.limit) for pair in zip(args.task_list, splits)
    ]
    results = scoring.score(model, tasks, args.batch_size, progress=True)
    metrics = report.metrics(tasks, results)
    if state.is_main_process:
        print(f"\n{report.table(metrics, args.model)}\n({state.num_processes} process(es), {model.dtype})")
        if args.output:
            per_item = {"logliks": {name: r["logliks"] for name, r in results.items()}}
            Path(args.output).write_text(json.dumps({"model": args.model, **metrics, **per_item}, indent=1))
    return metrics


def main(argv: list[str] | None = None) -> dict:
    try:
        return evaluate(parse_args(argv))
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
