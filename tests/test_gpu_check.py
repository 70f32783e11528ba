"""`make gpu-check DRY_RUN=1`: the GPU check's CPU rehearsal passes (one device, DDP and FSDP2 on 2 gloo
processes) on a Python without `datasets` or matplotlib, as on the GPU machine; and a failed check fails."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_passes_without_datasets_or_matplotlib(tmp_path):
    # A sitecustomize that hides both packages from this process and every process it launches.
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        'import sys\nsys.modules["datasets"] = None\nsys.modules["matplotlib"] = None\n'
    )
    env = {**os.environ, "PYTHONPATH": str(hide), "HF_HUB_OFFLINE": "1"}
    # The short version (a few steps each); `make gpu-check DRY_RUN=1` runs the default plan.
    cmd = [sys.executable, str(ROOT / "recipe/bench/gpu_check.py"), "--dry-run", "--no-compile", "--steps", "6",
           "--resume-steps", "2", "--multi-steps", "3", "--mixed_precision", "bf16", "--output_dir", str(tmp_path / "out"),
           "--summary", str(tmp_path / "summary.md")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "gpu-check: all checks passed" in output
    table = (tmp_path / "summary.md").read_text()
    for row in ("| export reload: max logit diff | 0 ", "| resume: max loss diff / weight gap ",
                "= max(5%, 2 x the floor", "controls that must fail: optimizer state lost",
                "| DDP x 2, 3 steps |", "| FSDP2 (fully_shard, gloo) x 2, 3 steps |"):  # fmt: skip
        assert row in table, table
    assert "FAIL" not in table
    assert (tmp_path / "out/single/checkpoint-6/model.safetensors").is_file()


def test_a_failed_check_fails(monkeypatch):
    sys.path.insert(0, str(ROOT))
    from recipe.bench import gpu_check

    args = gpu_check.parse_args(["--dry-run"])
    found = {"gpus": "none", "torch": "x", "cuda": "none", "transformers": "x", "accelerate": "x"}
    table, ok = gpu_check.summary(found, {"error": "RuntimeError: boom"}, {}, args, 1.0)
    assert not ok and "| one device | FAIL: RuntimeError: boom |" in table
    resume = {
        "resume_ok": False,
        "resume_loss_diff": 0.1,
        "resume_weight_diff": 0.1,
        "resume_share": 1.0,
        "resume_tolerance": "x",
    }
    assert not gpu_check.summary(found, resume, {}, args, 1.0)[1]
    multi = {"ddp": {"error": "exit code 1"}}
    assert not gpu_check.summary(found, {}, multi, args, 1.0)[1]
    fsdp = {"fsdp-cpu": {"finite": True, "live_vs_export": 0.5, "processes": 2, "steps": 3,
                         "tokens_per_second": 1.0, "export_diff": 0.0}}  # fmt: skip
    assert "FAIL" in gpu_check.summary(found, {}, fsdp, args, 1.0)[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_no_gpu_says_so_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "recipe/bench/gpu_check.py"), "--output_dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stdout.strip().splitlines()[-1].startswith("gpu-check: FAIL: no CUDA GPU"), proc.stdout
