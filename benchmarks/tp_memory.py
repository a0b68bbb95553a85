"""Per-process peak memory of `mistral7b generate` on one process vs split over N by tensor parallelism.

    python benchmarks/tp_memory.py [--tp 2] [--dir /tmp/tp-bench]

Writes a random Mistral-shaped model (bf16, ~350 MB: weights dominate) once, then runs the same
greedy generate as one process and under `torchrun --nproc-per-node N ... --tp N`, each process
reporting its peak RSS (ru_maxrss) and its RSS once torch and mistral7b are imported (the part
of the peak that is not the model). Prints one row per process and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ARGS = dict(dim=1024, n_layers=8, head_dim=128, hidden_dim=3584, n_heads=8, n_kv_heads=4, norm_eps=1e-5,
            vocab_size=32000, sliding_window=256)
GENERATE = ["generate", "--prompt-ids", ",".join(str(i) for i in range(1, 65)), "--max-tokens", "16"]


def status_mb(key: str) -> float:
    """A /proc/self/status memory line in MB. VmHWM is the peak RSS of this process image (unlike
    ru_maxrss, which keeps the parent's peak across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def write_model(folder: Path) -> None:
    import torch

    import mistral7b

    if (folder / "params.json").exists():
        return
    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in mistral7b.Transformer(mistral7b.ModelArgs(**ARGS)).state_dict().items()}
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: (torch.randn(s) * 0.02).bfloat16() if len(s) == 2 else torch.ones(s, dtype=torch.bfloat16)
             for k, s in shapes.items()}
    save_file(state, str(folder / "consolidated.safetensors"))
    (folder / "params.json").write_text(json.dumps(ARGS))


def measure(report: Path, argv: list[str]) -> None:
    """Run the mistral7b command `argv` in this process; write this rank's memory to `report`."""
    import mistral7b.cli  # noqa: F401  (imports counted in the baseline)
    import torch.distributed  # noqa: F401

    baseline = status_mb("VmHWM")
    code = mistral7b.cli.main(argv)
    rank = int(os.environ.get("RANK", "0"))
    (report / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "baseline_mb": baseline, "peak_mb": status_mb("VmHWM"),
                                                         "anon_end_mb": status_mb("RssAnon")}))
    sys.exit(code)


def run(tp: int, model: Path, report: Path) -> list[dict]:
    report.mkdir(parents=True, exist_ok=True)
    for old in report.glob("rank*.json"):
        old.unlink()
    me = [__file__, "--measure", str(report), "--"]
    cli = [*GENERATE, "--model", str(model)]
    if tp == 1:
        cmd = [sys.executable, *me, *cli]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp}", *me, *cli,
               "--tp", str(tp)]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return [json.loads(f.read_text()) for f in sorted(report.glob("rank*.json"))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "mistral7b-tp-bench")
    p.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.measure:
        measure(args.measure, rest[1:] if rest[:1] == ["--"] else rest)
        return
    model = args.dir / "model"
    write_model(model)
    size = (model / "consolidated.safetensors").stat().st_size / 2**20
    print(f"model: {size:.0f} MB of bf16 weights ({ARGS})")
    print("| processes | rank | peak RSS (MB) | after imports (MB) | peak - imports (MB) |")
    print("| --- | --- | --- | --- | --- |")
    largest = {}  # processes -> the largest rank's (peak, peak - imports)
    for tp in (1, args.tp):
        rows = run(tp, model, args.dir / f"report-{tp}")
        for r in rows:
            print(f"| {tp} | {r['rank']} | {r['peak_mb']:.0f} | {r['baseline_mb']:.0f} | {r['peak_mb'] - r['baseline_mb']:.0f} |")
        largest[tp] = (max(r["peak_mb"] for r in rows), max(r["peak_mb"] - r["baseline_mb"] for r in rows))
    (peak1, model1), (peak, model_n) = largest[1], largest[args.tp]
    print(f"largest rank vs one process: peak - imports {model_n:.0f} / {model1:.0f} MB = {model_n / model1:.2f}x "
          f"(ideal {1 / args.tp:.2f}x); whole peak {peak:.0f} / {peak1:.0f} MB = {peak / peak1:.2f}x")

if __name__ == "__main__":
    main()
