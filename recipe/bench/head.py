"""The chunked head against the head it replaced: peak memory and training-step speed, side by side.

    python -m recipe.bench.head [--rounds 3] [--skip memory,speed]     # also a section of `make bench`

- memory: one training step (forward, backward) and one evaluation forward (no_grad, `token_scores`) of a
  2-layer modern model, hidden 768, vocabulary 50,304, at 2 x 1024 tokens in fp32, eager: the peak above the
  model's own memory (on a CPU the process's resident high-water mark, reset just before; on a GPU
  max_memory_allocated), each in a fresh process; "before" is the previous loss (logits for the whole batch,
  logsumexp minus the target logit: c290098's `causal_lm_loss`) and the previous evaluation (full logits,
  cross-entropy and argmax over them).
- speed: a training step (forward, backward, AdamW) at the default shape and at a 124M shape (GPT-2 124M's
  hidden size, heads and vocabulary, fewer layers on a CPU), eager and compiled, chunked and before,
  interleaved rounds, median tokens/s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from recipe import GPTConfig, GPTForCausalLM

MEMORY_SHAPE = dict(architecture="modern", hidden_size=768, num_hidden_layers=2, num_attention_heads=12,
                    vocab_size=50304, max_position_embeddings=1024)  # fmt: skip


def full_logits_loss(model: GPTForCausalLM, input_ids, shift_labels, num_items_in_batch=None) -> torch.Tensor:
    """The loss before the chunked head: the whole (B, T, V) logits, then logsumexp minus the target logit."""
    hidden = model.transformer(input_ids, use_cache=False).last_hidden_state
    logits = model.lm_head(hidden).flatten(0, 1)  # (B*T, V)
    targets = shift_labels.flatten()
    keep = targets.ne(-100)
    target_logits = logits.gather(1, targets.masked_fill(~keep, 0).unsqueeze(1)).squeeze(1)
    nll = torch.where(keep, torch.logsumexp(logits.float(), dim=-1) - target_logits.float(), 0.0)
    return nll.sum() / (keep.sum() if num_items_in_batch is None else num_items_in_batch)


def training_loss(model, kind: str, x, y) -> torch.Tensor:
    if kind == "before":
        return full_logits_loss(model, x, y)
    return model(input_ids=x, shift_labels=y, skip_logits=True).loss


@torch.no_grad()
def evaluation(model, kind: str, x, y) -> None:
    """One evaluation batch as scoring.evaluate scores it, before and now."""
    if kind == "before":
        logits = model(input_ids=x, use_cache=False).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")
        logits.argmax(-1)
    else:
        model(input_ids=x, shift_labels=y, token_scores=True, use_cache=False)


def _rss_peak_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the resident high-water mark (VmHWM)
        f.write("5")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure_one(kind: str, what: str, device: str, batch: int, shape: dict) -> float:
    """MiB above the model's own memory at the peak of one step (`what`: train or eval), this process."""
    torch.manual_seed(0)
    model = GPTForCausalLM(GPTConfig(**shape)).to(device)
    x = torch.randint(0, shape["vocab_size"], (batch, shape["max_position_embeddings"]), device=device)
    y = torch.randint(0, shape["vocab_size"], x.shape, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _status_kib("VmRSS") * 1024
        _rss_peak_reset()
    if what == "train":
        training_loss(model.train(), kind, x, y).backward()
    else:
        evaluation(model.eval(), kind, x, y)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kib("VmHWM") * 1024
    return (peak - base) / 2**20


def bench_memory(device: str = "cpu", batch: int = 2, shape: dict | None = None) -> dict[str, float]:
    """Each (before | chunked) x (train | eval) in a fresh process, so no peak or cache carries over."""
    out = {}
    for what in ("train", "eval"):
        for kind in ("before", "chunked"):
            code = (
                "import json, sys; from recipe.bench.head import measure_one; "
                "print(json.dumps(measure_one(*json.loads(sys.argv[1]))))"
            )
            arg = json.dumps([kind, what, device, batch, shape or MEMORY_SHAPE])
            run = subprocess.run(
                [sys.executable, "-c", code, arg], capture_output=True, text=True, check=True
            )
            out[f"{what}-{kind}"] = json.loads(run.stdout.strip().splitlines()[-1])
    return out


class HeadStep:
    """A training step (forward, backward, AdamW) with the head `kind`, eager or compiled, on fixed tokens."""

    def __init__(self, shape: dict, batch: int, kind: str, compiled: bool, device: str = "cpu",
                 autocast: torch.dtype | None = None):  # fmt: skip
        torch.manual_seed(0)
        self.autocast = autocast
        self.model = GPTForCausalLM(GPTConfig(**shape)).to(device).train()
        self.kind = kind
        self.loss = torch.compile(training_loss, fullgraph=False) if compiled else training_loss
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, foreach=True)
        self.x = torch.randint(
            0, shape["vocab_size"], (batch, shape["max_position_embeddings"]), device=device
        )
        self.y = torch.randint(0, shape["vocab_size"], self.x.shape, device=device)
        self.device = device

    def step(self) -> float:
        with torch.autocast(
            self.device, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None
        ):
            loss = self.loss(self.model, self.kind, self.x, self.y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def tokens_per_second(self, steps: int) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        if self.device == "cuda":
            torch.cuda.synchronize()
        return self.x.numel() * steps / (time.perf_counter() - start)


def bench_speed(shapes: dict[str, tuple[dict, int]], rounds: int, steps: int, device: str = "cpu") -> dict:
    """{shape: {variant: median tokens/s}}, the four variants of a shape interleaved in rounds."""
    from recipe.bench.speed import interleave

    results = {}
    for name, (shape, batch) in shapes.items():
        runs = {
            f"{mode}-{kind}": HeadStep(shape, batch, kind, mode == "compiled", device)
            for mode in ("eager", "compiled")
            for kind in ("before", "chunked")
        }
        for r in runs.values():  # warm-up: the compile, the allocator
            r.step()
            r.step()
        results[name] = interleave(
            {k: (lambda r=r: r.tokens_per_second(steps)) for k, r in runs.items()}, rounds
        )
        del runs
    return results


def bench_gpu(config: str, batches: tuple[int, ...], rounds: int, steps: int, device: str = "cuda") -> dict:
    """On one GPU, `config`'s model (bf16 autocast, fused AdamW): for each head (before | chunked), compiled at
    each micro-batch and eager at the first, the peak memory of a step (max_memory_allocated above what was
    allocated before the variant was built: its weights, AdamW state and gradients included) and tokens/s
    (interleaved rounds, median). Per-token memory from the two micro-batches gives the largest that fits.
    `device="cpu"` rehearses the code path (no memory figures)."""
    cuda = device == "cuda"
    allocated = torch.cuda.memory_allocated if cuda else (lambda: 0)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    from recipe.bench.speed import interleave
    from recipe.config import load_config

    cfg = load_config(["--config", config])
    shape = dict(architecture=cfg.architecture, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                 num_attention_heads=cfg.num_attention_heads, vocab_size=cfg.vocab_size,
                 max_position_embeddings=cfg.block_size)  # fmt: skip
    plan = [(kind, True, b) for b in batches for kind in ("before", "chunked")]
    plan += [(kind, False, batches[0]) for kind in ("before", "chunked")]
    runs, memory = {}, {}
    for kind, compiled, batch in plan:
        key = f"{'compiled' if compiled else 'eager'}-{kind}-mb{batch}"
        base = allocated()
        try:
            run = HeadStep(shape, batch, kind, compiled, device, torch.bfloat16)
            t = time.perf_counter()
            run.step()
            run.step()
            sync()
            warm = time.perf_counter() - t
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            run.step()
            sync()
            memory[key] = ((torch.cuda.max_memory_allocated() if cuda else 0) - base) / 2**30
            runs[key] = run
            print(f"bench-head: {key}: warm-up {warm:.1f} s, peak {memory[key]:.2f} GiB", flush=True)
        except torch.OutOfMemoryError as err:
            memory[key] = f"out of memory: {err}"[:200]
            print(f"bench-head: {key}: out of memory", flush=True)
        if cuda:
            torch.cuda.empty_cache()
    speed = interleave({k: (lambda r=r: r.tokens_per_second(steps)) for k, r in runs.items()}, rounds)
    fits = {}
    for kind in ("before", "chunked"):
        low, high = (memory.get(f"compiled-{kind}-mb{b}") for b in batches[:2])
        if isinstance(low, float) and isinstance(high, float) and high > low:
            per_sequence = (high - low) / (batches[1] - batches[0])  # GiB per sequence of block_size tokens
            fixed = low - per_sequence * batches[0]
            fits[kind] = {"gib_per_1k_tokens": per_sequence * 1024 / cfg.block_size, "fixed_gib": fixed,
                          "largest_micro_batch_80gb": int((80 * 1e9 / 2**30 - fixed) // per_sequence)}  # fmt: skip
    return {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "config": config,
            "memory_gib": memory, "tokens_per_s": speed, "fits": fits}  # fmt: skip


def cpu_shapes(cfg) -> dict[str, tuple[dict, int]]:
    """The default run's shape, and GPT-2 124M's width and vocabulary at 2 layers and 1 x 1024 tokens."""
    default = dict(architecture=cfg.architecture, hidden_size=cfg.hidden_size,
                   num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                   vocab_size=cfg.vocab_size, max_position_embeddings=cfg.block_size)  # fmt: skip
    wide = {**MEMORY_SHAPE, "architecture": cfg.architecture}
    return {"default": (default, cfg.per_device_train_batch_size), "124M width, 2 layers": (wide, 1)}


def tables(memory: dict | None, speed: dict | None, what: str) -> list[str]:
    lines = [f"### Chunked head vs the whole logits ({what})", ""]
    if memory:
        lines += ["Peak above the model, 2-layer modern, hidden 768, vocab 50,304, 2 x 1024 tokens, fp32, eager "
                  "(`python -m recipe.bench.head`):", "",
                  "| step | before (MiB) | chunked (MiB) | ratio |", "|---|---:|---:|---:|"]  # fmt: skip
        for step in ("train", "eval"):
            b, c = memory[f"{step}-before"], memory[f"{step}-chunked"]
            lines.append(f"| {'training step' if step == 'train' else 'evaluation forward'} | {b:,.0f} | {c:,.0f} | {c / b:.2f} |")  # fmt: skip
        lines.append("")
    for shape, res in (speed or {}).items():
        lines += [
            f"Training step tokens/s, {shape}:",
            "",
            "| mode | before | chunked | ratio |",
            "|---|---:|---:|---:|",
        ]
        for mode in ("eager", "compiled"):
            b, c = res[f"{mode}-before"], res[f"{mode}-chunked"]
            lines.append(f"| {mode} | {b:,.0f} | {c:,.0f} | {c / b:.3f} |")
        lines.append("")
    return lines


def main(argv: list[str] | None = None) -> list[str]:
    from recipe.config import load_config

    p = argparse.ArgumentParser(prog="python -m recipe.bench.head", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/shakespeare.yaml")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--skip", default="", help="comma-separated: memory, speed")
    p.add_argument(
        "--gpu", action="store_true", help="on one GPU: the memory table, then --gpu-config's model"
    )
    p.add_argument("--gpu-config", default="configs/modern-124m.yaml")
    p.add_argument("--output", help="also write the results as JSON")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    if args.gpu:
        results = {"memory_fp32": bench_memory("cuda")}
        print(json.dumps(results), flush=True)
        results["step"] = bench_gpu(args.gpu_config, (16, 32), args.rounds, max(args.steps, 5))
        text = json.dumps(results, indent=1)
        print(text)
        if args.output:
            with open(args.output, "w") as f:
                f.write(text)
        return [text]
    memory = None if "memory" in skip else bench_memory()
    speed = None if "speed" in skip else bench_speed(cpu_shapes(load_config(["--config", args.config])), args.rounds, args.steps)  # fmt: skip
    lines = tables(memory, speed, "CPU")
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
