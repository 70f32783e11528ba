"""Push to the Hugging Face Hub while training, in the background, with Trainer's `hub_strategy` meanings.

    end              the finished model folder, once, at the end
    every_save       (default) also each checkpoint's model files to the repo root, as it is saved
    checkpoint       like every_save, plus the whole checkpoint (training state too) as `last-checkpoint/`,
                     so `--resume_from_checkpoint <repo id>` resumes on another machine
    all_checkpoints  like every_save, plus every checkpoint as `checkpoint-<step>/`

Uploads run on a background (daemon) thread, the uploads of one save in order, so a slow network never slows
a step and a stalled one never keeps a finished or stopped run from exiting. As in Trainer, a save whose push would start while the previous one is still
running is not pushed (the next save pushes newer weights); the final push always happens. A failed upload is
reported and the next save pushes again. At the end of a run the pending upload is awaited up to
`hub_upload_timeout` seconds, with progress shown. When a signal or a NaN stops the run, its own checkpoint is
queued right behind any upload in flight and both are awaited up to `hub_stop_timeout` seconds, to fit the
launcher's grace period (torchrun kills 30 s after SIGTERM).
"""

from __future__ import annotations

import importlib
import os
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

from huggingface_hub import HfApi

from recipe.config import ConfigError, RunConfig

# Written beside the model in a checkpoint: needed to resume, not to use the model.
TRAINING_ONLY = ["training_state/*", "trainer_state.json"]
# In output_dir, but not part of the final model folder.
NOT_THE_MODEL = ["checkpoint-*", "tmp-checkpoint-*", "deleting-*", "runs/*", "*/events.out.*"]
PROGRESS_EVERY = 15.0  # seconds between "still uploading" lines


def make_api(token: str | None = None) -> HfApi:
    """The Hub client. `RECIPE_HUB_API=module:Class` swaps in another HfApi subclass: the tests' recording
    stand-in, which replaces only the network calls."""
    spec = os.environ.get("RECIPE_HUB_API")
    if not spec:
        return HfApi(token=token)
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)(token=token)


def download_last_checkpoint(
    repo_id: str, token: str | None = None, missing_ok: bool = False, revision: str | None = None
) -> Path | None:
    """A Hub repo's `last-checkpoint/` (pushed with hub_strategy checkpoint), downloaded once into the HF cache.
    missing_ok (resume_from_checkpoint auto): None where the repo or its last-checkpoint does not exist yet,
    (a 404); a Hub that does not answer (huggingface_hub's LocalEntryNotFoundError) is an error, never a
    fresh start.
    `revision`: a commit, so that every node loads the snapshot the main process resolved; without one, the
    repo's current commit, asked of the Hub (never a cached snapshot of an older one)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    api = make_api(token)
    try:
        if (
            revision is None
        ):  # asked of the Hub itself: snapshot_download would fall back to an older cached copy
            revision = api.repo_info(repo_id).sha
        folder = api.snapshot_download(
            repo_id=repo_id, allow_patterns=["last-checkpoint/*"], revision=revision
        )
    except LocalEntryNotFoundError as err:  # what a connection error becomes: never "nothing there yet"
        raise ConfigError(
            f"resume_from_checkpoint: the Hub did not answer for {repo_id} ({err}); with no local checkpoint "
            "the run will not start afresh over a run that may be on the Hub: retry when it answers"
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as err:
        if missing_ok:
            return None
        raise ConfigError(
            f"resume_from_checkpoint: {repo_id} has no last-checkpoint on the Hub ({err})"
        ) from None
    except Exception as err:  # offline, unreachable, gated: the same to the user
        raise ConfigError(
            f"resume_from_checkpoint: {repo_id} is not a local folder and cannot be downloaded from the Hub "
            f"({type(err).__name__}: {err})"
        ) from None
    path = Path(folder) / "last-checkpoint"
    return None if missing_ok and not (path / "trainer_state.json").is_file() else path


class HubPushError(Exception):
    """The final model did not reach the Hub: the run exits non-zero with one line naming the repo and folder."""


class HubPusher:
    def __init__(self, api: HfApi, repo_id: str, strategy: str, timeout: float, log=print):
        self.api, self.repo_id, self.strategy, self.timeout, self.log = api, repo_id, strategy, timeout, log
        self.pending: Future | None = None  # the uploads of the last pushed save (or the final push)
        self.pending_name: str | None = None
        self.reported: Future | None = None

    @classmethod
    def from_config(cls, cfg: RunConfig, log=print) -> HubPusher:
        """Check the login and create the repo before training, not after hours of it. Fills in
        cfg.hub_model_id (default: <user>/<output_dir name>)."""
        api = make_api(cfg.hub_token)
        try:
            user = api.whoami()
            repo_id = cfg.hub_model_id or f"{user['name']}/{Path(cfg.output_dir).name}"
            api.create_repo(repo_id, private=cfg.hub_private_repo, exist_ok=True)
        except Exception as err:  # offline, no token or a bad token: all mean the same to the user
            raise ConfigError(
                f"push_to_hub is true but the Hub is not usable ({type(err).__name__}: {err}). "
                "Log in with `hf auth login` (or set HF_TOKEN / --hub_token) on a machine with network "
                "access, or run with --push_to_hub false."
            ) from None
        cfg.hub_model_id = repo_id
        log(
            f"push_to_hub: logged in as {user.get('name')}, pushing to {repo_id} (hub_strategy {cfg.hub_strategy})"
        )
        return cls(api, repo_id, cfg.hub_strategy, cfg.hub_upload_timeout, log)

    # --- during training

    def busy(self) -> bool:
        self._report_failure()
        return self.pending is not None and not self.pending.done()

    def uploading(self) -> str | None:
        """The checkpoint folder name being uploaded (rotation must not delete it), if any."""
        return self.pending_name if self.busy() else None

    def push_checkpoint(self, checkpoint: Path, queue: bool = False) -> None:
        """Start the uploads of one save, unless the previous save is still uploading (queue: a stop's own
        checkpoint, pushed right after it, in order). Returns at once."""
        if self.strategy == "end":
            return
        if self.busy() and not queue:
            self.log(
                f"Hub: the previous upload is still running; {checkpoint.name} is not pushed (the next save is)"
            )
            return
        message = f"Training in progress, step {checkpoint.name.split('-')[-1]}"
        uploads = [(checkpoint, None, message, TRAINING_ONLY, None)]
        if self.strategy == "checkpoint":  # replaces the whole folder: no stale files of an older layout
            uploads.append((checkpoint, "last-checkpoint", message, None, ["*"]))
        elif self.strategy == "all_checkpoints":
            uploads.append((checkpoint, checkpoint.name, message, None, None))
        self._start(uploads, checkpoint.name, after=self.pending if self.busy() else None)

    # --- at the end or at a stop

    def push_final(self, output_dir: Path) -> bool:
        """Wait for any upload in flight, then push the finished model folder and wait for it, all within
        one `hub_upload_timeout`. True if the final folder is on the Hub."""
        deadline = time.monotonic() + self.timeout
        if not self.wait("the last checkpoint", deadline):
            self.log("Hub: the final model is not pushed (the previous upload is still running)")
            return False
        self._start([(output_dir, None, "End of training", NOT_THE_MODEL, None)], output_dir.name)
        ok = self.wait("the final model", deadline) and self._report_failure() is None
        if ok:
            self.log(f"Pushed to https://huggingface.co/{self.repo_id}")
        return ok

    def wait(self, what: str = "the pending upload", deadline: float | None = None, key: str = "hub_upload_timeout") -> bool:  # fmt: skip
        """Block until the pending uploads end or the deadline (default: `timeout` from now) passes, showing
        progress. False if still running then: the upload thread does not keep the process alive."""
        deadline = time.monotonic() + self.timeout if deadline is None else deadline
        start = time.monotonic()
        while self.pending is not None and not self.pending.done():
            left = deadline - time.monotonic()
            if left <= 0:
                self.log(
                    f"Hub: {what} is still uploading after {time.monotonic() - start:.0f} s ({key} "
                    f"{deadline - start:.0f} s); giving up. The files are on disk: `hf upload {self.repo_id} <folder>` "
                    "pushes them."
                )
                return False
            try:
                self.pending.result(timeout=min(PROGRESS_EVERY, left))
            except FutureTimeout:
                self.log(f"Hub: waiting for {what} to upload ({time.monotonic() - start:.0f} s so far)")
            except Exception:
                break  # reported below
        self._report_failure()
        return True

    # --- helpers

    def _start(self, uploads: list[tuple], name: str, after: Future | None = None) -> None:
        """Run `uploads` in order on a daemon thread (after the upload `after`, so commits land in order):
        training goes on, and a stalled network never keeps the process from exiting once `wait` has given
        up (huggingface_hub's run_as_future pool would)."""
        future: Future = Future()

        def run() -> None:
            try:
                if after is not None:
                    try:
                        after.result()
                    except BaseException:
                        pass  # its failure was the previous push's; this one goes ahead
                for folder, path_in_repo, message, ignore, delete in uploads:
                    self.api.upload_folder(
                        repo_id=self.repo_id, folder_path=str(folder), path_in_repo=path_in_repo,
                        commit_message=message, ignore_patterns=ignore, delete_patterns=delete,
                    )  # fmt: skip
                future.set_result(None)
            except BaseException as err:  # reported by the training thread
                future.set_exception(err)

        threading.Thread(target=run, name=f"hub-upload-{name}", daemon=True).start()
        self.pending, self.pending_name = future, name

    def _report_failure(self) -> BaseException | None:
        """The error of the last push, if it failed, logged once."""
        future = self.pending
        err = future.exception() if future is not None and future.done() else None
        if err is not None and self.reported is not future:
            self.reported = future
            again = (
                "the next save pushes again"
                if self.pending_name.startswith("checkpoint-")
                else "push it by hand"
            )
            self.log(f"Hub: the upload of {self.pending_name} failed ({type(err).__name__}: {err}); {again}")
        return err
