"""Optimizers: AdamW alone or Muon (hidden matrices) + AdamW (the rest), every parameter in exactly one of
them, every parameter moving, states that resume exactly, and a clear refusal under FSDP."""

import copy
import io
import os

import pytest
import torch

from recipe.config import ConfigError, RunConfig
from recipe.optim import Muon, build_optimizers, hidden_matrices, make_schedule, newton_schulz

ARCH_OPTIM = [("gpt2", "adamw"), ("gpt2", "muon"), ("modern", "adamw"), ("modern", "muon")]


def run_config(optim: str, **overrides) -> RunConfig:
    return RunConfig(optim=optim, learning_rate=1e-2, warmup_steps=0, max_steps=10, **overrides)


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(seed))


def train_steps(model, optimizers, schedulers=(), steps: int = 2, seed: int = 0) -> None:
    model.train()
    for i in range(steps):
        x = batch(seed + i)
        model(x, labels=x).loss.backward()
        for opt in optimizers:
            opt.step()
        for sched in schedulers:
            sched.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)


def params_of(optimizers) -> list[torch.nn.Parameter]:
    return [p for opt in optimizers for group in opt.param_groups for p in group["params"]]


@pytest.mark.parametrize("architecture, optim", ARCH_OPTIM)
def test_every_parameter_is_in_exactly_one_optimizer(tiny_gpt, architecture, optim):
    model = tiny_gpt(architecture=architecture)
    optimizers = build_optimizers(model, run_config(optim), "cpu")
    owned = params_of(optimizers)
    assert len(owned) == len({id(p) for p in owned})  # nothing twice (the tied head is the embedding)
    assert {id(p) for p in owned} == {id(p) for p in model.parameters()}  # nothing left out
    if optim == "adamw":
        assert [type(o) for o in optimizers] == [torch.optim.AdamW]
        return
    assert [type(o) for o in optimizers] == [torch.optim.AdamW, Muon]
    muon = {id(p) for p in params_of(optimizers[1:])}
    names = {name for name, p in model.named_parameters() if id(p) in muon}
    expected = {name for name, p in model.named_parameters() if ".h." in name and p.ndim == 2}
    assert names == expected and all(
        n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for n in names
    )
    adamw = {name for name, p in model.named_parameters() if id(p) not in muon}
    assert "transformer.wte.weight" in adamw
    assert "lm_head.weight" in adamw or model.config.tie_word_embeddings  # tied: listed once, as wte


def test_untied_head_and_embeddings_stay_with_adamw(tiny_gpt):
    model = tiny_gpt(architecture="modern", tie_word_embeddings=False)
    hidden = {id(p) for p in hidden_matrices(model)}
    assert id(model.lm_head.weight) not in hidden and id(model.transformer.wte.weight) not in hidden


@pytest.mark.parametrize("architecture, optim", ARCH_OPTIM)
def test_every_parameter_moves(tiny_gpt, architecture, optim):
    # Two steps: the modern model's zero-initialised projections pass no gradient to what lies below them
    # until they have moved once.
    model = tiny_gpt(architecture=architecture)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizers = build_optimizers(model, run_config(optim), "cpu")
    train_steps(model, optimizers, steps=2)
    frozen = [name for name, p in model.named_parameters() if torch.equal(p, before[name])]
    assert frozen == []


@pytest.mark.parametrize("architecture, optim", ARCH_OPTIM)
def test_optimizer_and_schedule_states_resume_exactly(tiny_gpt, architecture, optim):
    cfg = run_config(optim)
    model = tiny_gpt(architecture=architecture)
    optimizers = build_optimizers(model, cfg, "cpu")
    schedulers = [make_schedule(opt, cfg) for opt in optimizers]
    train_steps(model, optimizers, schedulers, steps=3)

    # Save as accelerate does (torch.save), load as it does on resume (weights_only=True), into fresh objects.
    saved = []
    for obj in [*optimizers, *schedulers]:
        buffer = io.BytesIO()
        torch.save(obj.state_dict(), buffer)
        saved.append(buffer.getvalue())
    resumed = copy.deepcopy(model)
    fresh_optimizers = build_optimizers(resumed, cfg, "cpu")
    fresh_schedulers = [make_schedule(opt, cfg) for opt in fresh_optimizers]
    for obj, data in zip([*fresh_optimizers, *fresh_schedulers], saved):
        obj.load_state_dict(torch.load(io.BytesIO(data), weights_only=True))

    train_steps(model, optimizers, schedulers, steps=2, seed=10)
    train_steps(resumed, fresh_optimizers, fresh_schedulers, steps=2, seed=10)
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
    assert [s.get_last_lr() for s in fresh_schedulers] == [s.get_last_lr() for s in schedulers]


def test_muon_settings_come_from_the_run_config(tiny_gpt):
    cfg = run_config("muon", muon_learning_rate=0.05, muon_momentum=0.9, weight_decay=0.01)
    adamw, muon = build_optimizers(tiny_gpt(), cfg, "cpu")
    group = muon.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.05, 0.9, 0.01)
    assert group["adjust_lr_fn"] == "match_rms_adamw" and muon.ns_dtype == torch.float32
    assert adamw.param_groups[0]["lr"] == 1e-2
    assert build_optimizers(tiny_gpt(), run_config("muon"), "cpu")[1].param_groups[0]["lr"] == 1e-2  # default
    assert build_optimizers(tiny_gpt(), cfg, "cuda")[1].ns_dtype == torch.bfloat16


@pytest.mark.parametrize(
    "key, value", [("optim", "sgd"), ("muon_learning_rate", 0.0), ("muon_momentum", 1.0)]
)
def test_bad_optimizer_settings_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        RunConfig(**{key: value})


# --- Muon itself --------------------------------------------------------------------------------------


def test_our_muon_is_torch_muon_with_the_iteration_in_another_dtype():
    """With ns_dtype=bf16 our step must equal torch.optim.Muon's exactly (same maths, same state)."""
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(24, 16)), torch.nn.Parameter(torch.randn(16, 40))]
    ours_w = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    kwargs = dict(lr=0.02, weight_decay=0.1, momentum=0.9, adjust_lr_fn="match_rms_adamw")
    theirs, ours = torch.optim.Muon(weights, **kwargs), Muon(ours_w, ns_dtype=torch.bfloat16, **kwargs)
    for step in range(3):
        grads = [
            torch.randn(w.shape, generator=torch.Generator().manual_seed(step * 10 + i))
            for i, w in enumerate(weights)
        ]
        for w, v, g in zip(weights, ours_w, grads):
            w.grad, v.grad = g.clone(), g.clone()
        theirs.step()
        ours.step()
    for w, v in zip(weights, ours_w):
        torch.testing.assert_close(v, w, rtol=0, atol=0)
    assert ours.state_dict()["state"][0]["momentum_buffer"].equal(
        theirs.state_dict()["state"][0]["momentum_buffer"]
    )


@pytest.mark.parametrize("shape", [(32, 96), (96, 32)])
def test_newton_schulz_in_fp32_orthogonalises(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    out = newton_schulz(g)
    assert out.dtype == torch.float32 and out.shape == shape
    singular = torch.linalg.svdvals(out)
    assert singular.min() > 0.5 and singular.max() < 1.3  # U S' V^T with S' near 1 (Keller Jordan's quintic)
    reference = newton_schulz(g.double(), dtype=torch.float64).float()
    assert (out - reference).abs().max() < 1e-5  # fp32, not bf16 (whose error here is ~1e-2)
    assert (newton_schulz(g, dtype=torch.bfloat16) - reference).abs().max() > 1e-3


# --- FSDP: refused at start-up ------------------------------------------------------------------------


def test_muon_refuses_fsdp_from_the_launcher_environment(tiny_gpt, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="FSDP"):
        build_optimizers(tiny_gpt(), run_config("muon"), "cpu")
    assert len(build_optimizers(tiny_gpt(), run_config("adamw"), "cpu")) == 1


def test_muon_refuses_a_model_sharded_with_fully_shard(tiny_gpt, tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model = tiny_gpt(architecture="modern")
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        with pytest.raises(ConfigError, match="FSDP"):
            build_optimizers(model, run_config("muon"), "cpu")
    finally:
        dist.destroy_process_group()


# --- DDP: gradients are averaged before the step, so Muon sees whole, identical matrices on every rank; ---
# each rank orthogonalises its share of them and gathers the rest


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    import recipe.optim
    from recipe import GPTConfig, GPTForCausalLM

    torch.set_num_threads(1)
    orthogonalised = []  # the stacks this rank's Newton-Schulz saw: (N, m, n)
    plain = recipe.optim.newton_schulz_batched

    def recording(stack, *args):
        orthogonalised.append(tuple(stack.shape))
        return plain(stack, *args)

    recipe.optim.newton_schulz_batched = recording
    # The node torchrun's agent names (one host name here): each rank a node of its own, or both one node.
    os.environ["GROUP_RANK"] = str(rank) if os.environ.get("TEST_ONE_NODE_PER_RANK") else "0"
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    config = GPTConfig(
        architecture="modern", vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4
    )
    model = GPTForCausalLM(config)
    optimizers = build_optimizers(model, run_config("muon"), "cpu", num_processes=world)
    ddp = DistributedDataParallel(model)
    for step in range(2):
        x = batch(step)[rank * 2 : rank * 2 + 2]  # each rank its half of the batch
        ddp(x, labels=x).loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    torch.save({"weights": model.state_dict(), "orthogonalised": orthogonalised}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("per_node", [2, 1])
def test_muon_under_ddp_equals_one_process_on_the_whole_batch(tmp_path, monkeypatch, per_node):
    """2 processes on a node share the Newton-Schulz; 1 process per node (the launcher's GROUP_RANK, on one
    host) does all of it itself (a network gather would cost more than it saves)."""
    import torch.multiprocessing as mp

    monkeypatch.setenv("TEST_ONE_NODE_PER_RANK", "1" if per_node == 1 else "")

    from recipe import GPTConfig, GPTForCausalLM

    # fork: the children start with torch and recipe already imported (spawn would re-import them, ~10 s)
    mp.start_processes(
        _ddp_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, start_method="fork"
    )
    saved = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    ranks = [s["weights"] for s in saved]

    torch.manual_seed(0)
    config = GPTConfig(
        architecture="modern", vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4
    )
    model = GPTForCausalLM(config)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    optimizers = build_optimizers(model, run_config("muon"), "cpu")
    train_steps(model, optimizers, steps=2)  # the whole batch of 4
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0, msg=name)  # in step
        torch.testing.assert_close(ranks[0][name], value, rtol=1e-4, atol=1e-5, msg=name)  # and right
        assert not torch.equal(value, initial[name]), name
    # Shared: each rank orthogonalised half of each param group's matrices (or row blocks, split) of each
    # shape per step; alone on its node: all of them.
    stacks = []
    for group in optimizers[1].param_groups:
        k, blocks = group.get("split", 1), {}
        for p in group["params"]:
            shape = (p.shape[0] // k, p.shape[1])
            blocks[shape] = blocks.get(shape, 0) + k
        stacks += [(n if per_node == 1 else -(-n // 2), *shape) for shape, n in blocks.items()]
    for s in saved:
        assert sorted(s["orthogonalised"]) == sorted(stacks * 2)


def test_batched_muon_equals_the_per_matrix_update():
    """Same-shape matrices stacked into one batched iteration: the same update as one matrix at a time."""
    shapes = [(24, 16), (16, 40), (24, 16), (16, 16), (16, 40), (24, 16)]
    weights = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    kwargs = dict(lr=0.02, weight_decay=0.1, momentum=0.9, adjust_lr_fn="match_rms_adamw")
    old_w = [torch.nn.Parameter(w.clone()) for w in weights]
    new_w = [torch.nn.Parameter(w.clone()) for w in weights]
    old, new = Muon(old_w, batched=False, **kwargs), Muon(new_w, batched=True, **kwargs)
    for step in range(4):
        for i, (v, w) in enumerate(zip(old_w, new_w)):
            g = torch.randn(v.shape, generator=torch.Generator().manual_seed(100 * step + i))
            v.grad, w.grad = g.clone(), g.clone()
        old.step()
        new.step()
    for v, w in zip(old_w, new_w):
        torch.testing.assert_close(w, v, rtol=0, atol=1e-6)
    for a, b in zip(old.state_dict()["state"].values(), new.state_dict()["state"].values()):
        torch.testing.assert_close(b["momentum_buffer"], a["momentum_buffer"], rtol=0, atol=1e-6)


def muon_steps(weights, steps: int = 3, **kwargs) -> tuple[list[torch.nn.Parameter], Muon]:
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = Muon(params, lr=0.02, weight_decay=0.1, momentum=0.9, adjust_lr_fn="match_rms_adamw", **kwargs)
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))
        opt.step()
    return params, opt


def test_compiled_muon_equals_the_per_matrix_update():
    """One compiled Newton-Schulz per shape (fp32 on a CPU): the update of today's per-matrix iteration."""
    torch._dynamo.reset()
    shapes = [(24, 16), (16, 40), (24, 16), (16, 40)]
    weights = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    from torch._dynamo.utils import counters

    counters.clear()
    compiled, _ = muon_steps(weights, compiled=True)
    graphs = counters["stats"]["unique_graphs"]
    per_matrix, _ = muon_steps(weights, batched=False)
    assert graphs == 2  # one per shape, reused by every step
    for a, b in zip(compiled, per_matrix):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_split_muon_orthogonalises_each_block_as_its_own_matrix():
    """`split` 3: a (3m, n) matrix's update is the three (m, n) blocks' updates side by side."""
    fused = torch.randn(48, 16, generator=torch.Generator().manual_seed(0))
    params = [torch.nn.Parameter(fused.clone())]
    opt = Muon([{"params": params, "split": 3}], lr=0.02, weight_decay=0.1, momentum=0.9, adjust_lr_fn="match_rms_adamw")  # fmt: skip
    blocks = [torch.nn.Parameter(b.clone()) for b in fused.chunk(3)]
    apart = Muon(blocks, lr=0.02, weight_decay=0.1, momentum=0.9, adjust_lr_fn="match_rms_adamw")
    for step in range(3):
        g = torch.randn(48, 16, generator=torch.Generator().manual_seed(step))
        params[0].grad = g.clone()
        for b, gb in zip(blocks, g.chunk(3)):
            b.grad = gb.clone()
        opt.step()
        apart.step()
    torch.testing.assert_close(params[0].detach(), torch.cat([b.detach() for b in blocks]), rtol=0, atol=1e-6)
    whole, _ = muon_steps([fused])
    assert not torch.allclose(whole[0], params[0], atol=1e-4)  # orthogonalised whole, it is another update


def test_split_groups_follow_the_fused_matrices(tiny_gpt):
    model = tiny_gpt(architecture="modern")
    muon = build_optimizers(model, run_config("muon", muon_split_fused=True), "cpu")[1]
    by_split = {g["split"]: {id(p) for p in g["params"]} for g in muon.param_groups}
    block = model.transformer.h[0]
    assert id(block.attn.c_attn.weight) in by_split[3] and id(block.mlp.c_fc.weight) in by_split[2]
    assert id(block.attn.c_proj.weight) in by_split[1] and id(block.mlp.c_proj.weight) in by_split[1]
