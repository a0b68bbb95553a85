"""`mistral7b bench`: run the same greedy workload through our engine (one row per config) and the
peers, each in its own process, and report speed, peak memory and memory bandwidth use."""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from ..errors import InputError
from .report import add_bandwidth, add_ratios, ratio_table, speed_table

DTYPES = ("fp32", "bf16", "fp16")
QUANTS = ("int8", "int4")
PEERS = ("transformers", "llama.cpp")


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench", help="measure prefill and decode speed, peak memory and bandwidth use, against transformers "
                      "and llama.cpp",
        description="Benchmark our inference engine on a checkpoint: prefill tok/s (one prompt), decode tok/s at "
                    "batch 1 and batch N, peak memory, and the memory bandwidth a batch-1 decode achieves against "
                    "this machine's (measured in the same run); then the same work through transformers and "
                    "llama.cpp on the same weights. Greedy, EOS ignored, fixed token counts, a warm-up before "
                    "timing; every engine and config runs in its own process. Prints a table; --json writes "
                    "the numbers.")
    p.add_argument("--model", "-m", metavar="PATH",
                   help="checkpoint: reference folder, Hugging Face folder or .gguf file (default: the built-in "
                        "SmolLM2-135M-Instruct)")
    p.add_argument("--configs", default="fp32", metavar="LIST",
                   help="comma-separated configs of our engine, one row each: a dtype (fp32, bf16, fp16), a "
                        "weight quantization (int8, int4: on fp32) or both (bf16+int8). Default: fp32")
    p.add_argument("--group-size", type=int, metavar="N",
                   help="quantization group size for int8/int4 configs (default: mistral7b.load's)")
    p.add_argument("--prompt-tokens", type=int, default=128, metavar="N",
                   help="length of the prompt (random token ids, the same for every engine; default: 128)")
    p.add_argument("--decode-tokens", type=int, default=64, metavar="N",
                   help="tokens decoded after the first one, whose rate is the decode tok/s (default: 64)")
    p.add_argument("--batch", type=int, default=8, metavar="N",
                   help="sequences decoding together for the batch-N column (default: 8)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads of every engine and of the bandwidth test (default: torch's, "
                        "i.e. OMP_NUM_THREADS or the cores)")
    p.add_argument("--peers", default=",".join(PEERS), metavar="LIST",
                   help="comma-separated peers to run on the same weights: transformers, llama.cpp (GGUF files "
                        "only), or none (default: both)")
    p.add_argument("--repeat", type=int, default=3, metavar="N",
                   help="timed passes after the warm-up; the median is reported (default: 3)")
    p.add_argument("--rounds", type=int, default=1, metavar="N",
                   help="run every engine N times, taking turns (ours, peers, ours, ...), and report the "
                        "median of the rounds: on a machine whose speed drifts, ratios then compare engines "
                        "measured side by side (default: 1)")
    p.add_argument("--bandwidth-mib", type=int, default=1024, metavar="N",
                   help="size of the buffer summed to measure memory bandwidth; keep it well above the CPU's "
                        "caches (default: 1024)")
    p.add_argument("--json", metavar="PATH", help="also write every number, the machine and the command here")
    p.set_defaults(run=run)
    return p


@dataclass(frozen=True)
class Config:
    dtype: str
    quantize: str | None

    @property
    def label(self) -> str:
        return f"{self.dtype}+{self.quantize}" if self.quantize else self.dtype


def parse_configs(spec: str) -> list[Config]:
    configs = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if "+" in item:
            dtype, _, quantize = item.partition("+")
        else:
            dtype, quantize = (item, None) if item in DTYPES else ("fp32", item)
        if dtype not in DTYPES or (quantize is not None and quantize not in QUANTS):
            raise InputError(f"--configs: {item!r} is not a config; use a dtype ({', '.join(DTYPES)}), a "
                             f"quantization ({', '.join(QUANTS)}) or DTYPE+QUANT, e.g. bf16+int8")
        configs.append(Config(dtype, quantize))
    if not configs:
        raise InputError("--configs is empty; e.g. --configs fp32,bf16")
    return list(dict.fromkeys(configs))


def parse_peers(spec: str) -> list[str]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise InputError(f"--peers: unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)} or none")
    return names


def _check_flags(args) -> None:
    """Fail before the minutes of measuring, not after."""
    for flag in ("prompt_tokens", "decode_tokens", "batch", "repeat", "rounds", "threads", "group_size", "bandwidth_mib"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise InputError(f"--json {args.json}: its folder does not exist")


class Workers:
    """Runs worker processes (`python -m mistral7b.bench.worker`), their files in one temp folder."""

    def __init__(self, folder: Path):
        self.folder, self.count = folder, 0

    def run(self, kind: str, label: str, **spec) -> dict:
        self.count += 1
        spec_path, result_path = self.folder / f"spec-{self.count}.json", self.folder / f"result-{self.count}.json"
        spec_path.write_text(json.dumps({"kind": kind, **spec}))
        print(f"bench: {label} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "mistral7b.bench.worker", str(spec_path), str(result_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0 or not result_path.exists():
            last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            print(f"bench: {label} failed: {last}", file=sys.stderr, flush=True)
            return {"skipped": f"the worker failed: {last}"}
        print(f"bench: {label} done in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        return json.loads(result_path.read_text())


def _machine(threads: int) -> dict:
    import torch

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "load_average": os.getloadavg()[0],
            "python": platform.python_version(), "torch": torch.__version__, "transformers": version("transformers"),
            "llama_cpp_python": version("llama_cpp_python"), "platform": platform.platform()}


def _peer_runs(workers: Workers, peers: list[str], configs: list[Config], fmt: str, path: Path, tmp: Path,
               base: dict) -> list[tuple[dict, Callable[[], dict]]]:
    """(row head, a function running the peer) per peer row; the transformers copy is written once here."""
    runs = []
    if "transformers" in peers:
        hf_dir, skipped = path, None
        if fmt != "hf":  # transformers reads our export of the same weights
            hf_dir = tmp / "hf"
            skipped = workers.run("export", "writing a Hugging Face copy for transformers",
                                  model=str(path), out=str(hf_dir)).get("skipped")
        for dtype in dict.fromkeys(c.dtype for c in configs):
            runs.append(({"engine": "transformers", "config": dtype}, (lambda: {"skipped": skipped}) if skipped else
                         lambda dtype=dtype: workers.run("transformers", f"transformers {dtype}", **base,
                                                         hf_dir=str(hf_dir), dtype=dtype)))
    if "llama.cpp" in peers:
        runs.append(({"engine": "llama.cpp", "config": "gguf"},
                     (lambda: workers.run("llama.cpp", "llama.cpp", **base)) if fmt == "gguf"
                     else lambda: {"skipped": "llama.cpp reads GGUF files only"}))
    return runs


TIMINGS = ("prefill_tok_s", "decode_b1_tok_s", "decode_bn_tok_s")


def _median_of_rounds(head: dict, results: list[dict]) -> dict:
    """One row from a run's results over the rounds: the median of each timing, every round kept."""
    done = [r for r in results if "skipped" not in r]
    if not done:
        return {**head, **results[0]}
    row = {**head, **done[0]}
    row.update({key: statistics.median(r[key] for r in done) for key in TIMINGS})
    row["peak_rss_mib"] = max(r["peak_rss_mib"] for r in done)
    if len(done) > 1:
        row["rounds"] = [{key: r[key] for key in TIMINGS} for r in done]
    return row


def run(args) -> None:
    import torch

    from ..defaults import default_model_path
    from ..weights import READERS, detect_format
    from .measure import measure_bandwidth

    _check_flags(args)
    configs, peers = parse_configs(args.configs), parse_peers(args.peers)
    path = (Path(args.model) if args.model else default_model_path()).resolve()
    fmt = detect_format(path)
    model_args = READERS[fmt].read_args(path)
    threads = args.threads or torch.get_num_threads()
    rng = random.Random(0)
    prompts = [[rng.randrange(model_args.vocab_size) for _ in range(args.prompt_tokens)] for _ in range(args.batch)]
    base = dict(model=str(path), prompts=prompts, decode_tokens=args.decode_tokens, repeat=args.repeat,
                threads=threads)
    machine = _machine(threads)
    bandwidths: list[float] = []
    with tempfile.TemporaryDirectory(prefix="mistral7b-bench-") as tmp:
        workers = Workers(Path(tmp))
        runs = [({"engine": "ours", "config": c.label, "dtype": c.dtype},
                 lambda c=c: workers.run("ours", f"ours {c.label}", **base, dtype=c.dtype, quantize=c.quantize,
                                         group_size=args.group_size)) for c in configs]
        runs += _peer_runs(workers, peers, configs, fmt, path, Path(tmp), base)
        results: list[list[dict]] = [[] for _ in runs]
        for _ in range(args.rounds):  # engines take turns, so each round compares them side by side
            # Measured every round: this kind of VM's bandwidth drifts by up to 1.5x within minutes.
            print("bench: memory bandwidth ...", file=sys.stderr, flush=True)
            bandwidths.append(measure_bandwidth(threads, args.bandwidth_mib * 2**20))
            for (_, run_engine), kept in zip(runs, results):
                kept.append(run_engine())
        rows = [_median_of_rounds(head, kept) for (head, _), kept in zip(runs, results)]
    bandwidth_gb_s = statistics.median(bandwidths)
    # Decode step j (0-based) of batch 1 attends to prompt_tokens + j + 1 keys: on average this many.
    mean_context = args.prompt_tokens + (args.decode_tokens + 1) / 2
    for row in rows:
        add_bandwidth(row, bandwidth_gb_s, mean_context)
    add_ratios(rows)

    print(f"{path.name}: {args.prompt_tokens} prompt tokens, {args.decode_tokens} decoded, batch {args.batch}, "
          f"{threads} threads, median of {args.repeat} passes x {args.rounds} round(s); memory bandwidth {bandwidth_gb_s:.1f} GB/s "
          f"(median of the rounds' {', '.join(f'{b:.1f}' for b in bandwidths)}; load average {machine['load_average']:.1f} "
          f"at the start)")
    print(speed_table(rows, args.batch, bandwidth_gb_s))
    ratios = ratio_table(rows, args.batch)
    if ratios:
        print()
        print(ratios)
    if args.json:
        report = {"command": shlex.join(["mistral7b", *sys.argv[1:]]), "machine": machine,
                  "model": {"path": str(path), "format": fmt, "parameters": model_args.n_params},
                  "workload": {"prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens,
                               "batch": args.batch, "repeat": args.repeat, "rounds": args.rounds, "greedy": True, "ignore_eos": True},
                  "bandwidth_gb_s": bandwidth_gb_s, "bandwidth_gb_s_rounds": bandwidths, "rows": rows}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
