"""Data preparation at two corpus sizes 10x apart: memory, cache and speed per token. `python -m recipe.bench.data`.

The corpus is copies of the default Shakespeare corpus cut into ~3 KB documents, in jsonl shards, read with
one fixed tokenizer (trained once on it), so only the corpus size changes. Each measurement is a fresh
process (a fresh cache for preparing; the prepared cache for a training start), sampled every 50 ms:
memory is the proportional set size (PSS, /proc/<pid>/smaps_rollup) summed over the process and all its
children (tokenizer workers, DataLoader workers); "anon" is the part not backed by a file (the memory-mapped
caches are file-backed: the kernel can drop those pages). What grows with the corpus is the difference between
the two sizes, per token of the difference.

PSS counts the memory-mapped raw text the tokenizer workers have read, which the kernel drops under pressure
(clean file pages). `--memory-cap` measures what a run needs instead: where this process may create a memory
cgroup (Linux, root), the large preparation runs again under a hard limit of the small one's peak plus
`--cap-bytes-per-token` (default 4) per added token; it either finishes or is killed. The small one's peak is
the smallest limit it finishes under, found by bisection to 16 MiB (PSS undercounts it: it leaves out the
page cache of the files written, which the cgroup charges). `--throughput` prepares
the large corpus with one tokenizer process and with all cores (`preprocessing_num_workers` unset).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from recipe.config import available_cores
from recipe.documents import MIN_BYTES_PER_WORKER

ROOT = Path(__file__).resolve().parents[2]
DOC_BYTES = 3000
SHARDS = 8

PREPARE = """
import json, sys, time
from recipe.config import load_config
from {module} import prepare_data
cfg = load_config(sys.argv[1:])
start = time.perf_counter()
data = prepare_data(cfg)
s = data.summary["train"]
print("RESULT " + json.dumps({{"tokens": s.tokens + data.summary["validation"].tokens, "documents": s.documents,
      "seconds": time.perf_counter() - start}}))
"""

START = """
import sys
import torch
from recipe.config import load_config
from {module} import prepare_data
cfg = load_config(sys.argv[1:])
data = prepare_data(cfg)
try:
    from {module} import train_dataloader
    dl = train_dataloader(data, cfg)
except ImportError:
    dl = torch.utils.data.DataLoader(data.train, batch_size=cfg.per_device_train_batch_size, shuffle=True,
                                     drop_last=True, num_workers=cfg.dataloader_num_workers)
for i, batch in enumerate(dl):
    if i == 200:
        break
print("RESULT {{}}")
"""


def _pss(pid: int) -> tuple[int, int]:
    """(Pss, Pss_Anon) of one process in bytes; (0, 0) once it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    fields = dict(line.split(":", 1) for line in text.splitlines()[1:] if ":" in line)
    kb = lambda name: int(fields.get(name, "0 kB").split()[0]) * 1024  # noqa: E731
    return kb("Pss"), kb("Pss_Anon")


class RunFailed(RuntimeError):
    def __init__(self, how: str, stderr: str):
        super().__init__(f"benchmark process failed ({how}):\n{stderr[-3000:]}")
        self.how = how


def memory_cgroup(limit: int) -> Path | None:
    """A new memory cgroup limited to `limit` bytes with no swap (cgroup v2 or v1), or None where none can
    be made (not Linux, not root, or no memory controller delegated here)."""
    name = f"recipe-bench-{os.getpid()}-{time.monotonic_ns()}"
    v2, v1 = Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/memory")
    if (v2 / "cgroup.subtree_control").is_file():
        if "memory" not in (v2 / "cgroup.subtree_control").read_text().split():
            return None
        folder, knob, no_swap = v2 / name, "memory.max", "memory.swap.max"
    elif (v1 / "memory.limit_in_bytes").is_file():
        folder, knob, no_swap = v1 / name, "memory.limit_in_bytes", "memory.swappiness"
    else:
        return None
    try:
        folder.mkdir()
    except OSError:
        return None
    try:
        (folder / knob).write_text(str(limit))
        if (folder / no_swap).is_file():  # anonymous memory over the limit: an OOM kill, not a slow pass
            (folder / no_swap).write_text("0")
    except OSError:
        folder.rmdir()
        return None
    return folder


def run_measured(
    code: str, args: list[str], env: dict, cgroup: Path | None = None, timeout: float | None = None
) -> tuple[dict, int, int]:
    """Run `python -c code args` and return its RESULT json, peak PSS and peak anonymous PSS of its tree.
    In `cgroup`, the process and everything it starts live under that cgroup's memory limit (a shell joins
    it, then becomes the Python process)."""
    cmd = [sys.executable, "-c", code, *args]
    if cgroup is not None:
        cmd = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup / "cgroup.procs"), *cmd]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = [0, 0]

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                pids = [proc.pid] + [c.pid for c in root.children(recursive=True)]
            except psutil.Error:
                break
            totals = [sum(v) for v in zip(*(_pss(p) for p in pids))]
            peak[:] = [max(a, b) for a, b in zip(peak, totals)]
            time.sleep(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        proc.communicate()
        raise RunFailed(f"over {timeout:.0f} s", "") from None
    thread.join()
    if proc.returncode != 0:
        raise RunFailed(f"exit {proc.returncode}", err.decode())
    line = next(x for x in out.decode().splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :]), peak[0], peak[1]


def _kill_tree(pid: int) -> None:
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(pid)
        for p in [*root.children(recursive=True), root]:
            with contextlib.suppress(psutil.Error):
                p.kill()


def make_corpus(folder: Path, copies: int, cache_dir: str) -> tuple[list[str], int]:
    """`copies` copies of the Shakespeare works as ~DOC_BYTES documents in SHARDS jsonl files."""
    from recipe import corpus

    files = corpus.shakespeare_files(cache_dir)
    texts = [Path(p).read_text(encoding="utf-8") for paths in files.values() for p in paths]
    docs, current = [], ""
    for text in texts:
        for paragraph in text.split("\n\n"):
            current += paragraph + "\n\n"
            if len(current) >= DOC_BYTES:
                docs.append(current.strip())
                current = ""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    handles = [open(folder / f"part-{i:02d}.jsonl", "w", encoding="utf-8") for i in range(SHARDS)]
    n = 0
    for copy in range(copies):
        for doc in docs:  # the copy number makes every document distinct
            handles[n % SHARDS].write(json.dumps({"text": f"[{copy}] {doc}"}) + "\n")
            n += 1
    for h in handles:
        h.close()
    return [str(folder / "*.jsonl")], sum(p.stat().st_size for p in folder.iterdir())


def fixed_tokenizer(folder: Path, cache_dir: str, vocab_size: int) -> str:
    from recipe import corpus
    from recipe.tokenizer import train_bpe

    if not (folder / "tokenizer.json").exists():
        files = corpus.shakespeare_files(cache_dir)
        texts = [Path(p).read_text(encoding="utf-8") for paths in files.values() for p in paths]
        train_bpe(texts, vocab_size).save_pretrained(folder)
    return str(folder)


def cache_bytes(cache: Path) -> tuple[int, int]:
    """(bytes of the raw text's own arrow copy, bytes of everything else) under a cache folder."""
    raw = other = 0
    for p in cache.rglob("*"):
        if not p.is_file() or p.name.endswith(".lock"):
            continue
        if p.suffix == ".arrow" and p.name.startswith("json-train"):  # what load_dataset wrote of the text
            raw += p.stat().st_size
        else:
            other += p.stat().st_size
    return raw, other


def prepare_args(train_files: list[str], tokenizer: str, cache: Path) -> list[str]:
    if cache.exists():
        shutil.rmtree(cache)
    return [
        "--train_files",
        ",".join(train_files),
        "--tokenizer_name",
        tokenizer,
        "--cache_dir",
        str(cache),
        "--block_size",
        "256",
        "--per_device_train_batch_size",
        "16",
    ]


def fixed_workers() -> list[str]:
    """The memory table prepares both sizes with one worker per core: left unset, the small corpus would get
    fewer (one per 4 MB of text), and each worker's own interpreter would read as growth per token."""
    return ["--preprocessing_num_workers", str(available_cores())]


def measure(module: str, train_files: list[str], tokenizer: str, work: Path, env: dict) -> dict:
    cache = work / "cache"
    args = prepare_args(train_files, tokenizer, cache) + fixed_workers()
    result, pss, anon = run_measured(PREPARE.format(module=module), args, env)
    raw, prepared = cache_bytes(cache)
    _, start_pss, start_anon = run_measured(START.format(module=module), args, env)
    return {
        **result,
        "pss": pss,
        "anon": anon,
        "raw_cache": raw,
        "cache": prepared,
        "start_pss": start_pss,
        "start_anon": start_anon,
    }


def under_cap(
    module: str, train_files: list[str], tokenizer: str, work: Path, env: dict, limit: int, timeout: float
) -> str:
    """Prepare again, in a fresh cache, under a memory cgroup of `limit` bytes: 'finished' or why not."""
    cgroup = memory_cgroup(limit)
    if cgroup is None:
        return "n/a (no memory cgroup can be made here: needs Linux, root and the memory controller)"
    stop = threading.Event()
    # A killed tokenizer worker leaves `datasets`' pool waiting for it forever: once the cgroup reports an
    # OOM kill, end the whole tree.
    watchdog = threading.Thread(target=_end_on_oom_kill, args=(cgroup, stop), daemon=True)
    watchdog.start()
    try:
        args = prepare_args(train_files, tokenizer, work / "cache") + fixed_workers()
        run_measured(PREPARE.format(module=module), args, env, cgroup, timeout)
        return "finished"
    except RunFailed as err:
        # Told by the cgroup, not the exit code: `datasets` may notice a killed worker first and exit 1.
        if _oom_kills(cgroup) > 0:
            return "killed (out of memory)"
        return f"too slow under the limit ({err.how})" if err.how.startswith("over") else f"failed: {str(err)[-200:]}"  # fmt: skip
    finally:
        stop.set()
        watchdog.join()
        for _ in range(50):  # the cgroup can be removed once its processes are gone
            try:
                cgroup.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def _oom_kills(cgroup: Path) -> int:
    events = cgroup / ("memory.events" if (cgroup / "memory.events").is_file() else "memory.oom_control")
    with contextlib.suppress(OSError):
        fields = dict(line.split() for line in events.read_text().splitlines() if len(line.split()) == 2)
        return int(fields.get("oom_kill", 0))
    return 0


def _end_on_oom_kill(cgroup: Path, stop: threading.Event) -> None:
    while not stop.wait(0.2):
        if _oom_kills(cgroup) > 0:
            with contextlib.suppress(OSError):
                for pid in (cgroup / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)


def smallest_cap(
    module: str, train_files: list[str], tokenizer: str, work: Path, env: dict, hi: int, timeout: float
) -> tuple[int | None, str]:
    """(the smallest memory limit, to 16 MiB, under which the preparation finishes, searched below `hi`;
    or None and why not)."""
    verdict = under_cap(module, train_files, tokenizer, work, env, hi, timeout)
    if verdict != "finished":
        return None, verdict if verdict.startswith("n/a") else f"{verdict} even under {hi / 2**20:.0f} MiB"
    lo = 0
    while hi - lo > 16 * 2**20:
        mid = (lo + hi) // 2
        verdict = under_cap(module, train_files, tokenizer, work, env, mid, timeout)
        print(f"  {module} under {mid / 2**20:.0f} MiB: {verdict}", file=sys.stderr)
        lo, hi = (lo, mid) if verdict == "finished" else (mid, hi)
    return hi, ""


def throughput(train_files: list[str], tokenizer: str, work: Path, env: dict) -> list[str]:
    """Preparation speed of `recipe.data` with one tokenizer process and with every core (the default)."""
    cores = available_cores()
    lines = ["", f"Preparing the large corpus, fresh cache each time, {cores} cores:", "",
             "| preprocessing_num_workers | tokens | prepare s | tokens/s |", "|---|---|---|---|"]  # fmt: skip
    for workers in ("1", None):
        args = prepare_args(train_files, tokenizer, work / "cache")
        args += ["--preprocessing_num_workers", workers] if workers else []
        result, _, _ = run_measured(PREPARE.format(module="recipe.data"), args, env)
        label = workers or f"unset: {cores} cores, at most one per {MIN_BYTES_PER_WORKER >> 20} MB of text"
        lines.append(f"| {label} | {result['tokens'] / 1e6:.1f}M | {result['seconds']:.1f} | "
                     f"{result['tokens'] / result['seconds'] / 1e3:,.0f}k |")  # fmt: skip
        print(f"throughput, workers {label}: {json.dumps(result)}", file=sys.stderr)
    return lines


def growth(small: dict, large: dict, key: str) -> float:
    """Bytes of `key` per token of the difference between the two corpus sizes."""
    return (large[key] - small[key]) / (large["tokens"] - small["tokens"])


def bench_data(args: argparse.Namespace) -> list[str]:
    """Markdown lines: the table, for `recipe.data` (and `--data-baseline`, another module, if given)."""
    cache_dir = str(Path(args.cache_dir).expanduser())
    work = Path(cache_dir) / "bench-data"
    tokenizer = fixed_tokenizer(work / "tokenizer", cache_dir, args.vocab_size)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), *args.path])}
    modules = [("this", "recipe.data")] + ([("baseline", args.data_baseline)] if args.data_baseline else [])
    cores = available_cores()
    if args.throughput_only:
        files, _ = make_corpus(work / f"corpus-{10 * args.copies}", 10 * args.copies, cache_dir)
        return throughput(files, tokenizer, work / "throughput", env)
    lines = [
        f"Data preparation, {args.copies} and {10 * args.copies} copies of the Shakespeare corpus as ~3 KB "
        f"documents in {SHARDS} jsonl shards, vocab {args.vocab_size}, {cores} cores, preprocessing_num_workers {cores} at both sizes; peak PSS summed over the "
        "process tree (anon: not file-backed), per token of the difference between the two sizes.",
        "",
        "| code | tokens (small / large) | prepare s (large) | tokens/s | peak PSS (small / large) | "
        "PSS growth B/token | anon growth B/token | cache B/token beyond the text | "
        "training start growth B/token (PSS / anon) |"
        + (f" memory cap: small's smallest, then large under it + {args.cap_bytes_per_token:g} B/token |" if args.memory_cap else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if args.memory_cap else ""),
    ]  # fmt: skip
    for name, module in modules:
        rows = []
        for copies in (args.copies, 10 * args.copies):
            files, _ = make_corpus(work / f"corpus-{copies}", copies, cache_dir)
            rows.append(measure(module, files, tokenizer, work / f"run-{copies}", env))
            print(f"{name} x{copies}: {json.dumps(rows[-1])}", file=sys.stderr)
        small, large = rows
        per = {k: growth(small, large, k) for k in ("pss", "anon", "start_pss", "start_anon")}
        cap = ""
        if args.memory_cap:
            small_files, _ = make_corpus(work / f"corpus-{args.copies}", args.copies, cache_dir)
            # a run this much slower than without a limit is thrashing, not finishing
            slow_small, slow_large = 5 * small["seconds"] + 60, 5 * large["seconds"] + 60
            need, why = smallest_cap(module, small_files, tokenizer, work / f"capped-{name}", env, 2 * small["pss"], slow_small)  # fmt: skip
            if need is None:
                cap = f" {why} |"
            else:
                limit = int(need + args.cap_bytes_per_token * (large["tokens"] - small["tokens"]))
                verdict = under_cap(module, files, tokenizer, work / f"capped-{name}", env, limit, slow_large)
                cap = f" small needs {need / 2**20:.0f} MiB; large under {limit / 2**20:.0f} MiB: {verdict} |"
            print(f"{name}:{cap}", file=sys.stderr)
        lines.append(
            f"| {name} (`{module}`) | {small['tokens'] / 1e6:.1f}M / {large['tokens'] / 1e6:.1f}M | "
            f"{large['seconds']:.0f} | {large['tokens'] / large['seconds'] / 1e3:.0f}k | "
            f"{small['pss'] / 2**30:.2f} / {large['pss'] / 2**30:.2f} GiB | {per['pss']:.1f} | {per['anon']:.1f} | "
            f"{large['cache'] / large['tokens']:.2f} | {per['start_pss']:.1f} / {per['start_anon']:.1f} |{cap}"
        )
    if args.throughput:
        lines += throughput(files, tokenizer, work / "throughput", env)
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m recipe.bench.data", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--copies", type=int, default=1, help="copies of the corpus for the small size (x10: large)"
    )
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--cache_dir", default="~/.cache/gpt-recipe")
    parser.add_argument(
        "--data-baseline",
        default=None,
        help="another module with prepare_data to compare (e.g. an old data.py)",
    )
    parser.add_argument("--path", action="append", default=[], help="a folder to add to PYTHONPATH")
    parser.add_argument("--memory-cap", action="store_true", help="also prepare the large corpus under a memory cgroup")  # fmt: skip
    parser.add_argument("--cap-bytes-per-token", type=float, default=4.0)
    parser.add_argument("--throughput", action="store_true", help="also time one tokenizer process vs all cores")  # fmt: skip
    parser.add_argument("--throughput-only", action="store_true", help="only that (no memory table)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    print("\n".join(bench_data(parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
