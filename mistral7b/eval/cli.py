"""`mistral7b eval`: score models on the benchmark tasks and report as Mistral 7B's table does."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..errors import InputError
from .tasks import TASKS

DTYPES = {"auto": None, "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="score models on benchmark tasks (MMLU, HellaSwag, GSM8K, HumanEval, ...)",
        description="Evaluate one or two models on benchmark tasks read from local files and print the "
                    "per-task numbers and the category averages of Mistral 7B's table.",
        epilog=f"tasks: {', '.join(TASKS)}")
    p.add_argument("--model", "-m", action="append", metavar="PATH",
                   help="checkpoint (reference or HF folder, .gguf); give twice to compare two models. "
                        "Default: the built-in SmolLM2-135M-Instruct")
    p.add_argument("--tokenizer", metavar="PATH", help="tokenizer file or folder for every --model (default: "
                                                       "each model's own)")
    p.add_argument("--tasks", required=True, help="comma-separated task names, or 'all'")
    p.add_argument("--data-dir", required=True, metavar="DIR",
                   help="one folder per task holding its Hugging Face files, e.g. DIR/arc_easy/test.jsonl")
    p.add_argument("--server", metavar="URL", help="score through a running `mistral7b serve` instead of loading --model")
    p.add_argument("--limit", type=int, metavar="N", help="score only the first N examples of each task (or subset)")
    p.add_argument("--num-fewshot", type=int, metavar="N", help="override every task's number of shots")
    p.add_argument("--seed", type=int, default=1234, help="seed of the few-shot choice and of maj@k sampling")
    p.add_argument("--output", "-o", metavar="FILE", help="write the JSON report here (and the chart beside it as .png)")
    p.add_argument("--plot", metavar="PNG", help="bar chart of the category averages (default: beside --output)")
    p.add_argument("--dtype", choices=list(DTYPES), default="auto",
                   help="weights and compute dtype; auto keeps the checkpoint's (a quantized GGUF runs its own "
                        "blocks, a dtype dequantizes it)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    p.add_argument("--quantize", choices=("int8", "int4"), help="weight-only quantization of the linear layers")
    p.add_argument("--group-size", type=int, metavar="G", help="with --quantize: weights per scale (multiple of 32)")
    p.add_argument("--max-num-seqs", type=int, default=16, help="sequences the engine scores together")
    p.set_defaults(run=run)
    return p


def _tasks(spec: str) -> list[str]:
    names = list(TASKS) if spec == "all" else [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise InputError(f"unknown task(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(TASKS)}")
    return names


def _backends(args):
    """(label, backend) per model, loaded one at a time as they are used."""
    from .backends import EngineBackend, ServerBackend

    if args.server:
        if args.model:
            raise InputError("give --server or --model, not both")
        backend = ServerBackend(args.server)
        yield backend.name, backend
        return
    import mistral7b
    from ..defaults import DEFAULT_MODEL_NAME
    from ..weights.gguf import default_quantize

    for i, path in enumerate(args.model or [None]):
        model = mistral7b.load(path, dtype=DTYPES[args.dtype], device=args.device, group_size=args.group_size,
                               quantize=default_quantize(path, args.dtype, args.quantize))
        label = Path(path).name if path else DEFAULT_MODEL_NAME
        if args.model and args.model.index(path) != i:  # the same checkpoint twice: keep both columns
            label += f" ({i + 1})"
        yield label, EngineBackend(model.eval(), mistral7b.load_tokenizer(args.tokenizer or path), name=label,
                                   max_num_seqs=args.max_num_seqs)


def run(args) -> dict:
    from . import report
    from .runner import evaluate

    names = _tasks(args.tasks)
    chart = args.plot or (str(Path(args.output).with_suffix(".png")) if args.output else None)
    for path in filter(None, (args.output, chart)):  # a path that cannot be written fails now, not after hours
        report.prepare_output(path)
    runs: dict[str, dict[str, dict[str, float]]] = {}
    counts: dict[str, int] = {}

    def result() -> dict:
        config = {"models": list(runs), "tasks": names, "data_dir": str(args.data_dir), "server": args.server,
                  "limit": args.limit, "num_fewshot": args.num_fewshot, "seed": args.seed, "examples": counts,
                  "shots": {n: TASKS[n].shots if args.num_fewshot is None else args.num_fewshot for n in names}}
        return report.to_json(runs, config)

    for label, backend in _backends(args):
        runs[label] = {}
        for name in names:
            start = time.perf_counter()
            runs[label][name], counts[name] = evaluate(TASKS[name], backend, args.data_dir, limit=args.limit,
                                                       num_fewshot=args.num_fewshot, seed=args.seed)
            print(f"{label} {name}: {counts[name]} examples in {time.perf_counter() - start:.1f} s", file=sys.stderr)
            if args.output:  # after every task, so a crash later keeps the tasks done
                report.write_json(args.output, result())
    print(report.table(runs))
    if chart:
        report.plot(runs, chart)
    return result()
