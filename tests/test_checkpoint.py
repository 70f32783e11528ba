"""The checkpoint module and the loop's helpers, in-process: no subprocess, no launcher."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from recipe.checkpoint import (
    STATE_FILE,
    check_model_matches,
    find_checkpoint,
    list_checkpoints,
    plain_model,
    read_state,
    resume_accumulation,
    rotate_checkpoints,
    save_model_folder,
)
from recipe.config import ConfigError, RunConfig
from recipe.metrics import JsonlLog, run_peak_flops
from recipe.optim import make_schedule, param_groups


def make_checkpoints(root: Path, steps: list[int], incomplete: list[int] = ()) -> None:
    for step in steps:
        (root / f"checkpoint-{step}").mkdir(parents=True)
        (root / f"checkpoint-{step}" / STATE_FILE).write_text(json.dumps({"global_step": step}))
    for step in incomplete:
        (root / f"checkpoint-{step}").mkdir(parents=True)  # no trainer_state.json: a crash mid-write
        (root / f"tmp-checkpoint-{step}").mkdir(parents=True)


def test_listing_orders_by_step_and_ignores_incomplete_folders(tmp_path):
    make_checkpoints(tmp_path, [100, 20, 3], incomplete=[200])
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-20", "checkpoint-100"]
    assert list_checkpoints(tmp_path / "missing") == []


def test_rotation_keeps_the_newest_and_spares_the_one_uploading(tmp_path):
    make_checkpoints(tmp_path, [10, 20, 30, 40])
    deleted = rotate_checkpoints(tmp_path, 2, uploading="checkpoint-10")
    assert [p.name for p in deleted] == ["checkpoint-20"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-30", "checkpoint-40"]
    assert rotate_checkpoints(tmp_path, None) == []  # None keeps everything


class Crash(BaseException):
    """What a kill -9 does to the code after it: nothing more runs."""


def crash_in(monkeypatch, module, name: str, after=lambda path: None, call: int = 1) -> None:
    """`module.name` dies on its `call`-th call, after `after(path)` (what it got done before the kill)."""
    real, calls = getattr(module, name), []

    def die(path, *args, **kwargs):
        calls.append(path)
        if len(calls) < call:
            return real(path, *args, **kwargs)
        after(Path(path))
        monkeypatch.undo()
        raise Crash(name)

    monkeypatch.setattr(module, name, die)


def half_delete(path: Path) -> None:
    (path / "model.safetensors").unlink()


def test_resaving_a_step_keeps_a_complete_checkpoint_through_any_crash(tmp_path, tiny_gpt, monkeypatch):
    """A resumed run saving a step again replaces the old folder (os.replace cannot overwrite a non-empty one):
    killed inside the old folder's deletion, before the renames or between them, one complete checkpoint-5
    (the new one) is left once the next start has tidied up."""
    import shutil

    from recipe.checkpoint import save_checkpoint, tidy_output_dir
    from recipe.run_setup import make_accelerator

    accelerator = make_accelerator(RunConfig(output_dir=str(tmp_path), report_to="none"))
    model = accelerator.prepare(tiny_gpt())
    state = {"global_step": 5}
    save_checkpoint(accelerator, model, tmp_path, state, None, None)
    # os.replace's first call puts the state file in place; the second and third are promote's two renames.
    for module, name, call in ((shutil, "rmtree", 1), (os, "replace", 2), (os, "replace", 3)):
        crash_in(monkeypatch, module, name, half_delete if name == "rmtree" else lambda path: None, call)
        with pytest.raises(Crash):
            save_checkpoint(accelerator, model, tmp_path, {**state, "again": name}, None, None)
        # Nothing listed is incomplete, even before the next start tidies up.
        assert all((p / "model.safetensors").is_file() for p in list_checkpoints(tmp_path))
        tidy_output_dir(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]
        assert (tmp_path / "checkpoint-5" / "model.safetensors").is_file()
        assert read_state(tmp_path / "checkpoint-5")["again"] == name  # the new one


def test_the_next_start_finishes_what_a_crash_left_in_one_line(tmp_path):
    """A complete tmp-checkpoint (killed between its two renames) is promoted, not deleted; half-written and
    half-deleted folders are removed; and a run without resume_from_checkpoint is refused over the promotable
    one as over any checkpoint."""
    import shutil

    from recipe.checkpoint import tidy_output_dir
    from recipe.run_setup import check_output_dir

    make_checkpoints(tmp_path, [2])
    (tmp_path / "tmp-checkpoint-6").mkdir()
    (tmp_path / "tmp-checkpoint-6" / STATE_FILE).write_text(json.dumps({"global_step": 6}))
    (tmp_path / "tmp-checkpoint-8").mkdir()  # no state file: half-written
    (tmp_path / "deleting-checkpoint-4").mkdir()
    (tmp_path / "deleting-checkpoint-4" / STATE_FILE).write_text("{}")
    (tmp_path / "deleting-notes").mkdir()  # not ours: left alone
    pending = tmp_path.parent / f"{tmp_path.name}-pending"  # only the tmp-checkpoint that is complete
    shutil.copytree(tmp_path / "tmp-checkpoint-6", pending / "tmp-checkpoint-6")
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        check_output_dir(RunConfig(output_dir=str(pending)))
    line = tidy_output_dir(tmp_path)
    assert line.count("\n") == 0
    for said in ("completed tmp-checkpoint-6 as checkpoint-6", "half-written tmp-checkpoint-8", "half-deleted checkpoint-4"):  # fmt: skip
        assert said in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-6", "deleting-notes"]
    assert tidy_output_dir(tmp_path) is None  # nothing left to say


def test_overwrite_output_dir_deletes_so_that_a_crash_leaves_none_that_looks_whole(tmp_path, monkeypatch):
    import shutil
    from types import SimpleNamespace

    from recipe.run_setup import start_output_dir

    make_checkpoints(tmp_path, [2, 4])
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}" / "model.safetensors").write_text("weights")
    crash_in(monkeypatch, shutil, "rmtree", half_delete)
    cfg = RunConfig(output_dir=str(tmp_path), overwrite_output_dir=True)
    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None, process_index=0)
    with pytest.raises(Crash):
        start_output_dir(cfg, accelerator)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4"]
    assert (tmp_path / "checkpoint-4" / "model.safetensors").is_file()


def test_find_checkpoint_latest_path_hub_and_errors(tmp_path):
    make_checkpoints(tmp_path, [5, 10])
    never = lambda repo: pytest.fail("no download expected")  # noqa: E731
    assert find_checkpoint(None, tmp_path, never) is None
    assert find_checkpoint("latest", tmp_path, never).name == "checkpoint-10"
    assert find_checkpoint(str(tmp_path / "checkpoint-5"), tmp_path, never).name == "checkpoint-5"
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        find_checkpoint("latest", tmp_path / "empty", never)
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        find_checkpoint(str(tmp_path), tmp_path, never)
    asked = []
    found = find_checkpoint(
        "someone/run", tmp_path, lambda repo: asked.append(repo) or tmp_path / "checkpoint-5"
    )
    assert asked == ["someone/run"] and found.name == "checkpoint-5"


def test_auto_resumes_the_newest_local_then_the_hub_else_starts_fresh(tmp_path):
    never = lambda repo, missing_ok=False: pytest.fail("no download expected")  # noqa: E731
    make_checkpoints(tmp_path / "run", [5, 10])
    assert find_checkpoint("auto", tmp_path / "run", never, "someone/run").name == "checkpoint-10"
    assert find_checkpoint("auto", tmp_path / "empty", never) is None  # no hub_model_id: a fresh start
    asked = []

    def hub(repo, missing_ok=False):
        asked.append((repo, missing_ok))
        return None if repo == "someone/new" else tmp_path / "run" / "checkpoint-5"

    assert find_checkpoint("auto", tmp_path / "empty", hub, "someone/new") is None  # nothing on the Hub yet
    assert find_checkpoint("auto", tmp_path / "empty", hub, "someone/run").name == "checkpoint-5"
    assert asked == [("someone/new", True), ("someone/run", True)]


def test_auto_never_starts_fresh_when_the_hub_does_not_answer(monkeypatch):
    """Only a repo (or last-checkpoint) that does not exist is a fresh start; an unreachable Hub is an error,
    or a spot machine with a network hiccup would overwrite the run's progress with a new run."""
    from huggingface_hub.errors import RepositoryNotFoundError

    from recipe import hub

    class Api:
        def __init__(self, err):
            self.err = err

        def repo_info(self, repo_id):
            raise self.err

        def snapshot_download(self, **kwargs):
            raise self.err

    missing = RepositoryNotFoundError.__new__(
        RepositoryNotFoundError
    )  # (its __init__ wants an HTTP response)
    Exception.__init__(missing, "404: no such repo")
    monkeypatch.setattr(hub, "make_api", lambda token=None: Api(missing))
    assert hub.download_last_checkpoint("someone/new", missing_ok=True) is None
    with pytest.raises(ConfigError, match="no last-checkpoint"):
        hub.download_last_checkpoint("someone/new")
    monkeypatch.setattr(hub, "make_api", lambda token=None: Api(ConnectionError("no route to host")))
    with pytest.raises(ConfigError, match="cannot be downloaded from the Hub"):
        hub.download_last_checkpoint("someone/run", missing_ok=True)
    # What snapshot_download raises for a connection error or a 5xx: an EntryNotFoundError subclass.
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.setattr(
        hub, "make_api", lambda token=None: Api(LocalEntryNotFoundError("connection refused"))
    )
    with pytest.raises(ConfigError, match="the Hub did not answer"):
        hub.download_last_checkpoint("someone/run", missing_ok=True)


@pytest.mark.parametrize(
    "saved,world,streaming,expected",
    [
        ({"num_processes": 1, "gradient_accumulation_steps": 2}, 2, False, 1),  # same tokens per step
        ({"num_processes": 2, "gradient_accumulation_steps": 1}, 1, False, 2),
        ({"num_processes": 2, "gradient_accumulation_steps": 1}, 2, False, 1),  # unchanged
        ({"num_processes": 1, "gradient_accumulation_steps": 1}, 2, False, "cannot be split evenly"),
        ({"num_processes": 1, "gradient_accumulation_steps": 2}, 2, True, "streamed"),
        ({"num_processes": 1, "gradient_accumulation_steps": 1, "per_device_train_batch_size": 4}, 1, False,
         "per_device_train_batch_size 4"),
    ],
)  # fmt: skip
def test_resume_keeps_the_global_batch_or_refuses_naming_both_counts(saved, world, streaming, expected):
    cfg = RunConfig(
        gradient_accumulation_steps=saved["gradient_accumulation_steps"], per_device_train_batch_size=8
    )
    if isinstance(expected, int):
        assert resume_accumulation(saved, cfg, world, streaming) == expected
    else:
        with pytest.raises(ConfigError, match=expected) as err:
            resume_accumulation(saved, cfg, world, streaming)
        if "processes" in str(err.value):
            assert f"{saved['num_processes']} process" in str(err.value) and f"has {world}" in str(err.value)


def test_a_checkpoint_of_another_shape_is_one_line_naming_the_keys(tmp_path, tiny_gpt):
    tiny_gpt(hidden_size=32).save_pretrained(tmp_path)
    check_model_matches(tmp_path, tiny_gpt(hidden_size=32).config)  # same shape: fine
    with pytest.raises(ConfigError) as err:
        check_model_matches(tmp_path, tiny_gpt(hidden_size=64, num_hidden_layers=3).config)
    message = str(err.value)
    assert "hidden_size (checkpoint 32, this run 64)" in message and "num_hidden_layers" in message
    assert "\n" not in message


def test_save_model_folder_drops_the_compile_wrapper_and_reloads_exactly(tmp_path, tiny_gpt):
    model = tiny_gpt()
    compiled = torch.compile(model)
    assert next(iter(compiled.state_dict())).startswith("_orig_mod.")  # what used to be exported
    saved = save_model_folder(compiled, tmp_path, None, is_main=True)
    assert saved is model
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids = torch.randint(0, 97, (2, 10))
    assert torch.allclose(model(ids).logits, reloaded.eval()(ids).logits, atol=1e-6)
    assert "max_length" not in json.loads((tmp_path / "generation_config.json").read_text())


def test_unwrapping_a_compiled_ddp_model_leaves_the_live_model_wrapped(tmp_path, tiny_gpt):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        live = torch.compile(torch.nn.parallel.DistributedDataParallel(tiny_gpt()))
        inner = plain_model(live)
        assert not isinstance(inner, torch.nn.parallel.DistributedDataParallel)
        assert isinstance(live._orig_mod, torch.nn.parallel.DistributedDataParallel)  # no_sync still there
        assert all(not k.startswith(("_orig_mod", "module")) for k in inner.state_dict())
    finally:
        dist.destroy_process_group()


def test_mfu_denominator_is_every_device_of_the_run(monkeypatch):
    monkeypatch.setattr("recipe.metrics.gpu_peak_flops", lambda device, mp: 989e12)
    assert run_peak_flops(torch.device("cuda"), "bf16", 8) == 8 * 989e12


@pytest.mark.parametrize(
    "device_name, card, tflops",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989), ("NVIDIA H100 PCIe", "H100 PCIe", 756),
        ("NVIDIA H100 NVL", "H100 NVL", 835), ("NVIDIA H200", "H200 SXM", 989), ("NVIDIA H200 NVL", "H200 NVL", 835),
        ("NVIDIA GH200 480GB", "GH200", 989), ("NVIDIA H20", "H20", 148), ("NVIDIA A100-SXM4-80GB", "A100", 312),
        ("NVIDIA A100 80GB PCIe", "A100", 312), ("NVIDIA L40S", "L40S", 362), ("NVIDIA L40", "L40", 181),
        ("NVIDIA L4", "L4", 121), ("NVIDIA B200", "B200", 2250), ("NVIDIA GB200", "GB200", 2500),
        ("NVIDIA GeForce RTX 4090", "RTX 4090", 165), ("NVIDIA GeForce RTX 2080 Ti", None, None),
        ("NVIDIA A10G", None, None), ("NVIDIA A10", "A10", 125),
        ("Tesla V100-SXM2-16GB", "V100 SXM (fp16)", 125), ("Tesla V100-PCIE-32GB", "V100 PCIe (fp16)", 112),
    ],
)  # fmt: skip
def test_mfu_names_the_card_it_matched_and_none_for_an_unknown_one(device_name, card, tflops):
    from recipe.metrics import card_peak

    found = card_peak(device_name)
    assert (found and (found[0], round(found[1] / 1e12))) == ((card, tflops) if card else None)
    if card:  # fp32: TF32 at half the bf16 peak, or the card's own fp32 figure where it has no TF32
        fp32 = card_peak(device_name, "no")[1] / 1e12
        assert fp32 == pytest.approx({"V100 SXM (fp16)": 15.7, "V100 PCIe (fp16)": 14}.get(card, tflops / 2))


def test_the_schedule_warms_up_then_reaches_its_floor_exactly_at_max_steps():
    cfg = RunConfig(max_steps=20, warmup_steps=2, learning_rate=1.0, min_lr_ratio=0.1)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = make_schedule(opt, cfg)
    lrs = []
    for _ in range(cfg.max_steps):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1)  # the floor, reached exactly at the last step


def test_param_groups_decay_matrices_only_and_count_the_tied_head_once(tiny_gpt):
    model = tiny_gpt()
    decay, no_decay = param_groups(model, 0.1)
    params = decay["params"] + no_decay["params"]
    assert len({id(p) for p in params}) == len(params) == len(list(model.parameters()))
    assert all(p.ndim == 2 for p in decay["params"])
    assert model.transformer.wte.weight in [p for p in no_decay["params"]]


def test_metrics_log_drops_rows_after_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (10, 20, 30)))
    log = JsonlLog(path, keep_until_step=20)
    assert [r["step"] for r in log.rows] == [10, 20]
    log.write({"step": 30, "loss": 0.5})
    assert [json.loads(line)["loss"] for line in path.read_text().splitlines()] == [1.0, 1.0, 0.5]


class _Stub:
    device = torch.device("cpu")

    @staticmethod
    def skip_first_batches(dataloader, skip):
        from accelerate import skip_first_batches

        return skip_first_batches(dataloader, skip)


def test_micro_batches_resume_mid_epoch_and_run_into_the_next():
    from recipe.train import micro_batches

    data = [{"x": torch.tensor([i])} for i in range(5)]
    loader = torch.utils.data.DataLoader(data, batch_size=2, drop_last=True)  # 2 batches an epoch
    state = {"global_step": 3, "epoch": 0}  # 3 micro-batches consumed: epoch 1, batch 1
    stream = micro_batches(loader, state, 1, _Stub())
    got = [(epoch, batch["x"].view(-1).tolist()) for epoch, batch in (next(stream) for _ in range(3))]
    assert got == [(1, [2, 3]), (2, [0, 1]), (2, [2, 3])]


def test_evaluation_builds_no_cache(tiny_gpt):
    from accelerate import Accelerator

    from recipe.scoring import evaluate

    model = tiny_gpt()
    seen = []
    model.register_forward_hook(lambda module, args, kwargs, out: seen.append(out.cache), with_kwargs=True)
    blocks = torch.randint(0, 97, (4, 9))
    data = [{"input_ids": b[:-1], "shift_labels": b[1:]} for b in blocks]
    metrics = evaluate(model, torch.utils.data.DataLoader(data, batch_size=2), Accelerator(cpu=True), 2.0)
    assert seen == [None, None]
    assert 0 <= metrics["eval_accuracy"] <= 1 and metrics["eval_bits_per_byte"] > 0


def test_no_load_path_unpickles_freely(tmp_path, tiny_gpt, monkeypatch):
    """Resuming loads weights from safetensors, our state from JSON and accelerate's files with weights_only."""
    from accelerate import Accelerator

    from recipe.checkpoint import read_rank_state, save_checkpoint
    from recipe.run_setup import make_accelerator

    cfg = RunConfig(output_dir=str(tmp_path), report_to="none")
    accelerator = make_accelerator(cfg)
    assert isinstance(accelerator, Accelerator)
    model = tiny_gpt().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = make_schedule(opt, cfg)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    model(input_ids=torch.randint(0, 97, (2, 8)), labels=torch.randint(0, 97, (2, 8))).loss.backward()
    opt.step()
    state = {"global_step": 1, "tokens_seen": 16, "train_runtime": 1.0}
    path = save_checkpoint(accelerator, model, tmp_path, state, None, None, rank_state={"epoch": 3})
    assert not (path / "training_state" / "model.safetensors").exists()  # the weights are saved once

    before = {k: v.clone() for k, v in plain_model(model).state_dict().items()}
    with torch.no_grad():
        for p in plain_model(model).parameters():
            p.zero_()
    loads = []
    real_load = torch.load
    monkeypatch.setattr(
        torch, "load", lambda *a, **k: loads.append(k.get("weights_only")) or real_load(*a, **k)
    )
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load on resume"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads on resume"))
    accelerator.load_state(str(path / "training_state"))
    assert read_rank_state(path, 0) == {"epoch": 3}
    assert loads and all(w is True for w in loads), loads
    after = plain_model(model).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_cpu_run_uses_the_cores_whatever_the_launcher_set(tmp_path, monkeypatch):
    """`accelerate launch` exports OMP_NUM_THREADS=1 for a single CPU process: half speed on 2 cores."""
    from recipe.run_setup import default_threads, make_accelerator

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        make_accelerator(RunConfig(output_dir=str(tmp_path), report_to="none"))
        assert torch.get_num_threads() == default_threads() == len(os.sched_getaffinity(0))
        make_accelerator(RunConfig(output_dir=str(tmp_path), report_to="none", num_threads=1))
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * default_threads()))
        assert default_threads() == 1  # never zero
    finally:
        torch.set_num_threads(before)


def test_the_export_check_holds_under_mixed_precision_and_catches_a_changed_weight(tmp_path, tiny_gpt):
    """accelerate wraps the live forward in autocast: the check must compare the plain forwards."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from recipe.checkpoint import verify_export

    AcceleratorState._reset_state(True)
    try:
        model = Accelerator(cpu=True, mixed_precision="bf16").prepare(tiny_gpt())
        saved = save_model_folder(model, tmp_path, None, is_main=True)
        assert verify_export(tmp_path, saved) == 0.0
        with torch.no_grad():
            saved.transformer.h[0].mlp.c_fc.weight[0, 0] += 1.0
        with pytest.raises(RuntimeError, match="differs from the trained one"):
            verify_export(tmp_path, saved)
    finally:
        AcceleratorState._reset_state(True)


@pytest.mark.parametrize("architecture", ["gpt2", "modern"])
def test_flops_per_token_counts_every_matmul_weight(architecture):
    from recipe import GPTConfig, GPTForCausalLM
    from recipe.metrics import flops_per_token

    config = GPTConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=32, architecture=architecture)  # fmt: skip
    model = GPTForCausalLM(config)
    weights = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)
    )  # head included
    attention = 12 * config.num_hidden_layers * config.hidden_size * 32
    assert flops_per_token(config, 32) == 6 * weights + attention


def test_a_hub_dataset_is_read_at_one_commit_recorded_and_compared(monkeypatch, tmp_path):
    """The main process resolves the dataset's commit; it reaches load_dataset and the checkpoint, and a resume
    at another commit is refused, naming the one to pin."""
    from types import SimpleNamespace

    import huggingface_hub

    import recipe.documents as documents_module
    from recipe import resume as train
    from recipe.checkpoint import check_same_run, run_identity
    from recipe.config import RunConfig

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(train, "make_api", lambda token=None: SimpleNamespace(dataset_info=lambda name, revision=None: SimpleNamespace(sha="abc123")))  # fmt: skip
    cfg = RunConfig(dataset_name="someone/corpus", cache_dir=str(tmp_path))
    train.pin_dataset_revision(cfg, SimpleNamespace(is_main_process=True, num_processes=1, print=print))
    assert cfg.dataset_revision == "abc123"
    asked = {}

    def load_dataset(*args, **kwargs):
        asked.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(documents_module, "load_dataset", load_dataset)
    with pytest.raises(ConfigError):
        documents_module._hub_documents(cfg)
    assert asked["revision"] == "abc123"
    data = SimpleNamespace(tokenizer=None, fingerprint="f", files=None)
    monkeypatch.setattr("recipe.tokenizer.tokenizer_fingerprint", lambda tok: "t")
    saved = run_identity(cfg, data)
    cfg.dataset_revision = "def456"
    with pytest.raises(ConfigError, match="the dataset's commit \\(resume with --dataset_revision abc123\\)"):
        check_same_run(tmp_path, saved, cfg, data)
    # Resuming with nothing pinned reads the checkpoint's commit, whatever the Hub's head is now.
    (tmp_path / "trainer_state.json").write_text(json.dumps(saved))
    resumed = RunConfig(dataset_name="someone/corpus", cache_dir=str(tmp_path))
    train.pin_dataset_revision(resumed, SimpleNamespace(is_main_process=True, num_processes=1), tmp_path)
    assert resumed.dataset_revision == "abc123"


def test_a_checkpoint_from_before_a_new_setting_is_named_not_a_traceback(tmp_path, tiny_tokenizer):
    """Before vocabulary padding: the refusal names the setting that rebuilds the checkpoint's model. Before
    muon_split_fused: that checkpoint orthogonalised whole matrices (false), so true is refused in one line."""
    from types import SimpleNamespace

    from recipe.checkpoint import check_model_matches, check_same_run, run_identity

    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 1000, "hidden_size": 32}))
    with pytest.raises(ConfigError, match="--pad_vocab_size_to_multiple_of 1"):
        check_model_matches(
            tmp_path, SimpleNamespace(to_dict=lambda: {"vocab_size": 1024, "hidden_size": 32})
        )
    data = SimpleNamespace(tokenizer=tiny_tokenizer, fingerprint="data", files=None)
    old = run_identity(RunConfig(optim="muon"), data)
    del old["optimizer"]["muon_split_fused"]  # what a checkpoint written before the key holds
    assert check_same_run(tmp_path, old, RunConfig(optim="muon", muon_split_fused=False), data) == []
    with pytest.raises(ConfigError, match="muon_split_fused False -> True"):
        check_same_run(tmp_path, old, RunConfig(optim="muon", muon_split_fused=True), data)


def test_a_resume_compares_the_seed_and_only_the_settings_of_the_runs_optimizer(tmp_path, tiny_tokenizer):
    """Another seed reshuffles map-style data (accelerate's seedable sampler): refused in one line naming it.
    An AdamW run ignores the muon_* settings, so they are not compared; a Muon run compares them."""
    from types import SimpleNamespace

    from recipe.checkpoint import check_same_run, run_identity

    data = SimpleNamespace(tokenizer=tiny_tokenizer, fingerprint="data", files=None)
    saved = run_identity(RunConfig(seed=42), data)
    with pytest.raises(ConfigError, match="the seed .*--seed 42"):
        check_same_run(tmp_path, saved, RunConfig(seed=7), data)
    assert check_same_run(tmp_path, {k: v for k, v in saved.items() if k != "seed"}, RunConfig(seed=7), data) == []  # fmt: skip
    muon_only = {"muon_momentum": 0.9, "muon_split_fused": False, "muon_learning_rate": 1e-3}
    adamw = run_identity(RunConfig(optim="adamw"), data)
    assert check_same_run(tmp_path, adamw, RunConfig(optim="adamw", **muon_only), data) == []
    with pytest.raises(ConfigError, match="muon_momentum .* -> 0.9"):
        check_same_run(tmp_path, run_identity(RunConfig(optim="muon"), data), RunConfig(optim="muon", **muon_only), data)  # fmt: skip


def test_a_dataset_branch_is_recorded_as_its_commit_and_a_moved_branch_is_said(monkeypatch, tmp_path):
    """dataset_revision main is pinned to the commit it resolves to (what run_config.yaml and the checkpoint
    record); a resume after main moved resolves another commit and is refused, naming the recorded one."""
    from types import SimpleNamespace

    import huggingface_hub

    from recipe import resume
    from recipe.checkpoint import check_same_run, run_identity

    heads, a, b = {}, "a" * 40, "b" * 40
    hub = SimpleNamespace(dataset_info=lambda name, revision=None: SimpleNamespace(sha=heads[revision]))
    heads["main"] = a
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(resume, "make_api", lambda token=None: hub)
    accelerator, said = SimpleNamespace(is_main_process=True, num_processes=1, print=print), []
    cfg = RunConfig(dataset_name="someone/corpus", dataset_revision="main", cache_dir=str(tmp_path))
    resume.pin_dataset_revision(cfg, accelerator)
    assert cfg.dataset_revision == a
    data = SimpleNamespace(tokenizer=None, fingerprint="f", files=None)
    monkeypatch.setattr("recipe.tokenizer.tokenizer_fingerprint", lambda tok: "t")
    saved = run_identity(cfg, data)
    (tmp_path / "trainer_state.json").write_text(json.dumps(saved))

    heads["main"] = b  # a push to the dataset
    again = RunConfig(dataset_name="someone/corpus", dataset_revision="main", cache_dir=str(tmp_path))
    accelerator.print = said.append
    resume.pin_dataset_revision(again, accelerator, tmp_path)
    assert again.dataset_revision == b
    assert said == [f"dataset_revision: main is commit {b} (recorded as that)"]
    with pytest.raises(ConfigError, match=f"the dataset's commit \\(resume with --dataset_revision {a}\\)"):
        check_same_run(tmp_path, saved, again, data)
    # An older checkpoint recorded the branch itself: resuming with that branch keeps it (no loop of refusals).
    (tmp_path / "trainer_state.json").write_text(json.dumps({**saved, "dataset_revision": "main"}))
    older = RunConfig(dataset_name="someone/corpus", dataset_revision="main", cache_dir=str(tmp_path))
    resume.pin_dataset_revision(older, accelerator, tmp_path)
    assert older.dataset_revision == "main" and "cannot be checked" in said[-1]
    check_same_run(tmp_path, {**saved, "dataset_revision": "main"}, older, data)
