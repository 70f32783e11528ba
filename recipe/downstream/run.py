"""The training run's calls: HellaSwag's fixed subset along the way (`hellaswag_steps`), and at the end every
item of HellaSwag (`hellaswag`) and of the suite's tasks (`downstream_tasks`), scored in one pass."""

from __future__ import annotations

from dataclasses import dataclass

from recipe.config import RunConfig
from recipe.downstream import data, report, scoring
from recipe.downstream.tasks import TASKS, resolve


@dataclass
class RunTasks:
    at_end: list[data.EncodedTask]  # scored whole at the last step
    hellaswag: data.EncodedTask | None  # its subset along the way, when hellaswag_steps


def downstream_items(cfg: RunConfig, accelerator, tokenizer, config) -> RunTasks | None:
    """The run's tasks, tokenised once, or None when there are none. Fetched once per node, before step 1,
    so a missing source stops the run before anything is written."""
    tasks = resolve(cfg.downstream_tasks) if cfg.downstream_tasks else []
    if cfg.hellaswag and TASKS["hellaswag"] not in tasks:
        tasks = [TASKS["hellaswag"], *tasks]
    if not tasks:
        return None
    max_length = data.context_length(config, tokenizer)
    with accelerator.local_main_process_first():
        splits = [data.load_split(t, cfg.cache_dir, cfg.hellaswag_path) for t in tasks]
    at_end = [data.encode_task(t, split, tokenizer, max_length) for t, split in zip(tasks, splits)]
    hellaswag = next((e for e in at_end if e.task.name == "hellaswag"), None) if cfg.hellaswag else None
    return RunTasks(at_end, hellaswag)


def downstream_due(cfg: RunConfig, step: int) -> bool:
    if step == cfg.max_steps:
        return True
    return bool(cfg.hellaswag and cfg.hellaswag_steps and step % cfg.hellaswag_steps == 0)


def score_downstream(model, tasks: RunTasks, cfg: RunConfig, final: bool) -> dict[str, float]:
    """The fixed HellaSwag subset along the way, every item of every task at the end (a compiled model runs
    eagerly: downstream.scoring)."""
    if final:
        results = scoring.score(model, tasks.at_end, cfg.downstream_batch_size)
        return report.metrics(tasks.at_end, results, suite=bool(cfg.downstream_tasks))
    items = data.evenly_spaced(tasks.hellaswag.items, cfg.hellaswag_items)
    subset = data.EncodedTask(tasks.hellaswag.task, items)
    return report.metrics([subset], scoring.score(model, [subset], cfg.downstream_batch_size), suite=False)
