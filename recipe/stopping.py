"""Stopping a run cleanly: a signal becomes a stop that every process agrees on at the same step (with the
first non-finite step, if any), the exit waits for the pending upload, and the command that resumes is
printed."""

from __future__ import annotations

import signal
import sys
import time
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator

if TYPE_CHECKING:
    from recipe.hub import HubPusher

# How often (in steps) all processes agree on a stop signal or a NaN loss: one small gather, so a stop
# lands within this many steps (or logging_steps, if fewer). A single process stops at the next step.
AGREE_EVERY = 10


class StopSignal:
    """SIGTERM / Ctrl-C: finish the current step, save, exit. A second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.at: float | None = None  # time.monotonic() of the first signal: a stop's waits count from it
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum
        self.at = self.at or time.monotonic()
        signal.signal(signal.SIGINT, signal.default_int_handler)


def agree(stop: StopSignal, first_bad_step: torch.Tensor, accelerator: Accelerator) -> tuple[bool, int]:
    """(stop, first NaN step or 0), the same on every process: one gather that every process enters at
    the same steps, whether or not a signal reached it (ranks that disagree hang in the next collective)."""
    flags = torch.stack([first_bad_step.double(), torch.tensor(float(stop.received is not None), dtype=torch.float64,
                                                                device=first_bad_step.device)])  # fmt: skip
    if accelerator.num_processes > 1:
        flags = accelerator.gather(flags.view(1, 2))  # (processes, 2)
    flags = flags.view(-1, 2).cpu()
    bad = [int(b) for b in flags[:, 0].tolist() if b > 0]
    return bool(flags[:, 1].max() > 0), min(bad, default=0)


def stop_run(accelerator: Accelerator, hub: HubPusher | None, code: int, message: str, timeout: float | None = None) -> None:  # fmt: skip
    """Say why, wait for the pending upload (if pushing; at most `timeout` s, default hub_upload_timeout), exit.
    The main process carries the exit code; the others leave with 0 first, since a launcher kills every
    process once one fails, the upload with it."""
    accelerator.print(message)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        accelerator.end_training()
        sys.exit(0)
    if hub is not None:
        if timeout is None:
            hub.wait("the last checkpoint")
        else:
            hub.wait("the last checkpoint", time.monotonic() + max(timeout, 0.0), "hub_stop_timeout")
    accelerator.end_training()
    sys.exit(code)


def resume_hint(argv: list[str] | None, num_processes: int) -> str:
    args = list(sys.argv if argv is None else ["recipe/train.py", *argv])
    for i, arg in enumerate(args):  # the token is never printed, in either argument form
        if arg in ("--hub_token", "--hub-token") and i + 1 < len(args):
            args[i + 1] = "<your token>"
        elif arg.startswith(("--hub_token=", "--hub-token=")):
            args[i] = arg.split("=", 1)[0] + "=<your token>"
    command = " ".join(a for a in args if a)
    launcher = "accelerate launch <the same launch options> " if num_processes > 1 else "python "
    if "--resume_from_checkpoint auto" in command or "--resume_from_checkpoint=auto" in command:
        return f"{launcher}{command}"  # the same command resumes
    return f"{launcher}{command} --resume_from_checkpoint latest"


def bad_loss_message(step: int, output_dir) -> str:
    return (f"\nThe loss or the gradient norm became NaN or infinite at step {step}; stopping, nothing saved "
            f"since. The last good checkpoint stays in {output_dir}. Try a lower learning_rate or max_grad_norm.")  # fmt: skip


def stop_for_signal(accelerator: Accelerator, hub: HubPusher | None, stop: StopSignal, step: int, path, hint: str,
                    cfg) -> None:  # fmt: skip
    """A signal's stop, once its checkpoint is saved: the exit code 128 + the signal, the resume command, and
    what is left of the grace period (`cfg.hub_stop_timeout`) for the upload."""
    stop_run(accelerator, hub, 128 + (stop.received or signal.SIGTERM),
             f"\nStopped by signal at step {step}; saved {path}.\nResume with: {hint}",
             cfg.hub_stop_timeout - (time.monotonic() - (stop.at or time.monotonic())))  # fmt: skip
