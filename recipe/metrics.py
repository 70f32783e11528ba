"""Numbers a user reads: loss, perplexity, bits per byte, throughput and model FLOPs utilisation (MFU)."""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator


def perplexity(loss: float) -> float:
    """exp(mean token NLL in nats); capped so a diverged run prints inf rather than raising."""
    return math.exp(loss) if loss < 700 else float("inf")


def bits_per_byte(loss: float, bytes_per_token: float) -> float:
    """Token NLL (nats) -> bits per UTF-8 byte: comparable across tokenizers and vocabulary sizes."""
    return loss / math.log(2) / bytes_per_token


def flops_per_token(config: Any, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weight matmuls (forward + backward) plus attention scores.

    N counts every weight that takes part in a matmul (the tied token embedding once, as the LM head);
    position embeddings are a lookup and do not count. Attention: 12 * layers * hidden * seq_len (PaLM, App. B).
    """
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    # SwiGLU (gate, up, down): our modern architecture, or a stock model with a SiLU MLP (Llama, Qwen3)
    architecture = getattr(config, "architecture", None)
    gated = architecture == "modern" or (
        architecture is None and getattr(config, "hidden_act", None) == "silu"
    )
    mlp = 3 if gated else 2
    per_layer = 4 * hidden * hidden + mlp * hidden * inner  # qkv + out projection, MLP
    n_matmul = layers * per_layer + vocab * hidden
    return 6 * n_matmul + 12 * layers * hidden * seq_len


# Dense (not 2:4 sparse) bf16 tensor-core peaks from the vendors' data sheets, FLOP/s per GPU, matched against
# torch.cuda.get_device_name in this order (the first pattern that matches names the card). fp16 is the same;
# fp32 matmuls run as TF32 at half of it, except where a fourth entry gives the card's fp32 peak (no TF32).
# A card not listed gets tokens/s and no MFU; a MIG slice is measured against its whole card.
GPU_PEAKS: list[tuple] = [
    (r"GH200", "GH200", 989e12),
    (r"H200 NVL", "H200 NVL", 835e12),
    (r"H200", "H200 SXM", 989e12),
    (r"H100 NVL", "H100 NVL", 835e12),
    (r"H100 PCIe", "H100 PCIe", 756e12),
    (r"H100", "H100 SXM", 989e12),  # "NVIDIA H100 80GB HBM3"
    (r"H800 PCIe", "H800 PCIe", 756e12),
    (r"H800", "H800 SXM", 989e12),
    (r"\bH20\b", "H20", 148e12),
    (r"GB200", "GB200", 2500e12),
    (r"B200", "B200", 2250e12),
    (r"B100", "B100", 1750e12),
    (r"A100|A800", "A100", 312e12),  # SXM and PCIe alike
    (r"L40S", "L40S", 362e12),
    (r"\bL40\b", "L40", 181e12),
    (r"\bL4\b", "L4", 121e12),
    (r"\bA10\b", "A10", 125e12),  # not the A10G (AWS g5): no NVIDIA data sheet, lower tensor peak
    (r"RTX A6000", "RTX A6000", 155e12),
    (r"RTX 4090", "RTX 4090", 165e12),
    (r"RTX 3090", "RTX 3090", 71e12),
    (r"(?i)V100.*PCIe", "V100 PCIe (fp16)", 112e12, 14e12),
    (r"V100", "V100 SXM (fp16)", 125e12, 15.7e12),
    (r"\bT4\b", "T4 (fp16)", 65e12, 8.1e12),
]


def card_peak(device_name: str, mixed_precision: str = "bf16") -> tuple[str, float] | None:
    """(the card it matched, its dense FLOP/s at the run's precision) for a CUDA device name, or None for a
    card not listed. bf16 / fp16: the tensor-core peak; otherwise TF32 (half) or the card's fp32 peak."""
    for pattern, card, peak, *fp32 in GPU_PEAKS:
        if re.search(pattern, device_name):
            return card, peak if mixed_precision in ("bf16", "fp16") else (fp32[0] if fp32 else peak / 2)
    return None


def gpu_card(device: torch.device, mixed_precision: str = "bf16") -> tuple[str, float] | None:
    """This GPU's entry in GPU_PEAKS, or None (not a GPU, or a card we have no data-sheet figure for)."""
    return card_peak(torch.cuda.get_device_name(device), mixed_precision) if device.type == "cuda" else None


def gpu_peak_flops(device: torch.device, mixed_precision: str) -> float | None:
    """One GPU's dense peak from its data sheet at the run's precision, or None."""
    found = gpu_card(device, mixed_precision)
    return None if found is None else found[1]


def describe_peak(device: torch.device, mixed_precision: str) -> str:
    """What MFU is measured against, in one line."""
    if device.type == "cpu":
        return "MFU against this CPU's measured fp32 matmul rate"
    found = gpu_card(device, mixed_precision)
    if found is None:
        return f"MFU: n/a ({torch.cuda.get_device_name(device)} is not in recipe/metrics.py's GPU_PEAKS): tokens/s only"  # fmt: skip
    what = "dense bf16" if mixed_precision in ("bf16", "fp16") else "fp32 matmuls"
    return f"MFU against the {found[0]}'s {found[1] / 1e12:,.4g} TFLOP/s ({what}, data sheet) per GPU"


def run_peak_flops(device: torch.device, mixed_precision: str, num_processes: int) -> float | None:
    """The peak of every device in the run: MFU = global tokens/s x FLOPs per token / this.

    On GPUs each process has its own; on a CPU the processes share one machine's cores, and each measures
    while the others do, so its share times the number of processes is the machine's peak."""
    per_process = gpu_peak_flops(device, mixed_precision)
    if per_process is None and device.type == "cpu":
        per_process = measure_matmul_peak("cpu")
    return None if per_process is None else per_process * num_processes


def measure_matmul_peak(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    size: int = 1024,
    seconds: float = 0.5,
) -> float:
    """Achievable matmul FLOP/s on this device: the denominator for MFU where no data sheet applies (CPUs)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * n / (time.perf_counter() - start)


class JsonlLog:
    """Append-only `metrics.jsonl`: one row per log or eval, readable while the run goes on."""

    def __init__(self, path: str | Path, enabled: bool = True, keep_until_step: int | None = None):
        self.path, self.enabled = Path(path), enabled
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            # On resume keep the history up to the checkpoint, drop rows from steps that are being redone.
            rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.rows = [
                r for r in rows if keep_until_step is not None and r.get("step", 0) <= keep_until_step
            ]
            if enabled:
                self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


def results_table(results: dict[str, float], vocab_size: int) -> str:
    """The summary a user reads at the end of a run, against the random-guess baseline ln(V)."""
    baseline = math.log(vocab_size)
    rows = [("", "model", f"random (ln {vocab_size})")]
    if "eval_loss" in results:  # a checkpoint saved before the first evaluation has none
        rows.append(("validation loss (nats/token)", f"{results['eval_loss']:.4f}", f"{baseline:.4f}"))
        rows.append(("perplexity", f"{results['perplexity']:.2f}", f"{vocab_size}"))
    if "eval_accuracy" in results:
        rows.append(("next-token accuracy", f"{results['eval_accuracy']:.4f}", f"{1 / vocab_size:.4f}"))
    if results.get("eval_bits_per_byte") is not None:
        rows.append(
            (
                "bits per byte",
                f"{results['eval_bits_per_byte']:.4f}",
                f"{bits_per_byte(baseline, results['eval_bytes_per_token']):.4f}",
            )
        )
    mean = results["train_loss"]
    rows.append(("train loss (mean over the run)", "n/a" if mean is None else f"{mean:.4f}", ""))
    if results.get("train_loss_last_window") is not None:
        window = results["train_loss_last_window_steps"]
        rows.append((f"train loss (last {window} step{'s' * (window != 1)})", f"{results['train_loss_last_window']:.4f}", ""))  # fmt: skip
    return markdown_table(rows)


def markdown_table(rows: list[tuple[str, ...]]) -> str:
    """Rows of cells (the first one the header) as an aligned Markdown table."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


class Meter:
    """Loss, tokens and time between log steps. The loss and the flag for a non-finite loss or gradient norm
    stay on the device until read, so a step never waits for the host."""

    def __init__(self, accelerator: Accelerator, flops_per_token: float, peak_flops: float | None):
        self.accelerator, self.flops_per_token, self.peak = accelerator, flops_per_token, peak_flops
        self.loss_sum = torch.zeros((), device=accelerator.device)
        self.first_bad_step = torch.full((), -1, device=accelerator.device)
        self.steps, self.tokens, self.start = 0, 0, time.perf_counter()
        self.train_loss, self.window = float("nan"), 0

    def step_done(self, step: int, tokens: int, grad_norm: torch.Tensor | None) -> None:
        """`grad_norm` None: not checked (fp16's scaler skipped the step, or DeepSpeed keeps the norm)."""
        self.steps, self.tokens = self.steps + 1, self.tokens + tokens
        bad = ~torch.isfinite(self.loss_sum)
        if isinstance(grad_norm, torch.Tensor):
            bad = bad | ~torch.isfinite(grad_norm.to(bad.device))
        self.first_bad_step = torch.where((self.first_bad_step < 0) & bad, step, self.first_bad_step)

    def row(self, step: int, state: dict, lr: float, grad_norm) -> dict[str, float]:
        """The log row since the last one (a collective: every process calls it); then start afresh."""
        world = self.accelerator.num_processes
        # Each micro-batch loss is its share of the window's mean: their sum over processes is the step's loss.
        self.train_loss = (
            self.accelerator.reduce(self.loss_sum, "sum") if world > 1 else self.loss_sum
        ).item() / self.steps
        tok_s = self.tokens / (time.perf_counter() - self.start)
        # The whole run's mean (Trainer's train_loss) is kept in the state, which checkpoints save.
        state["train_loss_sum"] = state.get("train_loss_sum", 0.0) + self.train_loss * self.steps
        state["train_loss_steps"] = state.get("train_loss_steps", 0) + self.steps
        self.window = self.steps
        # window_steps: the steps the loss is a mean over (the last window of a run may be short; plots skip it).
        row = {"step": step, "epoch": state["epoch"], "loss": self.train_loss, "window_steps": self.steps, "lr": lr,
               "grad_norm": float(grad_norm), "tokens_per_second": tok_s, "tokens_seen": state["tokens_seen"]}  # fmt: skip
        if self.peak:
            row["mfu"] = tok_s * self.flops_per_token / self.peak
        self.loss_sum.zero_()
        self.steps, self.tokens, self.start = 0, 0, time.perf_counter()
        return row

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (evaluating, saving) does not count as training throughput."""
        start = time.perf_counter()
        yield
        self.start += time.perf_counter() - start
