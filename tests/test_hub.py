"""Pushing to the Hub while training, against a recording stand-in for HfApi (tests/hub_standin.py).

Against the real Hub: `HF_TOKEN=... RECIPE_REAL_HUB_REPO=you/gpt-recipe-test pytest tests/test_hub.py -k real`
(pushes a tiny run there with hub_strategy checkpoint and resumes from it).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recipe.hub import HubPusher

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import hub_standin  # noqa: E402
from test_train import ENV, QUIET, ROOT, TINY  # noqa: E402


@pytest.fixture
def standin(tmp_path, monkeypatch):
    folder = tmp_path / "hub"
    folder.mkdir()
    monkeypatch.setenv("RECIPE_HUB_STANDIN", str(folder))
    return folder


def fake_checkpoint(root: Path, step: int) -> Path:
    folder = root / f"checkpoint-{step}"
    (folder / "training_state").mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "README.md", "trainer_state.json"):
        (folder / name).write_text("{}")
    (folder / "training_state" / "optimizer.bin").write_text("x")
    return folder


def done(rows):
    return [r for r in rows if r["event"] == "done"]


@pytest.mark.parametrize("strategy", ["end", "every_save", "checkpoint", "all_checkpoints"])
def test_each_strategy_pushes_the_right_folders(standin, tmp_path, strategy):
    pusher = HubPusher(hub_standin.RecordingHfApi(), "tester/run", strategy, timeout=60, log=lambda m: None)
    pusher.push_checkpoint(fake_checkpoint(tmp_path, 2))
    assert pusher.wait()
    rows = done(hub_standin.records())
    model_files = ["README.md", "config.json", "model.safetensors"]
    if strategy == "end":
        assert rows == []
        return
    assert (
        rows[0]["path_in_repo"] is None and rows[0]["files"] == model_files
    )  # no training state at the root
    extra = {"every_save": None, "checkpoint": "last-checkpoint", "all_checkpoints": "checkpoint-2"}[strategy]
    if extra is None:
        assert len(rows) == 1
    else:
        assert rows[1]["path_in_repo"] == extra
        assert f"{extra}/training_state/optimizer.bin" in rows[1]["files"]
        assert f"{extra}/trainer_state.json" in rows[1]["files"]


def test_a_save_during_an_upload_is_skipped_and_the_final_push_always_happens(standin, tmp_path):
    logs = []
    pusher = HubPusher(hub_standin.RecordingHfApi(), "tester/run", "every_save", timeout=60, log=logs.append)
    (standin / "block").touch()
    pusher.push_checkpoint(fake_checkpoint(tmp_path, 2))  # returns at once, upload blocked
    assert pusher.busy() and pusher.uploading() == "checkpoint-2"
    pusher.push_checkpoint(fake_checkpoint(tmp_path, 4))
    assert any("checkpoint-4 is not pushed" in m for m in logs)
    (standin / "block").unlink()
    (tmp_path / "model.safetensors").write_text("{}")
    assert pusher.push_final(tmp_path)
    assert [(r["folder"], r["message"]) for r in done(hub_standin.records())] == [
        ("checkpoint-2", "Training in progress, step 2"),
        (tmp_path.name, "End of training"),
    ]
    final = done(hub_standin.records())[-1]["files"]
    assert "model.safetensors" in final and not any(f.startswith("checkpoint-") for f in final)


def test_a_failed_upload_is_reported_and_the_next_save_pushes_again(standin, tmp_path):
    logs = []
    pusher = HubPusher(hub_standin.RecordingHfApi(), "tester/run", "every_save", timeout=60, log=logs.append)
    (standin / "fail").touch()
    pusher.push_checkpoint(fake_checkpoint(tmp_path, 2))
    pusher.wait()
    assert any("upload of checkpoint-2 failed" in m and "ConnectionError" in m for m in logs)
    pusher.push_checkpoint(fake_checkpoint(tmp_path, 4))
    assert pusher.wait()
    assert [r["folder"] for r in done(hub_standin.records())] == ["checkpoint-4"]


def test_waiting_gives_up_after_the_timeout_with_a_clear_message(standin, tmp_path):
    logs = []
    pusher = HubPusher(hub_standin.RecordingHfApi(), "tester/run", "every_save", timeout=0.5, log=logs.append)
    (standin / "block").touch()
    pusher.push_checkpoint(fake_checkpoint(tmp_path, 2))
    assert not pusher.wait("the last checkpoint")
    assert any("still uploading" in m and "hub_upload_timeout" in m for m in logs)
    (standin / "block").unlink()
    pusher.timeout = 60
    assert pusher.wait()


def test_a_stalled_upload_does_not_keep_the_process_alive_after_the_timeout(standin, tmp_path):
    script = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from pathlib import Path; import hub_standin, test_hub; from recipe.hub import HubPusher\n"
        "pusher = HubPusher(hub_standin.RecordingHfApi(), 'tester/run', 'every_save', timeout=0.5)\n"
        "pusher.push_checkpoint(test_hub.fake_checkpoint(Path(sys.argv[2]), 2))\n"
        "assert not pusher.wait()\n"
        "sys.exit(0)  # the upload is still blocked (for 120 s)\n"
    )
    (standin / "block").touch()
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script, str(TESTS), str(tmp_path)], env={**ENV, "RECIPE_HUB_STANDIN": str(standin)},
                          capture_output=True, text=True, timeout=100)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert time.monotonic() - start < 60 and "giving up" in proc.stdout
    assert not done(hub_standin.records())


def run_train(out: Path, standin: Path, *args: str, wait: bool = True):
    # ROOT on the path: this checkout's recipe, not the one the venv's editable install points at
    env = {**ENV, "RECIPE_HUB_API": "hub_standin:RecordingHfApi", "RECIPE_HUB_STANDIN": str(standin),
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}  # fmt: skip
    cmd = [sys.executable, str(ROOT / "recipe" / "train.py"), "--config", TINY, "--output_dir", str(out), *QUIET,
           "--push_to_hub", "true", *args]  # fmt: skip
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_training_goes_on_while_an_upload_hangs_then_fails_and_a_later_save_resumes_elsewhere(
    standin, tmp_path
):
    out = tmp_path / "pushed"
    # The first upload hangs until training has written checkpoint-6, then fails: training must not wait for
    # it, must not stop for the failure, and later saves and the final folder must still be pushed.
    (standin / "block_until").write_text(str(out / "checkpoint-6" / "trainer_state.json"))
    (standin / "fail").touch()
    # "auto" with nothing local and nothing on the Hub yet: a fresh start.
    proc = run_train(out, standin, "--max_steps", "10", "--save_steps", "2", "--eval_steps", "10",
                     "--hub_strategy", "checkpoint", "--save_total_limit", "2", "--resume_from_checkpoint", "auto",
                     "--hub_model_id", "tester/pushed")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = hub_standin.records()
    first = rows[0]
    assert first["folder"] == "checkpoint-2" and rows[1]["event"] == "failed" and rows[1]["saw_block_until"]
    assert "upload of checkpoint-2 failed" in proc.stdout + proc.stderr
    assert "is not pushed" in proc.stdout + proc.stderr  # saves during the hung upload were skipped
    pushed = done(rows)
    assert pushed[-1]["message"] == "End of training"
    assert any(r["path_in_repo"] == "last-checkpoint" for r in pushed)
    remote = standin / "remote" / "tester" / "pushed"
    assert (remote / "last-checkpoint" / "trainer_state.json").is_file()

    # Resume in a fresh output_dir with "auto": no local checkpoint, so hub_model_id's last-checkpoint (the
    # stand-in serves what was pushed).
    again = run_train(tmp_path / "elsewhere", standin, "--max_steps", "12", "--save_steps", "100",
                      "--eval_steps", "100", "--resume_from_checkpoint", "auto", "--hub_model_id", "tester/pushed",
                      "--hub_strategy", "checkpoint", "--resume_new_schedule", "true")  # fmt: skip
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    resumed_at = json.loads((remote / "last-checkpoint" / "trainer_state.json").read_text())["global_step"]
    assert f"at step {resumed_at}" in again.stdout + again.stderr
    assert json.loads((tmp_path / "elsewhere" / "all_results.json").read_text())["global_step"] == 12


# train.py with the TensorBoard tracker saying when it is ended (its files closed).
SAYS_WHEN_TRACKERS_END = """
import sys
from accelerate.tracking import TensorBoardTracker
finish = TensorBoardTracker.finish
def says(self):
    print("tracker ended", flush=True)
    finish(self)
TensorBoardTracker.finish = says
from recipe.train import cli
cli(sys.argv[1:])
"""


def test_a_failed_final_push_exits_non_zero_naming_repo_and_folder_and_ends_trackers(standin, tmp_path):
    out = tmp_path / "unpushed"
    (standin / "fail").touch()  # hub_strategy end: the final push is the only upload, and it fails
    env = {**ENV, "RECIPE_HUB_API": "hub_standin:RecordingHfApi", "RECIPE_HUB_STANDIN": str(standin),
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])}  # fmt: skip
    args = ["--config", TINY, "--output_dir", str(out), *QUIET, "--report_to", "tensorboard", "--push_to_hub", "true",
            "--hub_model_id", "tester/unpushed", "--hub_strategy", "end", "--max_steps", "2", "--eval_steps", "100"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", SAYS_WHEN_TRACKERS_END, *args], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "tester/unpushed" in line and str(out.resolve()) in line and "Traceback" not in proc.stderr, line
    assert (out / "model.safetensors").is_file() and "tracker ended" in proc.stdout


def test_sigterm_waits_for_the_pending_upload(standin, tmp_path):
    out = tmp_path / "stopped"
    (standin / "block").touch()
    proc = run_train(out, standin, "--max_steps", "100000", "--save_steps", "3", "--eval_steps", "100000",
                     "--logging_steps", "1", wait=False)  # fmt: skip
    deadline = time.time() + 300
    while not hub_standin.records() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert hub_standin.records(), "no upload started"
    proc.send_signal(signal.SIGTERM)
    time.sleep(2)  # the run has saved and is now waiting for the blocked upload
    assert proc.poll() is None, "exited before its pending upload finished"
    (standin / "block").unlink()
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stdout[-3000:]
    assert "Stopped by signal" in stdout
    assert done(hub_standin.records()), "the pending upload never finished"
    # The stop's own checkpoint was queued behind the blocked upload, not dropped, and landed after it.
    stopped_at = max(int(p.name.split("-")[-1]) for p in out.glob("checkpoint-*"))
    messages = [r["message"] for r in done(hub_standin.records())]
    assert messages[-1] == f"Training in progress, step {stopped_at}", messages


def test_a_stop_waits_no_longer_than_hub_stop_timeout(standin, tmp_path):
    out = tmp_path / "stopped"
    (standin / "block").touch()  # the upload hangs (up to 120 s): the stop must not wait for it
    proc = run_train(out, standin, "--max_steps", "100000", "--save_steps", "3", "--eval_steps", "100000",
                     "--logging_steps", "1", "--hub_stop_timeout", "2", wait=False)  # fmt: skip
    deadline = time.time() + 300
    while not hub_standin.records() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    start = time.time()
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and time.time() - start < 30, stdout[-3000:]
    # The 2 s count from the signal: what is left of them after the save is what the stop waits.
    assert re.search(r"still uploading after \d+ s \(hub_stop_timeout [012] s\); giving up", stdout), stdout[
        -2000:
    ]


@pytest.mark.skipif(
    not os.environ.get("RECIPE_REAL_HUB_REPO"), reason="set RECIPE_REAL_HUB_REPO and HF_TOKEN"
)
def test_real_hub_push_and_resume(tmp_path):
    env = {k: v for k, v in ENV.items() if k not in ("HF_HUB_OFFLINE", "RECIPE_HUB_API")}
    repo = os.environ["RECIPE_REAL_HUB_REPO"]
    base = [sys.executable, str(ROOT / "recipe" / "train.py"), "--config", TINY, *QUIET, "--push_to_hub", "true",
            "--hub_model_id", repo, "--hub_private_repo", "true"]  # fmt: skip
    first = subprocess.run([*base, "--output_dir", str(tmp_path / "a"), "--max_steps", "6", "--save_steps", "3",
                            "--hub_strategy", "checkpoint"], env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run([*base, "--output_dir", str(tmp_path / "b"), "--max_steps", "8", "--resume_new_schedule", "true",
                             "--resume_from_checkpoint", repo, "--hub_strategy", "end"],
                            env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
