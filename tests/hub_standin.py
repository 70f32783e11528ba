"""A recording stand-in for the Hub: an `HfApi` whose network calls are replaced, nothing else.

What stays the real HfApi's: `run_as_future` and its worker thread, and upload_folder's choice of files
(`_prepare_upload_folder_additions`, with the allow/ignore patterns). What is replaced: whoami, create_repo, the online check of a README's metadata,
the upload itself (the xet pipeline or create_commit), repo_info, and snapshot_download, which reads back
what was "pushed". Train.py picks it up with RECIPE_HUB_API=hub_standin:RecordingHfApi (tests/ on PYTHONPATH).

Controlled through files in $RECIPE_HUB_STANDIN (so a training subprocess and the test agree):
  commits.jsonl       one row per upload: folder, path_in_repo, files, message, and what happened
  remote/<repo>/      the files "pushed", as the Hub would hold them
  block               while it exists, an upload waits (at most 120 s) ...
  block_until         ... or until the path written in this file exists
  fail                the next upload raises (the file is removed), as a network error would
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.hf_api import CommitInfo, future_compatible


def _dir() -> Path:
    return Path(os.environ["RECIPE_HUB_STANDIN"])


def records() -> list[dict]:
    path = _dir() / "commits.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _record(folder: Path, row: dict) -> None:
    with (folder / "commits.jsonl").open("a") as f:
        f.write(json.dumps(row) + "\n")


class RecordingHfApi(HfApi):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.folder = _dir()  # fixed at construction: a late upload thread never writes into another test

    def whoami(self, token=None, **kwargs) -> dict:
        return {"name": "tester"}

    def _validate_yaml(self, content, *args, **kwargs) -> None:  # the Hub checks a README's metadata online
        return None

    def create_repo(self, repo_id, **kwargs):
        (_dir() / "remote" / repo_id).mkdir(parents=True, exist_ok=True)
        return f"https://huggingface.co/{repo_id}"

    @future_compatible
    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, commit_message=None, allow_patterns=None,
                      ignore_patterns=None, delete_patterns=None, run_as_future=False, **kwargs):  # fmt: skip
        from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS

        operations = self._prepare_upload_folder_additions(
            folder_path, path_in_repo or "", allow_patterns=allow_patterns,
            ignore_patterns=list(ignore_patterns or []) + DEFAULT_IGNORE_PATTERNS, repo_type="model",
        )  # fmt: skip
        row = {"folder": Path(folder_path).name, "path_in_repo": path_in_repo, "message": commit_message,
               "files": sorted(op.path_in_repo for op in operations), "started": time.time()}  # fmt: skip
        _record(self.folder, {**row, "event": "started"})
        deadline = time.time() + 120
        while (self.folder / "block").exists() and time.time() < deadline:
            time.sleep(0.05)
        if (self.folder / "block_until").exists():
            target = Path((self.folder / "block_until").read_text())
            while not target.exists() and time.time() < deadline:
                time.sleep(0.05)
            row["saw_block_until"] = target.exists()
            (self.folder / "block_until").unlink()
        if (self.folder / "fail").exists():
            (self.folder / "fail").unlink()
            _record(self.folder, {**row, "event": "failed"})
            raise ConnectionError("stand-in: the network went away")
        remote = self.folder / "remote" / repo_id
        if delete_patterns == ["*"] and path_in_repo and (remote / path_in_repo).exists():
            shutil.rmtree(remote / path_in_repo)  # what the Hub does with the folder's old files
        for op in operations:
            target = remote / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(op.path_or_fileobj, target)
        _record(self.folder, {**row, "event": "done"})
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/0", commit_message=commit_message,
                          commit_description="", oid="0" * 40)  # fmt: skip

    def repo_info(self, repo_id, **kwargs):
        from types import SimpleNamespace

        from huggingface_hub.errors import RepositoryNotFoundError

        if not (self.folder / "remote" / repo_id).exists():
            missing = RepositoryNotFoundError.__new__(
                RepositoryNotFoundError
            )  # (its __init__ wants a response)
            Exception.__init__(missing, f"stand-in: no repo {repo_id}")
            raise missing
        return SimpleNamespace(sha=None)  # the stand-in keeps no history

    def snapshot_download(self, repo_id, allow_patterns=None, **kwargs) -> str:
        remote = self.folder / "remote" / repo_id
        if not remote.exists():
            raise FileNotFoundError(f"stand-in: no repo {repo_id}")
        return str(remote)
