"""The training loop, end to end: real `accelerate launch`, real data, real checkpoints, tiny model."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}
QUIET = ["--report_to", "none", "--sample_max_new_tokens", "0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(out: Path, *args: str, processes: int = 1) -> list[str]:
    """`accelerate launch` with `processes` CPU processes (gloo; `--cpu --num_processes 2` would start one)."""
    dist = ["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else ["--num_processes", "1"]
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "-q",
        *dist,
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]
    return [*launcher, str(ROOT / "recipe" / "train.py"), "--config", TINY, "--output_dir", str(out), *QUIET, *args]  # fmt: skip


def launch(out: Path, *args: str, processes: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(launch_command(out, *args, processes=processes), env=ENV, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(
            f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def metrics_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


# 20 steps, a checkpoint every 10 kept: the uninterrupted reference and the resumed run use the same settings.
# A 1,000-token BPE: the model's vocabulary is padded to 1,024 (pad_vocab_size_to_multiple_of 64).
FULL_RUN = ["--max_steps", "20", "--save_steps", "10", "--eval_steps", "10", "--logging_steps", "5",
            "--save_total_limit", "none", "--vocab_size", "1000"]  # fmt: skip


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, hellaswag_file) -> Path:
    """20 uninterrupted steps, keeping every checkpoint: the reference for resume, and the output checks.
    HellaSwag (the tests' 12 items) on 5 of them at step 10, on all at the end with COPA (the real split)."""
    out = tmp_path_factory.mktemp("full")
    hellaswag = ["--hellaswag", "true", "--hellaswag_steps", "10", "--hellaswag_items", "5", "--hellaswag_path", str(hellaswag_file),
                 "--downstream_tasks", "copa"]  # fmt: skip
    launch(out, *FULL_RUN, "--sample_max_new_tokens", "20", *hellaswag)
    return out


def test_loss_falls_on_tiny_data(full_run):
    rows = [json.loads(line) for line in (full_run / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in rows if "loss" in r]
    results = json.loads((full_run / "all_results.json").read_text())
    vocab = json.loads((full_run / "config.json").read_text())["vocab_size"]
    assert train[-1] < train[0] - 0.5, train
    assert results["eval_loss"] < math.log(vocab) - 0.5  # well below the random-guess baseline
    assert results["perplexity"] == pytest.approx(math.exp(results["eval_loss"]), rel=1e-6)
    # train_loss is the whole run's mean (Trainer's meaning), the last window's mean is labelled as such.
    assert results["train_loss"] == pytest.approx(sum(train) / len(train), rel=1e-9)  # windows of 5 steps
    assert (results["train_loss_last_window"], results["train_loss_last_window_steps"]) == (train[-1], 5)
    assert 0 < results["eval_bits_per_byte"] < results["eval_loss"] / math.log(2)  # > 1 byte per token


def test_output_folder_is_a_complete_hf_model(full_run):
    expected = [
        "config.json",
        "model.safetensors",
        "modeling_gpt.py",
        "configuration_gpt.py",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "README.md",
        "all_results.json",
        "metrics.jsonl",
        "loss.png",
        "lr.png",
        "run_config.yaml",
    ]
    missing = [f for f in expected if not (full_run / f).is_file()]
    assert not missing, missing
    config = json.loads((full_run / "config.json").read_text())
    assert "AutoModelForCausalLM" in config["auto_map"]
    results = json.loads((full_run / "all_results.json").read_text())
    for key in [
        "train_loss",
        "eval_loss",
        "perplexity",
        "eval_bits_per_byte",
        "train_tokens",
        "train_runtime",
        "train_tokens_per_second",
        "global_step",
    ]:
        assert key in results, key
    assert results["global_step"] == 20
    card = (full_run / "README.md").read_text()
    assert "bits per byte" in card and f"{results['eval_loss']:.4f}" in card


def test_hellaswag_along_the_way_the_suite_at_the_end_and_from_the_cli(full_run, hellaswag_file, capsys):
    from recipe import evaluate

    rows = [json.loads(line) for line in (full_run / "metrics.jsonl").read_text().splitlines()]
    scores = [r for r in rows if "eval_hellaswag_acc" in r]
    assert [(r["step"], r["eval_hellaswag_items"]) for r in scores] == [(10, 5), (20, 12)]
    assert "eval_suite_centered" not in scores[0] and scores[-1]["eval_copa_items"] == 100
    results = json.loads((full_run / "all_results.json").read_text())
    assert {k: results[k] for k in scores[-1] if k != "step"} == {
        k: v for k, v in scores[-1].items() if k != "step"
    }
    centered = [(results[f"eval_{t}_{s}"] - results[f"eval_{t}_chance"]) / (1 - results[f"eval_{t}_chance"])
                for t, s in (("hellaswag", "acc_norm"), ("copa", "acc"))]  # fmt: skip
    assert results["eval_suite_centered"] == pytest.approx(sum(centered) / 2)
    card = (full_run / "README.md").read_text()
    assert "copa" in card and "suite_centered" in card and f"{results['eval_copa_acc']:.4f}" in card
    for card in [full_run / "README.md", full_run / "checkpoint-10" / "README.md"]:
        text = card.read_text()
        assert "hellaswag" in text and "GPT-2 124M" in text and "0.3114" in text, card
    # The CLI scores the saved folder as the run scored its live model.
    cli = evaluate.main(["--model", str(full_run), "--tasks", "hellaswag,copa", "--hellaswag_path", str(hellaswag_file)])  # fmt: skip
    assert cli == {k: results[k] for k in cli}
    assert f"{results['eval_hellaswag_acc_norm']:.4f}" in capsys.readouterr().out
    limited = evaluate.main(["--model", str(full_run), "--tasks", "hellaswag", "--hellaswag_path", str(hellaswag_file), "--limit", "3"])  # fmt: skip
    assert limited["eval_hellaswag_items"] == 3


def test_the_whole_suite_on_a_10_step_model(full_run, tmp_path):
    """`recipe.evaluate --tasks all --limit 120 --output F` (issue 28's check): every task near chance, its
    item count, `eval_suite_centered` as defined, and each choice's log-likelihood in the file."""
    from recipe import evaluate
    from recipe.downstream.tasks import TASKS

    out = tmp_path / "suite.json"
    results = evaluate.main(["--model", str(full_run / "checkpoint-10"), "--tasks", "all", "--limit", "120", "--output", str(out)])  # fmt: skip
    written = json.loads(out.read_text())
    assert {k: written[k] for k in results} == results and set(written["logliks"]) == set(TASKS)
    centered = []
    for name, task in TASKS.items():
        n, p = results[f"eval_{name}_items"], results[f"eval_{name}_chance"]
        assert n == (100 if name == "copa" else 120) == len(written["logliks"][name])  # COPA has 100
        score = results[f"eval_{name}_acc_norm" if task.acc_norm else f"eval_{name}_acc"]
        assert abs(score - p) < 4 * math.sqrt(p * (1 - p) / n), name  # a 10-step model guesses
        centered.append((score - p) / (1 - p))
    assert results["eval_suite_centered"] == pytest.approx(sum(centered) / len(centered))


def test_the_padded_vocabulary_is_never_generated_but_always_scored(full_run, hellaswag_file, tmp_path):
    """Issue 18.3: 1,000 tokens -> a 1,024-row head whose 24 extra ids generate() (ours and the stock export)
    suppresses. Every evaluation scores over all of the head's rows, as lm-evaluation-harness does (issue 28
    reverses the choice to drop them): with their logits made huge, HellaSwag and the held-out loss move."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recipe import evaluate as evaluate_cli
    from recipe.export import export_model
    from recipe.scoring import evaluate

    tokenizer = AutoTokenizer.from_pretrained(full_run)
    model = AutoModelForCausalLM.from_pretrained(full_run).eval()
    assert len(tokenizer) == 1000 and model.config.vocab_size == 1024
    padding = list(range(1000, 1024))
    assert json.loads((full_run / "generation_config.json").read_text())["suppress_tokens"] == padding
    stock = export_model(model, tmp_path / "gpt2", tokenizer=tokenizer)
    assert (
        json.loads((tmp_path / "gpt2" / "generation_config.json").read_text())["suppress_tokens"] == padding
    )
    prompt = tokenizer("ROMEO:", return_tensors="pt").input_ids
    for m in (model, AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2")):
        out = m.generate(prompt, max_new_tokens=4, do_sample=True, output_scores=True, return_dict_in_generate=True)  # fmt: skip
        assert all(torch.isneginf(step[:, 1000:]).all() for step in out.scores), type(m).__name__
    del stock

    hellaswag = ["--tasks", "hellaswag", "--hellaswag_path", str(hellaswag_file)]
    evaluate_cli.main(["--model", str(full_run), *hellaswag, "--output", str(tmp_path / "a.json")])
    ids = torch.tensor(tokenizer("To be, or not to be, that is the question. " * 6).input_ids[:65])
    batch = [{"input_ids": ids[None, :-1], "shift_labels": ids[None, 1:]}]
    held_out = evaluate(model, batch, Accelerator(cpu=True), 1.0)
    with torch.no_grad():
        model.lm_head.weight[1000:] = 30 * torch.randn(24, model.config.hidden_size)  # huge padded logits
    model.save_pretrained(tmp_path / "loud")
    tokenizer.save_pretrained(tmp_path / "loud")
    evaluate_cli.main(["--model", str(tmp_path / "loud"), *hellaswag, "--output", str(tmp_path / "b.json")])
    logliks = [torch.tensor(json.loads((tmp_path / f).read_text())["logliks"]["hellaswag"]) for f in ("a.json", "b.json")]  # fmt: skip
    assert (logliks[1] - logliks[0]).abs().min() > 1  # every choice: the padded rows take probability
    # The held-out loss scores every row of the head, as the training loss and lm-evaluation-harness do: the
    # padded rows are trained down (they are never targets), and made loud they take probability.
    assert evaluate(model, batch, Accelerator(cpu=True), 1.0)["eval_loss"] > held_out["eval_loss"] + 1


def test_output_loads_with_pipeline_where_recipe_cannot_be_imported(full_run, tmp_path):
    script = (
        "import sys; sys.modules['recipe'] = None\n"  # any `import recipe` now fails
        "from transformers import pipeline\n"
        f"pipe = pipeline('text-generation', model={str(full_run)!r}, trust_remote_code=True, device='cpu')\n"
        "out = pipe('ROMEO:', max_new_tokens=8, do_sample=False)[0]['generated_text']\n"
        "assert out.startswith('ROMEO:') and len(out) > len('ROMEO:'), out\n"
        "print(type(pipe.model).__module__)\n"
    )
    env = {**ENV, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "transformers_modules" in proc.stdout


def test_resume_from_mid_run_checkpoint_gives_the_same_weights(full_run, tmp_path):
    # A run that "stopped" after step 10: its output_dir holds only checkpoint-10.
    out = tmp_path / "resumed"
    out.mkdir()
    subprocess.run(["cp", "-r", str(full_run / "checkpoint-10"), str(out)], check=True)
    launch(out, *FULL_RUN, "--resume_from_checkpoint", "latest")
    assert max_weight_diff(out, full_run) < 1e-6
    again = json.loads((out / "all_results.json").read_text())
    first = json.loads((full_run / "all_results.json").read_text())
    assert again["eval_loss"] == pytest.approx(first["eval_loss"], abs=1e-6)
    assert again["train_tokens"] == first["train_tokens"]
    assert again["train_loss"] == pytest.approx(first["train_loss"], rel=1e-6)  # the mean survives the resume


def test_two_processes_equal_one_process_with_accumulation(tmp_path, hellaswag_file):
    from recipe import evaluate

    common = [
        "--hellaswag",
        "true",
        "--downstream_batch_size",
        "20",  # 12 items x 4 endings: 3 batches, so one process scores a spare batch it drops
        "--hellaswag_path",
        str(hellaswag_file),
        "--max_steps",
        "6",
        "--per_device_train_batch_size",
        "4",
        "--eval_steps",
        "3",
        "--max_eval_batches",
        "3",  # along the way the first 3 x 16 blocks, at any process count (2 x ceil(3 / 2) batches before)
        "--save_steps",
        "100",
    ]
    launch(tmp_path / "two", *common, "--gradient_accumulation_steps", "1", processes=2)
    launch(tmp_path / "one", *common, "--gradient_accumulation_steps", "2", processes=1)
    assert max_weight_diff(tmp_path / "two", tmp_path / "one") < 1e-4
    two = json.loads((tmp_path / "two" / "all_results.json").read_text())
    one = json.loads((tmp_path / "one" / "all_results.json").read_text())
    assert two["eval_loss"] == pytest.approx(one["eval_loss"], abs=1e-4)
    assert two["train_tokens"] == one["train_tokens"]
    along = [[r for r in metrics_rows(tmp_path / run) if "eval_loss" in r] for run in ("two", "one")]
    assert [(r["step"], r["eval_blocks"], r["eval_whole"]) for r in along[0]] == [(3, 48, False), (6, two["eval_blocks"], True)]  # fmt: skip
    assert along[0][0]["eval_loss"] == pytest.approx(along[1][0]["eval_loss"], abs=1e-4)
    # HellaSwag sharded over 2 processes is exactly the 1-process score of the same weights.
    alone = evaluate.main(["--model", str(tmp_path / "two"), "--tasks", "hellaswag", "--hellaswag_path", str(hellaswag_file), "--batch_size", "20"])  # fmt: skip
    hellaswag = [k for k in two if k.startswith("eval_hellaswag")]
    assert {k: alone[k] for k in hellaswag} == {k: two[k] for k in hellaswag}


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_leaves_a_resumable_checkpoint(tmp_path, processes):
    out = tmp_path / "stopped"
    endless = [
        "--max_steps",
        "100000",
        "--save_steps",
        "100000",
        "--logging_steps",
        "1",
        "--eval_steps",
        "100000",
    ]
    if processes == 1:  # plain python: the exit status is ours
        cmd = [sys.executable, str(ROOT / "recipe" / "train.py"), "--config", TINY, "--output_dir", str(out),
               *QUIET, *endless]  # fmt: skip
    else:  # the launcher's process group gets the signal, as a cluster scheduler sends it
        cmd = launch_command(out, *endless, processes=processes)
    proc = subprocess.Popen(
        cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    if processes == 1:
        assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and not list(out.glob("tmp-checkpoint-*")), stderr[-2000:]
    assert all(
        (checkpoints[0] / "training_state" / f"random_states_{rank}.pkl").is_file()
        for rank in range(processes)
    )
    assert "--resume_from_checkpoint latest" in stdout + stderr
    stopped_at = json.loads((checkpoints[0] / "trainer_state.json").read_text())["global_step"]
    launch(out, "--max_steps", str(stopped_at + 2), "--save_steps", "100000", "--eval_steps", "100000",
           "--resume_from_checkpoint", "latest", "--resume_new_schedule", "true", processes=processes)  # fmt: skip
    assert json.loads((out / "all_results.json").read_text())["global_step"] == stopped_at + 2


def test_generate_cli_samples_and_rejects_bad_arguments(full_run):
    gen = [
        sys.executable,
        "-m",
        "recipe.generate",
        "--model",
        str(full_run),
        "--prompt",
        "Romeo.",
        "--max_new_tokens",
        "12",
        "--seed",
        "1",
    ]
    proc = subprocess.run(gen + ["--temperature", "0"], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("Romeo.") and len(proc.stdout) > len("Romeo.\n"), (
        proc.stdout
    )  # a tiny model may emit newlines
    proc = subprocess.run(
        gen + ["--num_return_sequences", "2", "--top_p", "0.9"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.count("--- sample") == 2, proc.stderr[-2000:]
    bad_model = ["--model", str(full_run / "checkpoint-10" / "..") + "/nope"]
    proc = subprocess.run(gen + bad_model, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "cannot load" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--top_p", "1.5"], "--top_p must be in (0, 1]"),
    ],
)
def test_generate_rejects_bad_sampling_arguments(bad, message, capsys):
    from recipe import generate

    with pytest.raises(SystemExit) as exit_info:  # argparse's error: usage and one line, exit status 2
        generate.main(["--model", "some/model", *bad])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_non_finite_loss_stops_the_run_and_names_the_step(tmp_path):
    proc = launch(
        tmp_path,
        "--learning_rate",
        "1e30",
        "--max_steps",
        "20",
        "--logging_steps",
        "1",
        "--save_steps",
        "100",
        "--eval_steps",
        "100",
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "The loss or the gradient norm became NaN or infinite at step" in proc.stdout + proc.stderr
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--push_to_hub", "true", "--hub_model_id", "someone/gpt"],
            "push_to_hub is true but the Hub is not usable",
        ),
        (["--learning_rat", "1e-3"], "unknown configuration key(s): 'learning_rat'"),
        (["--max_steps", "many"], "max_steps expects an integer"),
        (["--report_to", "wandb"], "wandb is not installed"),
        (["--train_files", "/nonexistent/*.txt"], "train_files"),
        (["--save_total_limit", "-1"], "save_total_limit must be a positive integer"),
        (["--hub_strategy", "sometimes"], "hub_strategy must be one of"),
        # found once the loaders are prepared: still before run_config.yaml is written
        (["--per_device_train_batch_size", "100000"], "is more than the"),
    ],
)
def test_bad_config_is_a_clear_error_not_a_traceback(tmp_path, args, message):
    (tmp_path / "notes.txt").write_text("the user's own file")
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "recipe" / "train.py"),
            "--config",
            TINY,
            "--output_dir",
            str(tmp_path),
            *QUIET,
            *args,
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # the output folder is left as it was


def test_resuming_a_checkpoint_of_another_shape_names_the_keys(full_run, tmp_path):
    out = tmp_path / "other"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "recipe" / "train.py"), "--config", TINY, "--output_dir", str(out), *QUIET,
         "--hidden_size", "128", "--resume_from_checkpoint", str(full_run / "checkpoint-10")],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "hidden_size (checkpoint 64, this run 128)" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()[-1]) > 0 and not out.exists()


def test_checkpoints_are_model_folders(full_run, tmp_path):
    """from_pretrained, pipeline, recipe.generate and recipe.export all work on a checkpoint."""
    from transformers import AutoModelForCausalLM, pipeline

    checkpoint = full_run / "checkpoint-10"
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert type(model).__name__ == "GPTForCausalLM"
    pipe = pipeline("text-generation", model=str(checkpoint), device="cpu")
    assert pipe("ROMEO:", max_new_tokens=4, do_sample=False)[0]["generated_text"].startswith("ROMEO:")
    for cmd in (
        ["-m", "recipe.generate", "--model", str(checkpoint), "--max_new_tokens", "4", "--temperature", "0"],
        [
            "-m",
            "recipe.export",
            "--model",
            str(checkpoint),
            "--to",
            "gpt2",
            "--output",
            str(tmp_path / "gpt2"),
        ],
    ):
        proc = subprocess.run([sys.executable, *cmd], env=ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "gpt2" / "model.safetensors").is_file()


def test_a_run_with_checkpoints_prints_no_library_warning(tmp_path):
    """pytest's own filters hide FutureWarning / DeprecationWarning: look at a real run with -W default."""
    proc = subprocess.run(
        [sys.executable, "-W", "default", str(ROOT / "recipe" / "train.py"), "--config", TINY, "--output_dir",
         str(tmp_path), "--max_steps", "4", "--save_steps", "2", "--eval_steps", "2", "--logging_steps", "2",
         "--sample_max_new_tokens", "5", "--gradient_checkpointing", "true"],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    noise = [line for line in (proc.stdout + proc.stderr).splitlines()
             if "Warning" in line or "warn(" in line or "Removed shared tensor" in line or "deprecated" in line]  # fmt: skip
    assert not noise, noise


def test_a_non_finite_gradient_norm_is_a_bad_step_like_a_non_finite_loss():
    """Checked on the device, read at the next agreement (before any save): the run stops naming the step."""
    from types import SimpleNamespace

    from recipe.metrics import Meter

    meter = Meter(SimpleNamespace(device=torch.device("cpu"), num_processes=1), 1.0, None)
    meter.loss_sum += 2.5
    meter.step_done(1, 64, torch.tensor(0.7))
    meter.step_done(2, 64, None)  # fp16 skipped the step: its inf norm is the scaler's business
    assert int(meter.first_bad_step) == -1
    meter.step_done(3, 64, torch.tensor(float("nan")))
    meter.step_done(4, 64, torch.tensor(float("inf")))
    assert int(meter.first_bad_step) == 3 and math.isfinite(float(meter.loss_sum))


def test_loss_png_plots_full_log_windows_only(tmp_path, monkeypatch):
    """A run whose max_steps is not a multiple of logging_steps ends on a short window (the default run: one
    step at 351): its mean is noisier than the curve's, so the plot leaves it out; the table keeps it."""
    from types import SimpleNamespace

    import matplotlib.axes

    from recipe.metrics import Meter
    from recipe.plots import plot_loss

    meter, rows = Meter(SimpleNamespace(device=torch.device("cpu"), num_processes=1), 1.0, None), []
    for step in range(1, 8):  # logging_steps 3, max_steps 7: windows of 3, 3 and 1 step
        meter.loss_sum += 10.0 - step
        meter.step_done(step, 64, torch.tensor(1.0))
        if step % 3 == 0 or step == 7:
            rows.append(meter.row(step, {"epoch": 0, "tokens_seen": 64 * step}, 1e-3, 1.0))
    assert [r["window_steps"] for r in rows] == [3, 3, 1]
    drawn, plot = {}, matplotlib.axes.Axes.plot

    def recording(ax, *args, **kwargs):
        drawn[kwargs.get("label")] = args
        return plot(ax, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording)
    plot_loss(rows, tmp_path / "loss.png")
    assert list(drawn["train"][0]) == [3, 6] and (tmp_path / "loss.png").is_file()


def test_the_prepared_loader_copies_to_the_device_without_blocking(tmp_path):
    from recipe.config import load_config
    from recipe.run_setup import make_accelerator

    accelerator = make_accelerator(load_config(["--config", TINY, "--output_dir", str(tmp_path), *QUIET]))
    loader = accelerator.prepare(torch.utils.data.DataLoader(list(range(8)), batch_size=2, pin_memory=False))
    assert accelerator.dataloader_config.non_blocking and loader._non_blocking


def test_a_resume_refuses_another_tokenizer_data_or_schedule_in_one_line(full_run, tmp_path):
    """Each compared with what checkpoint-10 recorded; the schedule may change on purpose, and then the new
    one is what runs."""
    from recipe.config import load_config
    from recipe.optim import schedule_curve
    from recipe.tokenizer import train_bpe

    def resume_with(name: str, *args: str, check: bool = False) -> subprocess.CompletedProcess:
        out = tmp_path / name
        out.mkdir()
        subprocess.run(["cp", "-r", str(full_run / "checkpoint-10"), str(out)], check=True)
        return launch(out, *FULL_RUN, "--resume_from_checkpoint", "latest", *args, check=check)

    # One launch changing all four: the one line names each (a refusal costs a launch; the suite is timed).
    other = tmp_path / "other-bpe"  # another byte-level BPE of the same size: the model would load
    train_bpe([(ROOT / "README.md").read_text()] * 3, 1000).save_pretrained(other)
    text = tmp_path / "other.jsonl"
    text.write_text(
        "".join(json.dumps({"text": f"Document {i}, not Shakespeare. " * 30}) + "\n" for i in range(40))
    )
    new = ["--max_steps", "30", "--learning_rate", "6e-3"]
    proc = resume_with("refused", "--tokenizer_name", str(other), "--train_files", str(text), "--weight_decay", "0.5", *new)  # fmt: skip
    message = proc.stderr.split("error:")[-1]
    assert proc.returncode != 0 and message.strip().count("\n") == 0, proc.stderr[-2000:]
    assert message.startswith(" resume_from_checkpoint: the tokenizer and the data and ")
    assert (
        "the schedule (max_steps 20 -> 30, learning_rate 0.003 -> 0.006; --resume_new_schedule true"
        in message
    )
    assert "the optimizer settings (weight_decay 0.1 -> 0.5" in message

    proc = resume_with("extended", *new, "--resume_new_schedule", "true", check=True)
    printed = (
        "Resuming with a new schedule (resume_new_schedule): max_steps 20 -> 30, learning_rate 0.003 -> 0.006"
    )
    assert printed in proc.stdout + proc.stderr
    # The logged rate at step s is the schedule's after s steps: from the checkpoint's step on, the new one's.
    lrs = {r["step"]: r["lr"] for r in metrics_rows(tmp_path / "extended") if "lr" in r}
    old, extended = (schedule_curve(load_config(["--config", TINY, *args]))[1] for args in ([], new))
    assert [lrs[s] for s in (15, 20, 25)] == pytest.approx([extended[s] for s in (15, 20, 25)], rel=1e-6)
    assert lrs[15] != pytest.approx(old[15], rel=1e-2)


@pytest.fixture(scope="module")
def two_process_checkpoint(tmp_path_factory) -> Path:
    """checkpoint-2 of a 2-process run."""
    out = tmp_path_factory.mktemp("two-processes")
    launch(out, "--max_steps", "2", "--save_steps", "2", "--eval_steps", "100", processes=2)
    return out / "checkpoint-2"


@pytest.mark.parametrize("view", ["phantom", "weights"])
def test_every_process_resumes_the_checkpoint_the_main_process_chose(two_process_checkpoint, tmp_path, view):
    """Two processes whose views differ (tests/views_differ.py): rank 1 lists a newer checkpoint rank 0 cannot
    see, which it must not load; or rank 1's weights differ after loading, which stops the run in one line."""
    out = tmp_path / "run"
    out.mkdir()
    subprocess.run(["cp", "-r", str(two_process_checkpoint), str(out)], check=True)
    command = launch_command(out, "--max_steps", "4", "--save_steps", "100", "--eval_steps", "100",
                             "--resume_from_checkpoint", "latest", "--resume_new_schedule", "true", processes=2)  # fmt: skip
    command[command.index(str(ROOT / "recipe" / "train.py"))] = str(ROOT / "tests" / "views_differ.py")
    proc = subprocess.run(
        command, env={**ENV, "RECIPE_VIEW": view}, capture_output=True, text=True, timeout=600
    )
    if view == "phantom":
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads((out / "all_results.json").read_text())["global_step"] == 4
    else:
        assert (
            proc.returncode != 0 and "process(es) [1] resumed another state than process 0" in proc.stderr
        ), proc.stderr[-3000:]


def test_the_data_is_compared_by_content_not_by_paths_or_mtimes(tmp_path):
    """The same documents in another place, written again (another node's copy, a corpus extracted again)
    are the same data; other text is not."""
    from datasets import Dataset

    from recipe.data import _content_fingerprint
    from recipe.tokens import SplitSummary

    texts = [f"Document {i}: words." for i in range(10)]
    summary = SplitSummary(10, sum(map(len, texts)), 0, 0, 0)
    a, b = (Dataset.from_dict({"text": texts}).map(lambda r: r, new_fingerprint=f) for f in ("here", "there"))
    assert a._fingerprint != b._fingerprint  # what datasets' cache keys on
    assert _content_fingerprint(a, summary) == _content_fingerprint(b, summary)
    changed = Dataset.from_dict({"text": texts[:-1] + ["Document 9: other words."]})
    assert _content_fingerprint(changed, summary) != _content_fingerprint(a, summary)


def test_the_training_loss_of_a_stock_model_and_of_ours_loaded_from_its_own_code(tiny_gpt, tmp_path):
    """model_name_or_path may be any causal LM: a stock one gets `labels` (it computes a loss only then) and
    the pre-shifted targets; ours, also as a folder's remote code, the loss-only forward. FLOPs count for all."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen3Config, Qwen3ForCausalLM
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from recipe.metrics import flops_per_token
    from recipe.train import training_loss

    torch.manual_seed(0)
    ids = torch.randint(0, 97, (2, 13))
    batch = {"input_ids": ids[:, :-1], "shift_labels": ids[:, 1:]}
    stock = [
        GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=97, n_positions=16, bos_token_id=0, eos_token_id=0)),
        Qwen3ForCausalLM(Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=8, vocab_size=97)),
    ]  # fmt: skip
    ours = tiny_gpt()
    ours.save_pretrained(tmp_path)
    # The folder's own copy of the code, as a process without recipe loads it with trust_remote_code.
    remote_class = get_class_from_dynamic_module("modeling_gpt.GPTForCausalLM", tmp_path)
    remote = remote_class.from_pretrained(tmp_path)
    assert type(remote).__module__.startswith("transformers_modules")  # not recipe's own class
    for model in [m.eval() for m in (*stock, ours, remote)]:  # no dropout
        logits = model(input_ids=batch["input_ids"]).logits
        expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["shift_labels"].flatten())
        seen: list[set] = []
        record = lambda m, args, kwargs, seen=seen: seen.append(set(kwargs))  # noqa: E731
        hook = model.register_forward_pre_hook(record, with_kwargs=True)
        loss = training_loss(model, batch, torch.tensor(24))
        hook.remove()
        torch.testing.assert_close(loss, expected, msg=type(model).__name__)
        assert ("skip_logits" in seen[0]) == (model not in stock) and ("labels" in seen[0]) == (
            model in stock
        )
        assert flops_per_token(model.config, 12) > 6 * 2 * 32 * 32
    gated, plain = flops_per_token(stock[1].config, 12), flops_per_token(GPT2Config(n_embd=32, n_layer=2, n_inner=64, vocab_size=97, bos_token_id=0, eos_token_id=0), 12)  # fmt: skip
    assert gated - plain == 6 * 2 * 32 * 64  # the SwiGLU's third matrix


# train.py with shutil.rmtree made to die (kill -9) halfway through deleting a checkpoint folder in output_dir:
# the folder's weights and card are gone, its trainer_state.json is still there.
CRASH_IN_RMTREE = """
import os, shutil, signal, sys
from pathlib import Path
out, real = Path(sys.argv[1]), shutil.rmtree
def rmtree(path, *args, **kwargs):
    path = Path(path)
    if path.parent == out and (path / "model.safetensors").is_file():
        for name in ("model.safetensors", "README.md", "modeling_gpt.py"):
            (path / name).unlink()
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, *args, **kwargs)
shutil.rmtree = rmtree
from recipe.train import cli
cli(sys.argv[2:])
"""


def test_a_kill_while_deleting_a_checkpoint_leaves_only_complete_ones_and_the_run_resumes(tmp_path):
    from recipe.checkpoint import STATE_FILE, list_checkpoints

    out = tmp_path / "run"
    steps = ["--save_steps", "2", "--save_total_limit", "1", "--eval_steps", "100", "--logging_steps", "2"]
    args = ["--config", TINY, "--output_dir", str(out), *QUIET, "--max_steps", "6", *steps]
    proc = subprocess.run([sys.executable, "-c", CRASH_IN_RMTREE, str(out), *args], env=ENV, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]  # killed rotating checkpoint-2 at step 4
    whole = ("model.safetensors", "README.md", "modeling_gpt.py", STATE_FILE)
    found = list_checkpoints(out)
    assert [p.name for p in found] == ["checkpoint-4"]
    assert all((p / name).is_file() for p in out.glob("checkpoint-*") for name in whole)

    resumed = launch(out, "--max_steps", "6", *steps, "--resume_from_checkpoint", "latest")
    said = resumed.stdout + resumed.stderr
    assert "removed the half-deleted checkpoint-2" in said
    assert "Resumed from" in said and "at step 4" in said
    assert json.loads((out / "all_results.json").read_text())["global_step"] == 6
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-6"]


def test_an_older_muon_checkpoint_is_refused_in_one_line_before_output_dir_changes(tmp_path):
    """A Muon checkpoint of an earlier recipe: one Muon param group (today's has one per row-block count,
    muon_split_fused) and no optimizer settings in trainer_state.json to compare. torch's load_state_dict
    raised a ValueError after run_config.yaml was rewritten; now one line, output_dir untouched."""
    from recipe.checkpoint import STATE_FILE

    out = tmp_path / "run"
    args = ["--optim", "muon", "--max_steps", "2", "--save_steps", "2", "--eval_steps", "100"]
    train = [sys.executable, str(ROOT / "recipe" / "train.py"), "--config", TINY, "--output_dir", str(out), *QUIET, *args]  # fmt: skip
    subprocess.run(train, env=ENV, check=True, capture_output=True, timeout=600)
    checkpoint = out / "checkpoint-2"
    saved = torch.load(checkpoint / "training_state" / "optimizer_1.bin", weights_only=True)
    groups = saved["param_groups"]
    assert len(groups) > 1  # today's layout
    old = {k: v for k, v in groups[0].items() if k != "split"}
    saved["param_groups"] = [{**old, "params": [i for g in groups for i in g["params"]]}]
    torch.save(saved, checkpoint / "training_state" / "optimizer_1.bin")
    state = json.loads((checkpoint / STATE_FILE).read_text())
    del state["optimizer"]
    (checkpoint / STATE_FILE).write_text(json.dumps(state))
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    proc = subprocess.run([*train, "--resume_from_checkpoint", "latest"], env=ENV, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "optimizer state holds parameter groups" in line and "--muon_split_fused false" in line, line
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


def test_main_reads_as_a_table_of_contents():
    """train.main() stays short enough to read as the run's table of contents (issue 27: at most 120 lines)."""
    import inspect

    from recipe import train

    assert len(inspect.getsource(train.main).splitlines()) <= 120
