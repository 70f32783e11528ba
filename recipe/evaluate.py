"""Score any causal LM folder on HellaSwag (zero-shot, lm-evaluation-harness's scoring), beside GPT-2 124M.

    python -m recipe.evaluate --model outputs/shakespeare [--limit 500]      # or: make eval MODEL=...
    accelerate launch -m recipe.evaluate --model outputs/gpt2-124m           # sharded over the processes

Our folders, their checkpoints, the stock exports of `recipe.export` and Hub models (where the Hub is
reachable) all load through `AutoModelForCausalLM`. `--limit N` scores the first N items, as `lm_eval
--limit N` does. Where the data comes from: recipe/hellaswag.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from recipe import hellaswag
from recipe.config import ConfigError, RunConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m recipe.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a model folder (e.g. outputs/shakespeare) or a Hub id")
    p.add_argument("--limit", type=int, default=None, help="score only the first N items")
    p.add_argument("--batch_size", type=int, default=8, help="items per forward (x 4 endings)")
    p.add_argument("--cache_dir", default=RunConfig.cache_dir, help="where HellaSwag is cached")
    p.add_argument("--hellaswag_path", default=None, help="a local copy (datasets folder or jsonl) to score")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: the checkpoint's own (as lm_eval's dtype=auto; ours are float32)")  # fmt: skip
    p.add_argument("--trust_remote_code", action="store_true", help="run the folder's own modeling code")
    p.add_argument("--output", default=None, help="also write the results (and per-item scores) as JSON")
    args = p.parse_args(argv)
    if args.limit is not None and args.limit <= 0:
        p.error(f"--limit must be positive, got {args.limit}")
    if args.batch_size <= 0:
        p.error(f"--batch_size must be positive, got {args.batch_size}")
    path = Path(args.model)
    if path.exists() and not (path / "config.json").is_file():
        p.error(f"--model: {args.model} is not a model folder (no config.json)")
    return args


def evaluate(args: argparse.Namespace) -> dict:
    from accelerate import PartialState

    import recipe  # noqa: F401  (registers our architecture with the Auto classes)

    state = PartialState()
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            args.model, trust_remote_code=args.trust_remote_code, dtype=dtype
        )
    except (OSError, ValueError) as err:  # a missing folder, a bad Hub id, no network: one clear line
        raise SystemExit(f"error: cannot load a model from {args.model!r}: {err}") from None
    model.to(state.device).eval()
    with state.local_main_process_first():  # fetched once per machine
        dataset = hellaswag.load_hellaswag(args.cache_dir, args.hellaswag_path)
    if args.limit is not None:
        dataset = dataset.select(range(min(args.limit, len(dataset))))
    items = hellaswag.encode_items(dataset, tokenizer, hellaswag.context_length(model.config, tokenizer))
    # Our padded head's extra rows take no probability; a stock model is scored over all its logits, as lm-eval.
    vocab = hellaswag.scored_vocab(model, tokenizer)
    result = hellaswag.score(model, items, args.batch_size, progress=True, vocab_size=vocab)
    results = hellaswag.metrics(result)
    if state.is_main_process:
        stderr = f"standard error: acc_norm ±{result['acc_norm_stderr']:.4f}, acc ±{result['acc_stderr']:.4f}"
        where = f"{state.num_processes} process(es), {model.dtype}"
        print(f"\n{hellaswag.table(results, args.model)}\n({stderr}; {where})")
        if args.output:
            per_item = {"logliks": result["logliks"].tolist()}
            Path(args.output).write_text(json.dumps({"model": args.model, **results, **per_item}, indent=1))
    return results


def main(argv: list[str] | None = None) -> dict:
    try:
        return evaluate(parse_args(argv))
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
