"""Sample from a trained model, streaming tokens as they are produced.

    python -m recipe.generate --model outputs/shakespeare --prompt "ROMEO:" --max_new_tokens 200 \
        --temperature 0.8 --top_k 200 --top_p 0.95 --num_return_sequences 1 --seed 0

Loads through `AutoModelForCausalLM` / `AutoTokenizer`, so any causal LM folder or Hub id works, ours included.
Sampling settings not given here come from the model's own `generation_config.json` (ours: temperature 0.8,
top-k 200, saved by training). Greedy decoding when --temperature is 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer, set_seed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m recipe.generate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="a model folder (e.g. outputs/shakespeare) or a Hub id")
    p.add_argument("--prompt", default="\n", help="text to continue")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the model's)")
    p.add_argument("--top_k", type=int, default=None, help="0 = no top-k filtering (default: the model's)")
    p.add_argument(
        "--top_p", type=float, default=None, help="nucleus sampling, in (0, 1] (default: the model's)"
    )
    p.add_argument("--num_return_sequences", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    args = p.parse_args(argv)
    if args.temperature is not None and args.temperature < 0:
        p.error(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        p.error(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.top_k is not None and args.top_k < 0:
        p.error(f"--top_k must be >= 0, got {args.top_k}")
    if args.max_new_tokens <= 0:
        p.error(f"--max_new_tokens must be positive, got {args.max_new_tokens}")
    if args.num_return_sequences <= 0:
        p.error(f"--num_return_sequences must be positive, got {args.num_return_sequences}")
    path = Path(args.model)
    if path.exists() and not (path / "config.json").is_file():
        p.error(
            f"--model: {args.model} is not a model folder (no config.json); "
            "train one with `make train` or point at the output_dir of a run"
        )
    return args


def generate(args: argparse.Namespace) -> list[str]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(args.model, trust_remote_code=True).to(device).eval()
    except (OSError, ValueError) as err:  # a missing folder, a bad Hub id, no network: one clear line
        hint = "" if Path(args.model).exists() else " (no such folder, and not reachable as a Hub id)"
        raise SystemExit(f"error: cannot load a model from {args.model!r}{hint}: {err}") from None
    set_seed(args.seed)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids.to(device)
    if ids.shape[1] == 0:  # an empty prompt: start from the document separator
        ids = torch.tensor([[tokenizer.eos_token_id]], device=device)
    room = getattr(model.config, "max_position_embeddings", None)
    if room is not None and ids.shape[1] + args.max_new_tokens > room:
        # Learned positions end at the context length; stop there rather than fail mid-generation.
        args.max_new_tokens = max(1, room - ids.shape[1])
        print(
            f"(max_new_tokens capped at {args.max_new_tokens}: the model's context is {room} tokens)",
            file=sys.stderr,
        )
    greedy = args.temperature == 0
    given = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    sampling = {"do_sample": False} if greedy else {k: v for k, v in given.items() if v is not None}
    if sampling.get("top_k") == 0:
        sampling["top_k"] = None
    if not greedy and sampling:  # a sampling setting given here means sampling, whatever the model's default
        sampling["do_sample"] = True
    streamer = TextStreamer(tokenizer, skip_special_tokens=True) if args.num_return_sequences == 1 else None
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=args.max_new_tokens,
            num_return_sequences=args.num_return_sequences,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            **sampling,
        )
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    if streamer is None:
        for i, text in enumerate(texts):
            print(f"--- sample {i + 1} ---\n{text}\n")
    return texts


def main(argv: list[str] | None = None) -> list[str]:
    return generate(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
