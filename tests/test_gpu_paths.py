"""The paths a GPU user takes first, run on this CPU: torch.compile (inductor), DDP (2 gloo processes under
`accelerate launch`), FSDP2 (`fully_shard` on a gloo mesh under torchrun), a stop signal reaching one rank
only, and resuming with another number of processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import ENV, TINY, free_port, launch, launch_command, max_weight_diff, weights

import recipe  # noqa: F401  (registers the model with the Auto classes: no remote code needed here)

COMPILED = ["--torch_compile", "true", "--max_steps", "6", "--save_steps", "3", "--eval_steps", "6",
            "--logging_steps", "3", "--save_total_limit", "none"]  # fmt: skip


def eval_loss_of_folder(folder: Path, overrides: list[str]) -> float:
    """The saved model's loss on the whole validation split, computed here from the folder alone."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from recipe.config import load_config
    from recipe.data import prepare_data
    from recipe.scoring import evaluate

    cfg = load_config(["--config", TINY, *overrides])
    data = prepare_data(cfg)
    model = AutoModelForCausalLM.from_pretrained(folder)
    loader = torch.utils.data.DataLoader(data.validation, batch_size=16)
    bytes_per_token = data.summary["validation"].bytes_per_token
    return evaluate(model, loader, Accelerator(cpu=True), bytes_per_token)["eval_loss"]


def assert_clean_export(folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    keys = list(weights(folder))
    assert keys and not [k for k in keys if k.startswith(("_orig_mod", "module"))], keys[:3]
    _, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info


def test_compiled_run_exports_the_trained_weights(tmp_path):
    out = tmp_path / "compiled"
    launch(out, *COMPILED)  # train.py itself checks the reload against the live model (logits within 1e-5)
    assert_clean_export(out)
    assert_clean_export(out / "checkpoint-3")
    results = json.loads((out / "all_results.json").read_text())
    assert eval_loss_of_folder(out, []) == pytest.approx(results["eval_loss"], abs=1e-4)


def test_compiled_two_process_run_resumes_exactly(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    launch(full, *COMPILED, processes=2)
    assert_clean_export(full)
    resumed.mkdir()
    subprocess.run(["cp", "-r", str(full / "checkpoint-3"), str(resumed)], check=True)
    launch(resumed, *COMPILED, "--resume_from_checkpoint", "latest", processes=2)
    assert max_weight_diff(resumed, full) < 1e-5
    a, b = (json.loads((d / "all_results.json").read_text()) for d in (full, resumed))
    assert a["eval_loss"] == pytest.approx(b["eval_loss"], abs=1e-5)


def test_fsdp_sharded_model_exports_a_folder_that_loads_anywhere(tmp_path):
    (tmp_path / "model").mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(Path(__file__).parent / "fsdp_export_script.py"), str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "rank 0 reached the end" in proc.stdout and "rank 1 reached the end" in proc.stdout
    assert "rank 1 scored HellaSwag items under FSDP2 + compile" in proc.stdout
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_gpt.GPTForCausalLM"
    assert sorted(p.name for p in (tmp_path / "model").glob("*.py")) == [
        "configuration_gpt.py",
        "modeling_gpt.py",
    ]
    script = (
        "import sys; sys.modules['recipe'] = None\n"
        "import torch; from safetensors.torch import load_file; from transformers import AutoModelForCausalLM\n"
        f"ref = load_file({str(tmp_path / 'reference.safetensors')!r})\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'model')!r}, trust_remote_code=True).eval()\n"
        "diff = (model(ref['ids']).logits - ref['logits']).abs().max().item()\n"
        "assert diff < 1e-5, diff; print(type(model).__module__)\n"
    )
    env = {**ENV, "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    check = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
    assert check.returncode == 0, check.stderr[-3000:]
    assert "transformers_modules" in check.stdout


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, from /proc (torch's launcher starts each worker in a session of its own)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError, IndexError):
            continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the training processes under a launcher."""
    found = {}
    for pid in descendants(launcher_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = dict(
                kv.split(b"=", 1)
                for kv in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                if b"=" in kv
            )
        except OSError:
            continue
        if any(arg.endswith(b"train.py") for arg in cmdline) and b"RANK" in environ:
            found[int(environ[b"RANK"])] = pid
    return found


# A constant learning rate, so a run stopped at any step and one planned to end there take the same steps.
CONSTANT = ["--warmup_steps", "0", "--min_lr_ratio", "1", "--eval_steps", "100000", "--save_steps", "100000"]


def test_a_stop_signal_reaching_one_rank_stops_every_rank_cleanly(tmp_path):
    out = tmp_path / "stopped"
    cmd = launch_command(out, *CONSTANT, "--max_steps", "100000", "--logging_steps", "50", processes=2)
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 300
        pids = {}
        while len(pids) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
            pids = worker_pids(proc.pid)
        while not (out / "run_config.yaml").exists() and time.time() < deadline:
            time.sleep(0.5)
        time.sleep(3)  # a few steps in
        os.kill(pids[1], signal.SIGTERM)  # rank 1 only: rank 0 never sees a signal
        stdout, stderr = proc.communicate(timeout=180)  # a hang fails here instead of blocking the suite
    finally:
        if proc.poll() is None:
            for pid in [*worker_pids(proc.pid).values(), proc.pid]:
                os.kill(pid, signal.SIGKILL)
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and not list(out.glob("tmp-checkpoint-*")), stdout[-2000:] + stderr[-3000:]
    assert "Stopped by signal" in stdout + stderr
    stopped_at = json.loads((checkpoints[0] / "trainer_state.json").read_text())["global_step"]

    launch(
        out, *CONSTANT, "--max_steps", str(stopped_at + 3), "--resume_from_checkpoint", "latest",
        "--resume_new_schedule", "true", processes=2,
    )  # fmt: skip
    launch(tmp_path / "straight", *CONSTANT, "--max_steps", str(stopped_at + 3), processes=2)
    assert max_weight_diff(out, tmp_path / "straight") < 1e-5


def test_resuming_with_more_processes_keeps_the_global_batch(tmp_path):
    common = ["--max_steps", "6", "--per_device_train_batch_size", "4", "--eval_steps", "6", "--save_steps", "3",
              "--logging_steps", "1", "--save_total_limit", "none"]  # fmt: skip
    one = tmp_path / "one"
    launch(one, *common, "--gradient_accumulation_steps", "2")
    two = tmp_path / "two"
    two.mkdir()
    subprocess.run(["cp", "-r", str(one / "checkpoint-3"), str(two)], check=True)
    proc = launch(
        two, *common, "--gradient_accumulation_steps", "2", "--resume_from_checkpoint", "latest", processes=2
    )
    assert "gradient_accumulation_steps 2 -> 1" in proc.stdout + proc.stderr
    assert max_weight_diff(one, two) < 1e-4
    rows = {d: [json.loads(r) for r in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)}
    lrs = {d: [r["lr"] for r in rows[d] if "lr" in r] for d in rows}
    assert len(lrs[one]) == 6 and lrs[one][3:] == pytest.approx(lrs[two], rel=1e-6)  # the same schedule

    # 1 process x 1 micro-batch cannot be split over 2 processes: refused, naming both counts.
    odd = tmp_path / "odd"
    odd.mkdir()
    subprocess.run(["cp", "-r", str(one / "checkpoint-3"), str(odd)], check=True)
    state = json.loads((odd / "checkpoint-3" / "trainer_state.json").read_text())
    (odd / "checkpoint-3" / "trainer_state.json").write_text(
        json.dumps({**state, "gradient_accumulation_steps": 1})
    )
    proc = launch(odd, *common, "--gradient_accumulation_steps", "1", "--resume_from_checkpoint", "latest",
                  processes=2, check=False)  # fmt: skip
    assert proc.returncode != 0
    # One line of ours; the launcher adds its own failure report (with a traceback of its own frames).
    assert (
        "error: resume_from_checkpoint" in proc.stderr
        and "written by 1 process(es), this run has 2" in proc.stderr
    )
    assert 'recipe/train.py", line' not in proc.stderr


def test_checkpoint_weights_equal_the_exported_ones(tmp_path):
    """The tied head is stored once, and a checkpoint's weights are the model's at that step."""
    out = tmp_path / "run"
    launch(out, "--max_steps", "4", "--save_steps", "4", "--eval_steps", "4")
    a, b = (
        load_file(str(out / "model.safetensors")),
        load_file(str(out / "checkpoint-4" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and "lm_head.weight" not in a
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_streamed_two_process_run_resumes_from_each_ranks_own_position(tmp_path):
    """The wiring end to end (the stream's own no-replay guarantees are tested in tests/test_stream.py)."""
    shards = tmp_path / "shards"
    shards.mkdir()
    words = "to be or not to be that is the question whether tis nobler in the mind to suffer".split()
    for shard in range(4):
        with (shards / f"part-{shard}.jsonl").open("w") as f:
            for doc in range(40):
                text = " ".join(words[(doc + i) % len(words)] for i in range(60 + doc))
                f.write(json.dumps({"text": f"Document {shard * 40 + doc}: {text}"}) + "\n")
    stream = ["--streaming", "true", "--train_files", str(shards / "*.jsonl"), "--validation_split_percentage", "10",
              "--cache_dir", str(tmp_path / "cache"), "--dataloader_num_workers", "2", "--eval_steps", "100",
              "--save_total_limit", "none"]  # fmt: skip
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    launch(first, *stream, "--max_steps", "4", "--save_steps", "2", processes=2)
    checkpoint = first / "checkpoint-2"
    assert all((checkpoint / "training_state" / f"rank_state_{r}.pt").is_file() for r in range(2))
    resumed.mkdir()
    subprocess.run(["cp", "-r", str(checkpoint), str(resumed)], check=True)
    proc = launch(resumed, *stream, "--max_steps", "4", "--save_steps", "100", "--resume_from_checkpoint", "latest",
                  processes=2)  # fmt: skip
    assert "Resumed from" in proc.stdout + proc.stderr
    assert json.loads((resumed / "all_results.json").read_text())["global_step"] == 4
    assert "streamed:" in (resumed / "README.md").read_text()
    # The stream went on with the blocks the uninterrupted run trained (its shuffle buffers were saved): the
    # same weights at the end.
    assert max_weight_diff(resumed, first) < 1e-6


def compiled_training_graphs(skip_logits: bool) -> tuple[list, list, tuple[int, int, int]]:
    """The graphs of train.py's training forward (`training_loss`, or a forward returning logits) on a model
    prepared as train.py prepares it (bf16 autocast, accelerate's fp32 outputs) and then compiled: what dynamo
    traced (its outputs are what the caller gets) and AOT autograd's forward graph (its outputs are those
    plus every tensor kept for the backward)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    from recipe import GPTConfig, GPTForCausalLM
    from recipe.train import training_loss

    torch._dynamo.reset()
    B, T, V = 2, 16, 512
    torch.manual_seed(0)
    model = GPTForCausalLM(GPTConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     max_position_embeddings=T)).train()  # fmt: skip
    AcceleratorState._reset_state(True)  # an Accelerator of another precision may exist in this process
    try:
        prepared = Accelerator(cpu=True, mixed_precision="bf16").prepare(model)
    finally:
        AcceleratorState._reset_state(True)  # the prepared forward keeps its autocast
    traced, forwards = [], []

    def keep_forward(gm, inputs):
        forwards.append(gm.graph)
        return make_boxed_func(gm.forward)

    aot = aot_autograd(fw_compiler=keep_forward, bw_compiler=lambda gm, _: make_boxed_func(gm.forward),
                       partition_fn=min_cut_rematerialization_partition)  # inductor's partitioner  # fmt: skip

    def backend(gm, inputs):
        traced.append(gm.graph)
        return aot(gm, inputs)

    compiled = torch.compile(prepared, backend=backend)
    ids = torch.randint(0, V, (B, T + 1))
    batch = {"input_ids": ids[:, :-1], "shift_labels": ids[:, 1:]}
    if skip_logits:
        loss = training_loss(compiled, batch, torch.tensor(B * T))
    else:
        loss = compiled(**batch, num_items_in_batch=torch.tensor(B * T)).loss
    loss.backward()
    return traced, forwards, (B, T, V)


def graph_outputs(graph) -> list:
    (output,) = graph.find_nodes(op="output")
    nodes = [n for n in torch.utils._pytree.tree_leaves(output.args) if hasattr(n, "meta")]
    return [n.meta["val"] if "val" in n.meta else n.meta["example_value"] for n in nodes]  # AOT / dynamo


def test_the_compiled_training_forward_returns_the_loss_alone_and_keeps_no_fp32_logits():
    """Issue 18.2: train.py's compiled forward hands back the loss only, and neither returns nor keeps for
    the backward any fp32 (B, T, V) tensor (the bf16 logits the backward needs are the only (B, T, V) one).
    The same harness finds both in a forward that returns logits, so it can tell."""
    traced, forwards, (B, T, V) = compiled_training_graphs(skip_logits=True)
    assert len(traced) == len(forwards) == 1
    assert [tuple(v.shape) for v in graph_outputs(traced[0])] == [()]  # the loss
    kept = [v for v in graph_outputs(forwards[0]) if v.numel() >= B * T * V]
    # The chunked head (issue 29) keeps no (B, T, V) tensor at all, not even the bf16 logits.
    assert [v.dtype for v in kept if v.dim() > 1 and v.shape[-1] == V] == []

    traced, forwards, _ = compiled_training_graphs(skip_logits=False)
    assert any(tuple(v.shape) == (B, T, V) and v.dtype == torch.float32 for v in graph_outputs(traced[0]))
    kept = [v for v in graph_outputs(forwards[0]) if v.numel() >= B * T * V and v.shape[-1] == V]
    assert any(v.dtype == torch.float32 for v in kept)
