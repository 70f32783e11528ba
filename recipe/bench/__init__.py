"""The benchmarks and the GPU machine check: measurements of the product, not part of it.

| module | command | measures |
|---|---|---|
| `speed.py` | `make bench` | ours vs stock GPT-2 per training step on a CPU, the loop's overhead, tokenization |
| `data.py` | `python -m recipe.bench.data` | data preparation: time and memory at two corpus sizes, tokenizer throughput |
| `learning.py` | `make bench-learning` | held-out bits per byte against training cost for candidate settings |
| `gpu_check.py` | `make gpu-check` | a GPU machine's first minutes: speed, export, resume, DDP/FSDP2 (runs uninstalled) |
| `gpu.py` | `make bench-gpu` | the training step's speed changes side by side on one GPU, then train.py (runs uninstalled) |
"""
