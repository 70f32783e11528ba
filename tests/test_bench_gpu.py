"""`make bench-gpu DRY_RUN=1`: the GPU bench's CPU rehearsal builds and times every variant, profiles two of
them and runs recipe/train.py on real text, in one process as on a GPU; an unknown card gets tokens/s and no
MFU; a machine without a GPU or without `datasets` is told so in one line."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipe.bench import gpu as bench_gpu

ROOT = Path(__file__).resolve().parent.parent

WORDS = ("the of and to in that is was he for it with as his on be at by this had not are but from or have an "
         "they which one you were her all she there would their we him been has when who will more no if out").split()  # fmt: skip


def write_documents(folder: Path, n: int = 12) -> str:
    """`n` small text files (one document each): the held-out split needs several."""
    rng = random.Random(0)
    folder.mkdir()
    for i in range(n):
        lines = (" ".join(rng.choices(WORDS, k=12)).capitalize() + "." for _ in range(200))
        (folder / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")
    return str(folder / "*.txt")


def test_dry_run_times_every_variant_and_train_py(tmp_path):
    out, summary = tmp_path / "out", tmp_path / "summary.md"
    cmd = [sys.executable, str(ROOT / "recipe/bench/gpu.py"), "--dry-run", "--output_dir", str(out), "--extras", "--summary",
           str(summary), "--train_files", write_documents(tmp_path / "docs"), "--cache_dir", str(tmp_path / "cache")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240)  # offline: conftest
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    table = summary.read_text()
    assert "FAIL" not in table and "not available" not in table, table
    plan = bench_gpu.parse_args(["--dry-run"]).plan
    for v in bench_gpu.variants(plan, max_autotune=False, extras=True):  # every row, with a tokens/s
        row = next((line for line in table.splitlines() if line.startswith(f"| {v.label}")), None)
        assert row is not None and row.split("|")[3].strip()[0].isdigit(), (v.label, table)
    train_row = next(line for line in table.splitlines() if line.startswith("| recipe/train.py"))
    assert "bare step" in train_row and train_row.split("|")[3].strip()[0].isdigit(), train_row
    for goal, *_ in bench_gpu.GOALS:
        assert f"| {goal} |" in table
    res = json.loads((out / "bench_gpu.json").read_text())
    # train.py's model: the BPE trained on these documents (fewer merges than 512), padded to a multiple of 64
    assert res["train_py"]["steps"] == plan.train_steps and res["train_py"]["vocab_size"] % 64 == 0
    assert res["variants"]["today"]["vocab_size"] == 500 and res["variants"]["all-new"]["vocab_size"] == 512
    for key in ("today", "all-new"):  # the profile names the attention that ran
        assert res["profiles"][key]["top"] and res["profiles"][key]["attention"], res["profiles"][key]


def test_an_unknown_card_gets_tokens_per_second_and_no_mfu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    name, peak, source = bench_gpu.card(torch.device("cuda"))
    assert peak == 989e12 and "H100" in source  # a known card, named
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Imaginary X1")
    name, peak, source = bench_gpu.card(torch.device("cuda"))
    assert (name, peak) == ("NVIDIA Imaginary X1", None)
    assert bench_gpu.mfu(123_456.0, 1e9, peak) is None

    args = bench_gpu.parse_args([])
    row = {"label": "today's step: (a)-(c) off", "micro_batch": 16, "tokens_per_second": 123_456.0, "spread": 0.02,
           "mfu": bench_gpu.mfu(123_456.0, 1e9, peak), "peak_memory_gib": 14.6, "first_step_s": 20.0, "warmup_s": 21.0}  # fmt: skip
    res = {"card": name, "peak_flops": peak, "peak_source": source, "compile": True, "precision": "bf16",
           "shape": "12 layers x 768 hidden", "variants": {"today": row}, "profiles": {},
           "train_py": {"skipped": "no text"}}  # fmt: skip
    found = {"torch": "x", "cuda": "x", "transformers": "x", "accelerate": "x"}
    table = bench_gpu.summary(found, res, args, 60.0)
    assert "| today's step: (a)-(c) off | 16 | 123,456 (±1.0%) | 1.00x | n/a | 14.60 GiB |" in table, table
    assert "MFU n/a: no peak FLOP/s known for NVIDIA Imaginary X1" in table
    assert "| recipe/train.py (subprocess, real text) | | skipped: no text |" in table


def test_train_py_says_in_one_line_what_to_bring(tmp_path, monkeypatch):
    args = bench_gpu.parse_args(["--cache_dir", str(tmp_path)])
    cfg = type("Cfg", (), {"cache_dir": str(tmp_path)})()
    assert "no text: pass --train_files" in bench_gpu.train_py_blocker(args, cfg)  # no corpus cached there
    args.train_files = str(tmp_path / "nothing*.txt")
    assert "matches no file" in bench_gpu.train_py_blocker(args, cfg)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as on a GPU machine without it
    assert "bring the wheels of datasets, torchdata" in bench_gpu.train_py_blocker(args, cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_no_gpu_says_so_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "recipe/bench/gpu.py"), "--output_dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stdout.strip().splitlines()[-1].startswith("bench-gpu: FAIL: no CUDA GPU"), proc.stdout
