"""Replicas that cannot drift: two nodes on this machine (two torchrun launches meeting at one rendezvous),
Muon's Newton-Schulz shared by the launcher's nodes, and the check that every process holds the same weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from test_gpu_paths import descendants
from test_train import ENV, QUIET, ROOT, TINY, free_port

from recipe.optim import sharing_groups

# 6 steps, a save at 3 and 6: the hook (tests/views_differ.py, RECIPE_VIEW=drift) dumps every rank's weights
# at the first save and then moves rank 1's, which the check at step 6 must catch before that save.
DRIFT_RUN = ["--optim", "muon", "--max_steps", "6", "--save_steps", "3", "--eval_steps", "3", "--logging_steps",
             "3", "--max_eval_batches", "1", "--num_threads", "1", "--save_total_limit", "none"]  # fmt: skip


def test_processes_share_by_node_where_nodes_are_even_and_all_together_otherwise():
    assert sharing_groups(["a", "a", "b", "b"]) == [[0, 1], [2, 3]]
    assert sharing_groups(["a", "b", "a", "b"]) == [[0, 2], [1, 3]]  # ranks need not be consecutive
    assert sharing_groups(["a", "b"]) == [[0], [1]]  # alone on its node: does all of it itself
    assert sharing_groups(["a", "b", "b"]) == [[0, 1, 2]]  # 1 and 2: whole stacks against halves
    assert sharing_groups(["a", "a", "a"]) == [[0, 1, 2]]


def run_nodes(commands: list[list[str]], env: dict, logs: Path) -> list[tuple[int, str]]:
    """Start every node's launcher, wait for all; (exit code, output) of each. A launcher whose workers have
    all ended once another launcher exited waits in torchrun's exit barrier for that one (300 s): stopped."""
    files = [open(logs / f"node{i}.log", "w") for i in range(len(commands))]
    procs = [subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
             for cmd, f in zip(commands, files)]  # fmt: skip
    try:
        deadline = time.time() + 600
        while any(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(1)
            if any(p.poll() is not None for p in procs):
                for p in procs:
                    if p.poll() is None and not descendants(p.pid):
                        p.send_signal(signal.SIGTERM)
    finally:
        for p in procs:
            if p.poll() is None:
                for pid in [*descendants(p.pid), p.pid]:
                    os.kill(pid, signal.SIGKILL)
            p.wait()
        for f in files:
            f.close()
    return [(p.returncode, (logs / f"node{i}.log").read_text()) for i, p in enumerate(procs)]


def test_muon_replicas_on_two_unequal_nodes_stay_identical_and_a_drift_ends_the_run(tmp_path):
    """Nodes of 1 and 2 processes, told apart by the launcher (one host name): the Newton-Schulz is shared by
    all 3 processes, every rank's weights are bit-identical after 3 steps, and rank 1's weights moved on
    purpose end the run at the next check in one line naming the step, before that step is saved."""
    from recipe.config import load_config
    from recipe.data import prepare_data

    out, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    prepare_data(load_config(["--config", TINY]))  # the cache both nodes read (on one disk: prepared once)
    endpoint = f"localhost:{free_port()}"
    commands = [
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", str(n),
         "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, str(ROOT / "tests" / "views_differ.py"),
         "--config", TINY, "--output_dir", str(out), *QUIET, *DRIFT_RUN]
        for n in (1, 2)
    ]  # fmt: skip
    env = {**ENV, "RECIPE_VIEW": "drift", "RECIPE_DUMP": str(dump)}
    results = run_nodes(commands, env, tmp_path)
    output = "\n".join(text for _, text in results)

    assert "the nodes run 1 and 2 processes; the Newton-Schulz is shared by all 3 processes" in output, (
        output[-4000:]
    )
    ranks = [torch.load(dump / f"rank{r}.pt") for r in range(3)]
    saved = load_file(str(out / "checkpoint-3" / "model.safetensors"))
    for name, value in ranks[0].items():
        for r in (1, 2):
            assert torch.equal(ranks[r][name], value), (name, r)
        if name in saved:  # rank 0's copy is what was saved
            assert torch.equal(saved[name], value), name
    assert (
        "The processes' weights differ at step 6: process(es) [1] hold other weights than process 0" in output
    )
    assert any(code != 0 for code, _ in results), output[-4000:]
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-3"]
    assert not (out / "model.safetensors").exists()
