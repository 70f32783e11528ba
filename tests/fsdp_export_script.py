"""Run by tests/test_gpu_paths.py under `torchrun --nproc_per_node 2`: our GPT sharded with torch's
`fully_shard` (FSDP2, as accelerate's FSDP2 plugin shards it) on a gloo CPU mesh, saved with the project's
own export path. accelerate refuses FSDP without GPUs, so this is the nearest run of that path on a CPU.

    torchrun --nproc_per_node 2 tests/fsdp_export_script.py OUT
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from recipe import GPTConfig, GPTForCausalLM
from recipe.checkpoint import save_model_folder

out = Path(sys.argv[1])
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
config = GPTConfig(
    vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64
)
model = GPTForCausalLM(config).eval()
ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
if rank == 0:
    with torch.no_grad():
        save_file({"ids": ids, "logits": model(ids).logits.contiguous()}, str(out / "reference.safetensors"))

mesh = init_device_mesh("cpu", (world,))
for block in model.transformer.h:  # as the plugin wraps each _no_split_modules block, then the root
    fully_shard(block, mesh=mesh)
fully_shard(model, mesh=mesh)
with torch.no_grad():
    sharded_logits = model(ids).logits  # the sharded model runs (all-gathers)

saved = save_model_folder(model, out / "model", None, is_main=rank == 0)
if rank == 0:
    assert type(saved).__name__ == "GPTForCausalLM", type(saved)
    assert torch.allclose(saved(ids).logits, sharded_logits, atol=1e-5)

# Downstream scoring (recipe.downstream.scoring) of a compiled FSDP2 model, wrapped as accelerate 1.16 wraps
# one: compiled first, then the blocks and the compiled wrapper sharded (FSDP's hooks outside the compiled
# code). It must run eagerly inside those wrappers and equal the unsharded model's scores; 7 items of 4
# choices in batches of 10 sequences give the processes 2 rounds each, the second rank's last one a spare.
from recipe.downstream.data import EncodedTask, Item  # noqa: E402
from recipe.downstream.scoring import loglikelihoods  # noqa: E402
from recipe.downstream.tasks import TASKS  # noqa: E402

torch.manual_seed(0)
twin = GPTForCausalLM(config).eval()
tokens = torch.randint(0, 97, (7, 4, 30), generator=torch.Generator().manual_seed(2)).tolist()
items = [EncodedTask(TASKS["hellaswag"], [Item([(t[: 12 + i + e], 3 + e) for e, t in enumerate(four)], i % 4, [5, 9, 7, 8], 64)
         for i, four in enumerate(tokens)])]  # fmt: skip
reference = loglikelihoods(twin, items, batch_size=10)[0]
compiled = torch.compile(twin, backend="eager")
for block in twin.transformer.h:
    fully_shard(block, mesh=mesh)
fully_shard(compiled, mesh=mesh)
scored = loglikelihoods(compiled, items, batch_size=10)[0]
assert torch.allclose(scored, reference, atol=1e-5), (scored - reference).abs().max()
print(f"rank {rank} scored downstream items under FSDP2 + compile", flush=True)

dist.barrier()
print(f"rank {rank} reached the end", flush=True)
dist.destroy_process_group()
