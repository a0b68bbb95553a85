"""Fine-tuning speed and memory: training tokens/s and peak memory of LoRA and full fine-tuning.

    python benchmarks/finetune_speed.py [--model PATH] [--steps 6] [--batch-size 2] [--seq-len 256] [--device cpu]

Each mode runs `mistral7b.train.train` in its own process (so peak memory is that mode's alone) on
packed rows of plain text (every token a target), and reports the median tokens/s of the steps after
the first two (warm-up) and the peak memory: resident set size on CPU, torch's peak allocation on CUDA.
The peer, in the same run: transformers + peft on the same weights (saved as a Hugging Face folder),
LoRA r=8 on the same 7 linears, AdamW, the same batch shape; the ratio column divides by its tokens/s.
Default model: the built-in SmolLM2-135M-Instruct (fp32 on CPU).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PEER = "peer: transformers + peft lora r=8"
MODES = {"lora r=8 (all 7 linears)": ["--lora-rank", "8"], "lora r=8 + activation ckpt": ["--lora-rank", "8", "--ckpt"],
         "full": ["--full"], "full + activation ckpt": ["--full", "--ckpt"]}


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
                      activation_checkpointing=args.ckpt, device=args.device, progress=False))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][2:]
    print(json.dumps({"tokens_per_s": statistics.median(speeds), "peak_gib": _peak_gib(args.device)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per mode (the first two are not timed)")
    p.add_argument("--batch-size", type=int, default=2, help="packed rows per step")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--lora-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return _peer(args) if args.peer else _child(args)
    with tempfile.TemporaryDirectory() as tmp:
        rng = random.Random(0)  # long plain-text lines: every row is full and every token a target
        words = ["the", "model", "learns", "from", "data", "and", "every", "token", "counts", "here"]
        data = Path(tmp) / "text.jsonl"
        data.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=4 * args.seq_len))}) + "\n"
                                for _ in range(args.steps * args.batch_size)))
        common = ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                  "--device", args.device, "--data", str(data), *(["--model", args.model] if args.model else [])]
        results = {}
        for i, (name, flags) in enumerate({PEER: ["--peer"], **MODES}.items()):
            run = subprocess.run([sys.executable, __file__, "--child", *common, *flags, "--out", f"{tmp}/out{i}"],
                                 capture_output=True, text=True, check=True)
            results[name] = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"{'mode':<40} {'tokens/s':>9} {'vs peer':>8} {'peak memory':>12}")
        for name, r in results.items():
            ratio = r["tokens_per_s"] / results[PEER]["tokens_per_s"]
            print(f"{name:<40} {r['tokens_per_s']:>9.0f} {ratio:>7.2f}x {r['peak_gib']:>8.2f} GiB")


if __name__ == "__main__":
    main()
