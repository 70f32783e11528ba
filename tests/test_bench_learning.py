"""The learning-efficiency bench without training: step-count budgeting, the table and the plot."""

from pathlib import Path

from recipe.bench import learning as bl


def test_bench_fills_the_baseline_budget_and_tables_every_run(tmp_path, monkeypatch):
    pace = {"gpt2-adamw": 1.0, "modern-muon": 1.25}
    monkeypatch.setattr(bl, "seconds_per_step", lambda configs: {n: pace[n] for n in configs})
    calls = []

    def fake_run(name, config, overrides, steps, out_root, seed=None, threads=None):
        calls.append((name, steps, seed, threads))
        bpb = 2.4 if name == "gpt2-adamw" else 2.2
        return {"name": name, "seed": seed, "steps": steps, "bpb": bpb + (0.01 if seed else 0.0),
                "seconds": steps * pace[name], "tokens": steps * 2048, "eval_bytes_per_token": 3.9,
                "num_parameters": 1, "curve": [(steps * pace[name] / 2, bpb + 0.3)]}  # fmt: skip

    monkeypatch.setattr(bl, "run_training", fake_run)
    args = bl.parser().parse_args(
        [
            "--baseline_steps",
            "100",
            "--candidates",
            "modern-muon",
            "--output_dir",
            str(tmp_path),
            "--plot",
            str(tmp_path / "learning.png"),
            "--output",
            "",
        ]  # fmt: skip
    )
    lines = bl.bench_learning(args)
    assert calls == [
        ("gpt2-adamw", 100, None, None),
        ("modern-muon", 80, None, None),
        ("gpt2-adamw", 100, 43, None),
    ]
    table = [line for line in lines if line.startswith("| ") and "candidate" not in line]
    assert len(table) == 3 and "-0.2000" in table[1]
    assert any("bpb 0.0100" in line for line in lines)  # the noise line
    assert Path(args.plot).stat().st_size > 10_000
    assert (tmp_path / "learning.json").is_file()


def test_step_cost_is_measured_for_each_candidate():
    from recipe.config import load_config

    configs = {
        name: load_config(["--config", "configs/tiny.yaml", *bl._flags(bl.CANDIDATES[name][1])])
        for name in ("gpt2-adamw", "modern-muon")
    }
    pace = bl.seconds_per_step(configs, rounds=1, steps=1)
    assert set(pace) == set(configs) and all(0 < s < 10 for s in pace.values())
