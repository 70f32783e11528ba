"""The downstream suite's speed beside lm-evaluation-harness's own run of the same tasks on the same model.

    python -m recipe.bench.downstream --model outputs/shakespeare --limit 500

Both score the same first `--limit` items of every task from the same local data, zero-shot: ours through
`recipe.downstream`, lm-eval (a dev dependency) through its own task yamls and utils pointed at that data
(`lm_eval_tasks`, which tests/test_downstream.py uses too) and its HFLM on the model object. Prints seconds,
items/s and the two suite tables' largest disagreement. One process, the machine's threads.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

# lm-eval's yaml for each task, under lm_eval/tasks/
LM_EVAL_YAML = {"hellaswag": "hellaswag/hellaswag.yaml", "arc_easy": "arc/arc_easy.yaml",
                "arc_challenge": "arc/arc_challenge.yaml", "piqa": "piqa/piqa.yaml",
                "winogrande": "winogrande/default.yaml", "copa": "super_glue/copa/default.yaml",
                "openbookqa": "openbookqa/openbookqa.yaml", "sciq": "sciq/sciq.yaml",
                "commonsense_qa": "commonsense_qa/default.yaml", "social_iqa": "siqa/siqa.yaml"}  # fmt: skip


def lm_eval_tasks(splits: dict[str, Any], folder: Path) -> list[dict[str, Any]]:
    """lm-eval's own task configs (its yaml, its `!function` utils resolved), each pointed at `splits[name]`
    written as jsonl under `folder`, scoring that file as its validation split; named `parity_<task>` so
    they never meet lm-eval's own registrations."""
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    configs = []
    for name, split in splits.items():
        path = folder / f"{name}.jsonl"
        split.to_json(str(path))
        config = load_yaml(Path(lm_eval.__file__).parent / "tasks" / LM_EVAL_YAML[name])
        config.pop("tag", None)
        config.update(task=f"parity_{name}", dataset_path="json", dataset_name=None, training_split=None,
                      dataset_kwargs={"data_files": {"validation": str(path)}}, validation_split="validation",
                      test_split=None)  # fmt: skip
        configs.append(config)
    return configs


def run_lm_eval(model, tokenizer, configs: list[dict[str, Any]], batch_size: int) -> dict[str, Any]:
    """lm-eval's simple_evaluate on a model object, with only the given task configs indexed."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    return simple_evaluate(model=lm, tasks=configs, task_manager=TaskManager(include_defaults=False), log_samples=True)  # fmt: skip


def fits(task, doc: dict[str, Any], tokenizer, max_length: int) -> bool:
    from recipe.downstream.data import encode

    return all(encode(tokenizer, c, k, 10**9)[1] <= max_length for c, k in task.question(doc).pairs)


def main(argv: list[str] | None = None) -> None:
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import recipe  # noqa: F401  (registers our architecture)
    from recipe.config import RunConfig
    from recipe.downstream import data, report, scoring
    from recipe.downstream.tasks import TASKS

    p = argparse.ArgumentParser(prog="python -m recipe.bench.downstream", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="outputs/shakespeare")
    p.add_argument("--limit", type=int, default=500)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--cache_dir", default=RunConfig.cache_dir)
    args = p.parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    splits = {n: data.load_split(t, args.cache_dir) for n, t in TASKS.items()}
    splits = {n: s.select(range(min(args.limit, len(s)))) for n, s in splits.items()}
    max_length = data.context_length(model.config, tokenizer)
    # lm-eval's HFLM asserts on a continuation longer than the model's context (ours keeps its last tokens,
    # as lm-eval keeps the input's): such items leave both runs.
    splits = {
        n: s.filter(lambda doc, n=n: fits(TASKS[n], doc, tokenizer, max_length)) for n, s in splits.items()
    }
    items = sum(len(s) for s in splits.values())

    start = time.perf_counter()
    encoded = [data.encode_task(TASKS[n], s, tokenizer, max_length) for n, s in splits.items()]
    ours = scoring.score(model, encoded, args.batch_size)
    ours_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        configs = lm_eval_tasks(splits, Path(tmp))
        start = time.perf_counter()
        with torch.no_grad():
            theirs = run_lm_eval(model, tokenizer, configs, args.batch_size)
        theirs_s = time.perf_counter() - start
    worst, differ = 0.0, []
    for name, task in TASKS.items():
        result = theirs["results"][f"parity_{name}"]
        for metric in ("acc", "acc_norm") if task.acc_norm else ("acc",):
            if ours[name][metric] != result[f"{metric},none"]:
                differ.append(f"{name} {metric}")
        samples = sorted(theirs["samples"][f"parity_{name}"], key=lambda s: s["doc_id"])
        for mine, sample in zip(ours[name]["logliks"], samples):
            worst = max(worst, *(abs(a - b) for a, (b, _) in zip(mine, sample["filtered_resps"])))
    print(report.table(report.metrics(encoded, ours), args.model))
    dropped = sum(min(args.limit, len(data.load_split(t, args.cache_dir))) for t in TASKS.values()) - items
    print(f"\n{items:,} items ({dropped} left out: a continuation longer than the context), {torch.get_num_threads()} threads")  # fmt: skip
    print(f"ours:    {ours_s:.1f} s ({items / ours_s:.1f} items/s, tokenisation included)")
    print(f"lm-eval: {theirs_s:.1f} s ({items / theirs_s:.1f} items/s, its task building and tokenisation included)")  # fmt: skip
    print(f"largest log-likelihood difference: {worst:.2e}; acc/acc_norm that differ: {differ or 'none'}")


if __name__ == "__main__":
    main()
