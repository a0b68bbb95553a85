"""Fine-tuning speed and memory: training tokens/s and peak memory of LoRA and full fine-tuning.

    python benchmarks/finetune_speed.py [--model PATH] [--steps 6] [--batch-size 2] [--seq-len 256] [--device cpu]
                                        [--modes NAME,NAME,...]

Each mode runs `mistral7b.train.train` in its own process (so peak memory is that mode's alone) on
packed rows of plain text (every token a target), and reports the median tokens/s of the steps after
the first two (warm-up), the peak memory (resident set size on CPU, torch's peak allocation on CUDA)
and the loss of the last step (the same data and seed in every mode).
The peer, in the same run: transformers + peft on the same weights (saved as a Hugging Face folder),
LoRA r=8 on the same 7 linears, AdamW, the same batch shape; the ratio column divides by its tokens/s.
Default model: the built-in SmolLM2-135M-Instruct (fp32 on CPU).

Modes also cover a frozen base in bf16 or int8 (`--quantize int8`) under LoRA, and data parallel over
two processes (torchrun, DDP or FSDP; the same global batch: --batch-size / 2 rows per process, one
thread each): their tokens/s count both processes' tokens, their peak memory is rank 0's, and the
last column is the parameter bytes each process holds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PEER = "peer: transformers + peft lora r=8"
LORA = ["--lora-rank", "8"]
# name -> (flags, processes)
MODES = {"lora r=8 (all 7 linears)": (LORA, 1), "lora r=8 + activation ckpt": ([*LORA, "--ckpt"], 1),
         "lora r=8 bf16 base": ([*LORA, "--dtype", "bf16"], 1), "lora r=8 int8 base": ([*LORA, "--quantize", "int8"], 1),
         "full": (["--full"], 1), "full + activation ckpt": (["--full", "--ckpt"], 1),
         "lora r=8 ddp 2 processes": ([*LORA, "--parallel", "ddp"], 2),
         "lora r=8 fsdp 2 processes": ([*LORA, "--parallel", "fsdp"], 2),
         "full ddp 2 processes": (["--full", "--parallel", "ddp"], 2),
         "full fsdp 2 processes": (["--full", "--parallel", "fsdp"], 2)}


def _peak_gib(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _peer(args) -> None:
    import time

    import peft
    import torch
    from transformers import AutoModelForCausalLM

    import mistral7b

    folder = Path(args.out)
    mistral7b.save(mistral7b.load(args.model), folder, format="hf")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(args.device)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets)).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len), device=args.device)
    speeds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        speeds.append(ids.numel() / (time.perf_counter() - start))
    print(json.dumps({"tokens_per_s": statistics.median(speeds[2:]), "peak_gib": _peak_gib(args.device)}))


def _child(args) -> None:

    from mistral7b.lora import LoRAConfig
    from mistral7b.train import TrainConfig, train

    out = Path(args.out)
    train(TrainConfig(model=args.model, data=args.data, out=str(out), lora=None if args.full else LoRAConfig(rank=8),
                      steps=args.steps, lr=1e-5, batch_size=args.batch_size, seq_len=args.seq_len,
                      activation_checkpointing=args.ckpt, device=args.device, progress=False, dtype=args.dtype,
                      quantize=args.quantize, parallel=args.parallel))
    if os.environ.get("RANK", "0") != "0":
        return
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][2:]
    print(json.dumps({"tokens_per_s": statistics.median(speeds), "peak_gib": _peak_gib(args.device),
                      "loss": [r["loss"] for r in records if "loss" in r][-1]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per mode (the first two are not timed)")
    p.add_argument("--batch-size", type=int, default=2, help="packed rows per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--modes", help=f"comma-separated modes to run (default: all): {', '.join([PEER, *MODES])}")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--lora-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--quantize", help=argparse.SUPPRESS)
    p.add_argument("--parallel", default="ddp", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return _peer(args) if args.peer else _child(args)
    modes = {PEER: (["--peer"], 1), **MODES}
    if args.modes:
        unknown = set(args.modes.split(",")) - set(modes)
        if unknown:
            p.error(f"unknown mode(s) {', '.join(sorted(unknown))}")
        modes = {name: modes[name] for name in args.modes.split(",")}
    with tempfile.TemporaryDirectory() as tmp:
        rng = random.Random(0)  # long plain-text lines: every row is full and every token a target
        words = ["the", "model", "learns", "from", "data", "and", "every", "token", "counts", "here"]
        data = Path(tmp) / "text.jsonl"
        data.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=4 * args.seq_len))}) + "\n"
                                for _ in range(args.steps * args.batch_size)))
        common = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                  "--device", args.device, "--data", str(data), *(["--model", args.model] if args.model else [])]
        results = {}
        print(f"{'mode':<40} {'tokens/s':>9} {'vs peer':>8} {'peak memory':>12} {'params/process':>15} {'last loss':>10}")
        for i, (name, (flags, procs)) in enumerate(modes.items()):
            launcher, env = [sys.executable], None
            if procs > 1:  # the same global batch, split over the processes
                launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
                flags = [*flags, "--batch-size", str(max(1, args.batch_size // procs))]
                env = {**os.environ, "OMP_NUM_THREADS": "1"}
            run = subprocess.run([*launcher, __file__, "--child", *common, *flags, "--out", f"{tmp}/out{i}"],
                                 capture_output=True, text=True, check=True, env=env)
            r = results[name] = json.loads(run.stdout.strip().splitlines()[-1])
            held = re.findall(r"holds [^\n]*?\((\d+) bytes", run.stderr)  # printed by data-parallel runs
            ratio = f"{r['tokens_per_s'] / results[PEER]['tokens_per_s']:>7.2f}x" if PEER in results else f"{'-':>8}"
            held = f"{int(held[0]) / 2**20:>11.0f} MiB" if held else f"{'-':>15}"
            loss = f"{r['loss']:>10.4f}" if "loss" in r else f"{'-':>10}"
            print(f"{name:<40} {r['tokens_per_s']:>9.0f} {ratio} {r['peak_gib']:>8.2f} GiB {held} {loss}", flush=True)


if __name__ == "__main__":
    main()
