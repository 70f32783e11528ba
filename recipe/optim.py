"""Parameter groups, the optimizers (AdamW, or Muon + AdamW) and the learning-rate schedule (warmup, then
cosine to a floor)."""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import torch
from transformers import get_cosine_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

from recipe.config import ConfigError, RunConfig


def param_groups(
    model: torch.nn.Module, weight_decay: float, skip: list[torch.nn.Parameter] | None = None
) -> list[dict[str, Any]]:
    """Decay the matmul weights only: biases, LayerNorm gains and embeddings are left alone (GPT-2/3).
    Parameters in `skip` (those another optimizer owns) are left out."""
    no_decay_types = (torch.nn.Embedding, torch.nn.LayerNorm)
    decay, no_decay, seen = [], [], {id(p) for p in skip or []}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue  # the tied LM head is the embedding: counted once, undecayed
            seen.add(id(p))
            (
                no_decay if isinstance(module, no_decay_types) or name == "bias" or p.ndim < 2 else decay
            ).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def hidden_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The 2-D weights of the hidden `nn.Linear` layers: what Muon trains. Embeddings, the LM head (tied or
    not), norm gains and biases stay with AdamW (Muon's orthogonalised update suits hidden maps only)."""
    model = getattr(model, "module", model)  # a DDP wrapper: look at the model inside
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    not_hidden = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    if head is not None:
        not_hidden.add(id(head.weight))
    found, seen = [], set()
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        p = module.weight
        if p.requires_grad and p.ndim == 2 and id(p) not in not_hidden and id(p) not in seen:
            seen.add(id(p))
            found.append(p)
    return found


def newton_schulz(grad: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype=torch.float32) -> torch.Tensor:
    """Approximately orthogonalise a 2-D matrix (U S V^T -> U S' V^T, S' ~ 1), Keller Jordan's quintic
    iteration as in `torch.optim.Muon`, but in `dtype`: torch's casts to bf16, which is ~20x slower on CPUs
    without native bf16 (HF_NOTES section 12)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = grad.to(dtype)
    transposed = grad.size(0) > grad.size(1)
    if transposed:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if transposed else x).to(grad.dtype)


def newton_schulz_batched(
    grads: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype=torch.float32, out_dtype=None
) -> torch.Tensor:
    """`newton_schulz` on a stack of same-shape matrices (N, m, n) at once: one batched matmul per iteration
    instead of N small ones (nanochat's optim.py does the same, per shape). Returns `out_dtype` (default: the
    input's)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = grads.to(dtype)
    transposed = grads.size(-2) > grads.size(-1)
    if transposed:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.mT if transposed else x).to(out_dtype or grads.dtype)


@functools.cache
def compiled_newton_schulz():
    """`newton_schulz_batched` compiled: one graph per shape (a handful per model), not the dynamic-shape one
    torch.compile switches to on a second shape."""
    return torch.compile(newton_schulz_batched, dynamic=False, fullgraph=True)


class Muon(torch.optim.Muon):
    """`torch.optim.Muon` (same hyperparameters, state and `state_dict`) with the Newton-Schulz iteration run
    in `ns_dtype`: fp32 on CPU, bf16 on GPUs. torch's `step` has no hook for the iteration, so it is redone
    here; the maths is torch's (Nesterov momentum, decoupled weight decay, `adjust_lr_fn` scaling).

    - `batched` (default): the updates of same-shape matrices are stacked and orthogonalised by one batched
      iteration per shape; otherwise one matrix at a time. State per parameter (`momentum_buffer`) either way.
    - `compiled`: that batched iteration runs as one torch.compile graph per shape.
    - `distributed`: each process orthogonalises its share of each shape's stack and the processes of one
      node all-gather the results (nanochat and modded-nanogpt share among all), instead of every process
      doing all of it. Needs the same gradients on every process, as DDP leaves them. The update equals one
      process's (bitwise in fp32 in the tests; within bf16 rounding on GPUs). Not across nodes: at 124M the
      iteration is ~3 ms per step on an H100, while gathering its ~230 MB of bf16 updates over a network
      would take longer than that; over NVLink it is well under it. Nodes of unequal size share among all
      processes instead (`sharing_groups`).
    - a param group's `split` k (fused matrices: q, k, v in `c_attn`; gate, up in `c_fc`): its matrices are
      orthogonalised as k row blocks, each as if it were its own matrix (as nanochat and modded-nanogpt do)."""

    def __init__(self, params, ns_dtype: torch.dtype = torch.float32, batched: bool = True,
                 compiled: bool = False, distributed: bool = False, **kwargs):  # fmt: skip
        super().__init__(params, **kwargs)
        # Properties of the machine and launch, not of the run: none of them is in the state.
        self.ns_dtype, self.batched = ns_dtype, batched
        self.group = node_group() if distributed else None  # None: this process orthogonalises everything
        self.newton_schulz = compiled_newton_schulz() if compiled else newton_schulz_batched
        for group in self.param_groups:
            for p in group["params"]:
                if p.shape[0] % group.get("split", 1):
                    raise ValueError(
                        f"Muon: {tuple(p.shape)} does not split into {group['split']} row blocks"
                    )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, split = float(group["lr"]), group["momentum"], group.get("split", 1)
            params, updates = [], []
            for p in group["params"]:  # 1. momentum, per parameter
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                params.append(p)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                updates.extend(update.chunk(split))  # k row blocks: views
            updates = self._orthogonalise(updates, group["ns_steps"], group["eps"])  # 2. Newton-Schulz
            for i, p in enumerate(params):  # 3. decay and apply
                update = torch.cat(updates[i * split : (i + 1) * split]) if split > 1 else updates[i]
                rows, cols = p.shape[0] // split, p.shape[1]  # the scale of one block
                if group["adjust_lr_fn"] == "match_rms_adamw":  # update RMS ~ AdamW's: reuse its lr and decay
                    scale = 0.2 * math.sqrt(max(rows, cols))
                else:  # "original" (Keller Jordan)
                    scale = math.sqrt(max(1.0, rows / cols))
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update, alpha=-lr * scale)
        return loss

    def _orthogonalise(self, updates: list[torch.Tensor], steps: int, eps: float) -> list[torch.Tensor]:
        if not self.batched:
            return [newton_schulz(u, steps, eps, self.ns_dtype) for u in updates]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, u in enumerate(updates):
            by_shape.setdefault(tuple(u.shape), []).append(i)
        out: list[torch.Tensor] = [None] * len(updates)  # type: ignore[list-item]
        for indices in by_shape.values():
            stacked = torch.stack([updates[i] for i in indices])  # (N, m, n)
            if self.group is not None:
                stacked = self._share_and_gather(stacked, steps, eps)
            else:
                stacked = self.newton_schulz(stacked, steps, eps, self.ns_dtype)
            for i, o in zip(indices, stacked.unbind(0)):
                out[i] = o
        return out

    def _share_and_gather(self, stacked: torch.Tensor, steps: int, eps: float) -> torch.Tensor:
        """This process orthogonalises matrices [rank * k, (rank + 1) * k) of the N (k = ceil(N / world),
        the stack padded with zeros to world * k), then every process gathers all of them, in ns_dtype (bf16
        on GPUs: half the bytes of the fp32 updates)."""
        import torch.distributed as dist

        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        n, k = stacked.shape[0], -(-stacked.shape[0] // world)
        padded = torch.cat([stacked, stacked.new_zeros((world * k - n, *stacked.shape[1:]))]) if world * k > n else stacked  # fmt: skip
        mine = self.newton_schulz(padded[rank * k : (rank + 1) * k], steps, eps, self.ns_dtype, self.ns_dtype)
        gathered = mine.new_empty((world * k, *stacked.shape[1:]))
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch < 2.13
        all_gather(gathered, mine.contiguous(), group=self.group)
        return gathered[:n].to(stacked.dtype)


def refuse_sharded(model: torch.nn.Module) -> None:
    """Muon orthogonalises whole matrices; under FSDP each rank holds a shard, so it would orthogonalise
    shards (a different, wrong update). Refuse at start-up instead."""
    from torch.distributed.tensor import DTensor

    fsdp_env = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    if fsdp_env or any(isinstance(p, DTensor) for p in model.parameters()):
        raise ConfigError(
            "optim: muon is not supported with FSDP (it orthogonalises whole matrices, FSDP shards them); "
            "use optim: adamw with FSDP, or DDP (accelerate launch --multi_gpu) with muon"
        )


def node_group():
    """The processes this one shares the Newton-Schulz with, as a process group: its node's, or the whole
    world's (one node, or nodes of unequal size), or None where it does all of it itself (one process per
    node). A collective every process calls in the same order.

    A node is what the launcher says it is: torchrun's agent (also under `accelerate launch`, which runs it)
    gives each process its node's GROUP_RANK, so two launches on one host are two nodes; without it (mpirun)
    the host name decides. Every rank's node is gathered once, so every rank takes the same decision."""
    import socket

    import torch.distributed as dist

    mine = f"node {os.environ['GROUP_RANK']}" if "GROUP_RANK" in os.environ else socket.gethostname()
    nodes: list[str] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(nodes, mine)
    groups = sharing_groups(nodes)
    if len(groups) == 1:
        if len(set(nodes)) > 1 and dist.get_rank() == 0:
            sizes = sorted({nodes.count(node) for node in nodes})
            print(f"Muon: the nodes run {' and '.join(map(str, sizes))} processes; the Newton-Schulz is shared "
                  f"by all {len(nodes)} processes (a gather across nodes every step), so every replica "
                  "applies the same update")  # fmt: skip
        return dist.group.WORLD
    if len(groups[0]) == 1:
        return None
    group, _ = dist.new_subgroups_by_enumeration(groups)
    return group


def sharing_groups(nodes: list[str]) -> list[list[int]]:
    """The ranks that share each Newton-Schulz, from every rank's node (`nodes[rank]`): each node's ranks
    where every node runs as many processes (the i-th process of each node then orthogonalises the same
    slice, the same shapes: the same bits everywhere), otherwise all ranks. A node of 1 would orthogonalise
    whole stacks where a node of 2 does halves, and batched kernels and compiled graphs are chosen by shape:
    they may round differently, and the replicas would drift apart. Shared by all, each update is computed
    once and gathered by every process: the same bits by construction, for a gather across nodes in a
    layout that is rare (a refusal would stop a launch that trains correctly)."""
    by_node: dict[str, list[int]] = {}
    for rank, node in enumerate(nodes):
        by_node.setdefault(node, []).append(rank)
    groups = list(by_node.values())
    return groups if len({len(g) for g in groups}) == 1 else [list(range(len(nodes)))]


def fused_blocks(model: torch.nn.Module) -> dict[int, int]:
    """id(weight) -> row blocks of our fused matrices: `c_attn` holds q, k, v (3); a gated `c_fc` gate and up
    (2). Found by the modules' attributes, so a model loaded from a folder's own code counts too."""
    model = getattr(model, "module", model)
    blocks = {}
    for module in model.modules():
        if hasattr(module, "c_attn") and hasattr(module, "num_heads"):
            blocks[id(module.c_attn.weight)] = 3
        if getattr(module, "gated", False) and hasattr(module, "c_fc"):
            blocks[id(module.c_fc.weight)] = 2
    return blocks


def muon_param_groups(params: list[torch.nn.Parameter], model: torch.nn.Module, split: bool) -> list[dict]:
    """One group, or with `split` one per number of row blocks (Muon's `split`)."""
    if not split:
        return [{"params": params}]
    blocks = fused_blocks(model)
    groups: dict[int, list[torch.nn.Parameter]] = {}
    for p in params:
        groups.setdefault(blocks.get(id(p), 1), []).append(p)
    return [{"params": ps, "split": k} for k, ps in sorted(groups.items())]


def optimizer_groups(model: torch.nn.Module, cfg: RunConfig) -> list[list[dict[str, Any]]]:
    """The param groups of each optimizer `build_optimizers` makes: [AdamW's] or [AdamW's, Muon's]. A resume
    compares their sizes with the checkpoint's saved optimizers before loading them."""
    muon_params = hidden_matrices(model) if cfg.optim == "muon" else []
    groups = [param_groups(model, cfg.weight_decay, skip=muon_params)]
    if cfg.optim == "muon":
        groups.append(muon_param_groups(muon_params, model, cfg.muon_split_fused))
    return groups


def build_optimizers(model: torch.nn.Module, cfg: RunConfig, device_type: str, num_processes: int = 1) -> list[torch.optim.Optimizer]:  # fmt: skip
    """The optimizers of a run, each to be passed to `accelerator.prepare` on its own (a wrapper around
    several stops stepping once prepared), each with its own scheduler.

    `optim: adamw`: one AdamW for everything. `optim: muon`: [AdamW for embeddings, LM head, gains and
    biases; Muon for the hidden matrices]. Every trainable parameter is in exactly one optimizer.
    Fused AdamW on CUDA, foreach elsewhere. Muon's Newton-Schulz is compiled with the model (torch_compile)
    and, with several (DDP) processes, shared out among them."""
    fused = device_type == "cuda"
    if cfg.optim == "muon":
        refuse_sharded(model)
    adamw_groups, *muon_groups = optimizer_groups(model, cfg)
    adamw = torch.optim.AdamW(
        adamw_groups,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        fused=fused or None,
        foreach=None if fused else True,
    )
    if cfg.optim != "muon":
        return [adamw]
    muon = Muon(
        muon_groups[0],
        ns_dtype=torch.bfloat16 if device_type == "cuda" else torch.float32,
        compiled=cfg.torch_compile,
        distributed=num_processes > 1,  # FSDP and DeepSpeed were refused: several processes are DDP
        lr=cfg.muon_learning_rate or cfg.learning_rate,
        momentum=cfg.muon_momentum,
        weight_decay=cfg.weight_decay,
        adjust_lr_fn="match_rms_adamw",
    )
    return [adamw, muon]


def make_schedule(optimizer: torch.optim.Optimizer, cfg: RunConfig):
    """Linear warmup, then cosine down to `min_lr_ratio` of the peak (0: down to zero).

    Stepped once per optimizer step (train.py's Accelerator(step_scheduler_with_optimizer=False)), so its
    horizon is max_steps at any process count; a scheduler stepped by accelerate with the optimizer would
    step once per process per step (HF_NOTES section 9)."""
    if cfg.min_lr_ratio > 0:
        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, cfg.warmup_steps, cfg.max_steps, min_lr_rate=cfg.min_lr_ratio
        )
    return get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)


def schedule_curve(cfg: RunConfig) -> tuple[list[int], list[float]]:
    """The whole learning-rate schedule, step by step, for lr.png (independent of what was logged)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.learning_rate)
    sched = make_schedule(opt, cfg)
    steps, lrs = [], []
    for step in range(cfg.max_steps):
        steps.append(step + 1)
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return steps, lrs
