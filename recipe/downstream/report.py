"""What a user reads: the keys (`eval_<task>_acc`, `eval_<task>_acc_norm`, `eval_<task>_items`,
`eval_suite_centered`, ...) that go to metrics.jsonl, the trackers, all_results.json and the model card, and
the table beside chance and GPT-2 124M's published figures.

`suite_centered`, the suite's one number: the mean over tasks of (score - chance) / (1 - chance), score =
acc_norm where lm-eval reports it, else acc; chance = the mean over items of 1 / their number of choices
(ARC has a few items with 3 or 5). 0 is chance everywhere, 1 a perfect score everywhere.
"""

from __future__ import annotations

from typing import Any

from recipe.downstream.data import EncodedTask
from recipe.downstream.tasks import TASKS
from recipe.metrics import markdown_table


def chance(encoded: EncodedTask) -> float:
    return sum(1 / len(item.sequences) for item in encoded.items) / len(encoded.items)


def metrics(tasks: list[EncodedTask], results: dict[str, dict[str, Any]], suite: bool = True) -> dict[str, float]:  # fmt: skip
    """The keys for each scored task, and `eval_suite_centered` over them when `suite` (not for the run's
    HellaSwag subset along the way)."""
    out: dict[str, float] = {}
    centered = []
    for encoded in tasks:
        name, result = encoded.task.name, results[encoded.task.name]
        score = "acc_norm" if encoded.task.acc_norm else "acc"
        out[f"eval_{name}_acc"] = result["acc"]
        if encoded.task.acc_norm:
            out[f"eval_{name}_acc_norm"] = result["acc_norm"]
        out[f"eval_{name}_items"] = result["items"]
        out[f"eval_{name}_stderr"] = result[f"{score}_stderr"]  # of the task's score
        out[f"eval_{name}_chance"] = p = chance(encoded)
        centered.append((result[score] - p) / (1 - p))
    if suite:
        out["eval_suite_centered"] = sum(centered) / len(centered)
    return out


def scored_tasks(results: dict[str, float]) -> list[str]:
    return [name for name in TASKS if f"eval_{name}_acc" in results]


def table(results: dict[str, float], name: str = "this model") -> str:
    """One row per task in `results` (metrics() keys): ours, the split scored, chance and GPT-2 124M."""
    rows = [(f"zero-shot ({name})", "split scored", "items", "acc", "acc_norm", "± (score)", "chance",
             "GPT-2 124M (published, split)")]  # fmt: skip
    for task_name in scored_tasks(results):
        task, get = TASKS[task_name], lambda key: results.get(f"eval_{task_name}_{key}")  # noqa: B023
        split = "validation" + (
            f" (lm-eval: test, {task.lm_eval_items:,})" if task.lm_eval_split == "test" else ""
        )
        gpt2 = "—"
        if task.gpt2:
            metric = "acc_norm" if "acc_norm" in task.gpt2 else "acc"
            gpt2 = f"{task.gpt2[metric]:.4f} {metric} ({task.gpt2_split})"
        norm = f"{get('acc_norm'):.4f}" if get("acc_norm") is not None else "—"
        rows.append((task_name, split, f"{get('items'):,}", f"{get('acc'):.4f}", norm, f"±{get('stderr'):.4f}",
                     f"{get('chance'):.4f}", gpt2))  # fmt: skip
    text = markdown_table(rows)
    if "eval_suite_centered" in results:
        text += (
            f"\n\nsuite_centered {results['eval_suite_centered']:.4f}: the mean over these tasks of (score - "
            "chance) / (1 - chance), score = acc_norm where lm-eval reports it, else acc (0 = chance)"
        )
    return text


def line(step: int, results: dict[str, float]) -> str:
    """The one printed line per downstream evaluation during training: HellaSwag, and the suite's number."""
    parts = []
    if "eval_hellaswag_acc" in results:
        parts.append(
            f"HellaSwag acc_norm {results['eval_hellaswag_acc_norm']:.4f}, acc {results['eval_hellaswag_acc']:.4f} "
            f"({results['eval_hellaswag_items']:,} items; GPT-2 124M {TASKS['hellaswag'].gpt2['acc_norm']:.4f}, "
            f"chance {results['eval_hellaswag_chance']:.2f})"
        )
    if "eval_suite_centered" in results:
        tasks = len(scored_tasks(results))
        parts.append(f"suite_centered {results['eval_suite_centered']:.4f} ({tasks} tasks)")
    return f"step {step}: " + "; ".join(parts)
