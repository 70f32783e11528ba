"""Replicas that stay replicas: under DDP every process holds the whole model, and only rank 0's copy is
saved. A fingerprint of every process's weights is compared at every evaluation and before every save, so
replicas that drifted apart end the run before rank 0's copy is saved as everyone's."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from recipe.stopping import stop_run

if TYPE_CHECKING:
    from recipe.hub import HubPusher

_INTS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def weights_checksum(model: torch.nn.Module) -> torch.Tensor:
    """The weights' bits summed as integers, a 0-d int64 on their device: exact and order-free on any device
    (NaN weights compare too), one pass over the weights without a copy of them."""
    with torch.no_grad():
        return torch.stack(
            [
                p.detach().contiguous().view(_INTS[p.element_size()]).sum(dtype=torch.int64)
                for p in model.parameters()
            ]
        ).sum()


def check_replicas(
    accelerator: Accelerator, model, step: int, hub: HubPusher | None, output_dir: Path
) -> None:
    """Every process holds the same weights at `step`, or the run ends here in one line, before anything is
    saved (a collective: every process calls it at the same steps). One int64 per process is gathered.
    Under FSDP each process holds its own shard (fully_shard on a 1-D mesh: nothing is replicated), so there
    is nothing to compare; with one process neither."""
    if accelerator.num_processes == 1 or accelerator.distributed_type == DistributedType.FSDP:
        return
    every = accelerator.gather(weights_checksum(model).view(1)).tolist()  # (processes,)
    differ = [rank for rank, checksum in enumerate(every) if checksum != every[0]]
    if differ:
        stop_run(accelerator, hub, 1, f"\nThe processes' weights differ at step {step}: process(es) {differ} hold "
                 f"other weights than process 0 (a sum of their bits); stopping before anything is saved. The last "
                 f"good checkpoint stays in {output_dir}.")  # fmt: skip
