"""The fine-tuning loop: LoRA or full, AdamW with warmup + cosine, gradient clipping and accumulation,
optional activation checkpointing and bf16 autocast, atomic checkpoints, exact resume, data parallel
(DDP or FSDP, see distributed.py).

A step consumes `grad_accum * world_size` micro-batches, micro-batch `(step * grad_accum + a) * world + rank`
going to rank `rank`. Its loss is the summed token cross-entropy over the whole step divided by the
step's target-token count, and gradients are summed over micro-batches and ranks: so one process
with grad_accum=2 and two processes with grad_accum=1 take the same steps.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint
from tqdm.auto import tqdm

from .. import lora
from ..errors import InputError
from ..model import Transformer
from ..tokenizer import load_tokenizer
from ..weights import parse_dtype, load, save
from ..weights.common import build_model
from . import checkpoint, distributed
from .data import Batches, MicroBatch, read_jsonl
from .outputs import save_tokenizer
from .report import Metrics, Progress, plot


@dataclass
class TrainConfig:
    model: str | None  # checkpoint path; None: the built-in default model
    data: str
    out: str
    eval_data: str | None = None
    lora: lora.LoRAConfig | None = None  # None: full fine-tuning
    steps: int | None = None  # None: `epochs` passes over the data, at least MIN_STEPS (see default_steps)
    epochs: float = 3.0
    lr: float | None = None  # None: default_lr
    batch_size: int = 4  # rows of seq_len tokens per micro-batch
    seq_len: int = 2048
    grad_accum: int = 1
    warmup: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_every: int = 0  # 0: only at the end
    eval_every: int | None = None  # None: ~5 times a run, 0: at the end only (and before training, with eval_data)
    seed: int = 0
    dtype: str = "auto"  # weights: auto = bf16 base for LoRA on CUDA, else fp32
    quantize: str | None = None  # LoRA only: "int8" or "int4" frozen base for the target layers
    autocast: str = "auto"  # bf16 autocast: auto = on where the device supports bf16 (CUDA)
    activation_checkpointing: bool = False
    device: str = "cpu"
    parallel: str = "ddp"  # under torchrun: "ddp" (replicas) or "fsdp" (sharded), see distributed.py
    resume: bool = False
    progress: bool | None = None  # None: a bar when stderr is a terminal
    tokenizer: str | None = None  # tokenizer file or folder; None: the model's own

    # Settings a resumed run must share with the run it continues.
    _RUN_KEYS = ("model", "data", "lora", "quantize", "batch_size", "seq_len", "grad_accum", "seed", "lr", "warmup",
                 "weight_decay", "steps")

    def run_settings(self, world: int) -> dict:
        out = {k: getattr(self, k) for k in self._RUN_KEYS}
        out["lora"] = dataclasses.asdict(self.lora) if self.lora else None
        return {**out, "world_size": world}


# Defaults that learn from small data. Measured on SmolLM2-135M, LoRA rank 8, 10 chat lines of a made-up
# fact (benchmarks/finetune_fact.py, BENCHMARKS.md): 20 steps at 2e-4 did not learn it; 10 steps at 1e-3
# did, for new phrasings too, and lowered the loss on other facts; 20-30 steps at 1e-3 or 20 at 2e-3
# learnt it and over-fit (it answered other capitals with it). Long runs keep QLoRA's 2e-4.
MIN_STEPS = 10


def default_steps(epochs: float, per_epoch: int, per_step: int) -> int:
    """`epochs` passes over the data, but at least MIN_STEPS: ten lines fill one micro-batch, and
    three steps of it teach nothing."""
    return max(MIN_STEPS, math.ceil(epochs * per_epoch / per_step))


def default_lr(lora: bool, steps: int) -> float:
    """Peak learning rate: LoRA 1e-3 for short runs (up to 100 steps), 2e-4 beyond; full fine-tuning 2e-5."""
    if not lora:
        return 2e-5
    return 1e-3 if steps <= 100 else 2e-4


def lr_schedule(warmup: int, steps: int):
    """Linear warmup over `warmup` steps, then cosine decay to 0 at `steps`: a multiplier of the peak lr."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def enable_activation_checkpointing(model: Transformer) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them (memory for time)."""
    for block in model.layers:
        block.forward = lambda *args, _forward=block.forward: _checkpoint(_forward, *args, use_reentrant=False)


def _loss_sum(model: nn.Module, mb: MicroBatch, device: torch.device, use_autocast: bool) -> torch.Tensor:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
        # Only target positions go through the vocabulary projection: [N, vocab] fp32.
        logits = model(mb.input_ids.to(device), mb.seqlens, output_rows=mb.positions.to(device))
    return F.cross_entropy(logits, mb.targets.to(device), reduction="sum")


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[MicroBatch], device: torch.device, use_autocast: bool,
             bar: bool = False) -> float:
    model.eval()
    total = sum(_loss_sum(model, mb, device, use_autocast).item()
                for mb in tqdm(batches, desc="eval", unit="batch", leave=False, disable=not bar))
    model.train()
    return total / sum(mb.n_targets for mb in batches)


def _trainable(model: Transformer) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _prepare_model(cfg: TrainConfig, device: torch.device, world: int) -> Transformer:
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bf16" if cfg.lora and device.type == "cuda" else "fp32"
    # FSDP moves each rank's shards to the device itself: the whole model never has to fit there.
    fsdp = cfg.parallel == "fsdp" and world > 1
    model = load(cfg.model, dtype=parse_dtype(dtype), device="cpu" if fsdp else device)
    torch.manual_seed(cfg.seed)  # the same LoRA initialisation on every rank
    if cfg.lora:
        if cfg.quantize:
            _quantize_targets(model, cfg.lora.targets, cfg.quantize)
        lora.apply_lora(model, cfg.lora)
    else:
        model.requires_grad_(True)
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    return model.train()


def _quantize_targets(model: Transformer, targets: tuple[str, ...], mode: str) -> None:
    """Store the LoRA target layers' frozen weights quantized (see mistral7b.quant); the embeddings,
    norms and output projection keep their dtype."""
    from ..quant import Int4Linear, Int8Linear

    layer = {"int8": Int8Linear, "int4": Int4Linear}[mode]
    for _, parent, name in lora.target_modules(model, targets):
        weight = getattr(parent, name).weight
        setattr(parent, name, layer.from_float(weight.detach()).to(weight.device))


def _check_config(cfg: TrainConfig) -> None:
    for name in ("batch_size", "seq_len", "grad_accum"):
        if getattr(cfg, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.steps is not None and cfg.steps <= 0:
        raise InputError(f"--steps must be positive, got {cfg.steps}")
    if cfg.lr is not None and cfg.lr <= 0:
        raise InputError(f"--lr must be positive, got {cfg.lr}")
    if cfg.epochs <= 0:
        raise InputError(f"--epochs must be positive, got {cfg.epochs:g}")
    if cfg.quantize not in (None, "int8", "int4"):
        raise InputError(f"--quantize must be int8 or int4, got {cfg.quantize!r}")
    if cfg.quantize and not cfg.lora:
        raise InputError("--quantize needs LoRA: quantized weights are frozen, so --full cannot train them")
    if cfg.parallel not in distributed.MODES:
        raise InputError(f"--parallel must be one of {', '.join(distributed.MODES)}, got {cfg.parallel!r}")


def train(cfg: TrainConfig) -> Path:
    """Run fine-tuning as `cfg` says; returns the output folder (an adapter, or a full checkpoint)."""
    _check_config(cfg)
    rank, world = distributed.world()
    out = Path(cfg.out)
    ckpt_root = out / "checkpoints"
    found = checkpoint.completed(ckpt_root)
    if found and not cfg.resume:
        raise InputError(f"{out} already holds training checkpoints; pass --resume to continue, or choose a new --out")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cfg.device == "cuda" else cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the device NCCL and FSDP's mesh use on this rank
    use_autocast = {"on": True, "off": False}.get(cfg.autocast, device.type == "cuda" and torch.cuda.is_bf16_supported())
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    data = Batches(read_jsonl(cfg.data, tokenizer, cfg.seq_len), seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                   seed=cfg.seed)
    eval_batches = None
    if cfg.eval_data:
        eval_batches = Batches(read_jsonl(cfg.eval_data, tokenizer, cfg.seq_len), seq_len=cfg.seq_len,
                               batch_size=cfg.batch_size, seed=cfg.seed, shuffle=False).epoch()
    per_step = cfg.grad_accum * world
    steps = cfg.steps or default_steps(cfg.epochs, data.per_epoch, per_step)
    cfg = dataclasses.replace(cfg, steps=steps, lr=cfg.lr or default_lr(cfg.lora is not None, steps))

    model = _prepare_model(cfg, device, world)
    wrapped = distributed.wrap(model, cfg.parallel, world, device)  # `model` itself unless DDP
    sharded = distributed.sharded(wrapped)
    if world > 1:
        held = distributed.parameter_bytes(model)
        print(f"rank {rank}/{world} holds {held / 2**20:.1f} MiB of parameters ({held} bytes, {cfg.parallel})",
              file=sys.stderr, flush=True)
    params = _trainable(model)
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg.warmup, steps))
    settings = cfg.run_settings(world)

    start = 0
    torch.manual_seed(cfg.seed + 1 + rank)  # dropout: a stream of its own per rank
    if cfg.resume and found:
        tensors, opt_state, state = checkpoint.load(found[-1])
        changed = {k for k in settings if state["settings"].get(k) != settings[k]}
        if changed:
            raise InputError(f"{found[-1]}: was written by a run with other settings ({', '.join(sorted(changed))}); "
                             "resume with the same flags, or start a new --out")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(distributed.shard_like(tensors[name], p))
        optimizer.load_state_dict(distributed.shard_optimizer(opt_state, list(params.values())))
        scheduler.load_state_dict(state["scheduler"])
        checkpoint.set_rng_state(state["rng"][rank])
        start = state["step"]

    lead = rank == 0
    if lead:
        out.mkdir(parents=True, exist_ok=True)
    metrics = Metrics(out / "metrics.jsonl", start) if lead else None
    progress = Progress(steps, start, enabled=lead and cfg.progress is not False)
    progress.write(_plan(cfg, data, eval_batches, per_step))
    eval_every = cfg.eval_every if cfg.eval_every is not None else max(1, steps // 5)

    def save_checkpoint(step: int) -> None:
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, checkpoint.rng_state())
        else:
            rngs = [checkpoint.rng_state()]
        trainable = distributed.gather(params, keep=lead)  # every rank: collectives under FSDP
        opt_state = distributed.gather_optimizer(optimizer.state_dict(), keep=lead)
        if lead:
            folder = checkpoint.save(ckpt_root, step, trainable, opt_state,
                                     {"scheduler": scheduler.state_dict(), "rng": rngs, "settings": settings})
            progress.write(f"saved checkpoint {folder}")

    def run_eval(step: int) -> None:
        # Every FSDP rank runs the forward (each holds a shard of every weight); else rank 0 alone.
        if eval_batches and (lead or sharded):
            loss = evaluate(model, eval_batches, device, use_autocast, bar=progress.tty)
            if lead:
                metrics.log(step=step, eval_loss=loss)
                progress.write(f"step {step}/{steps}: eval loss {loss:.4f}" + (" (before training)" if step == 0 else ""))

    if start == 0:
        run_eval(0)  # the held-out loss to beat: over-fitting shows as the loss rising past it
    started = time.perf_counter()
    for step in range(start, steps):
        t0 = time.perf_counter()
        batches = [data[(step * cfg.grad_accum + a) * world + rank] for a in range(cfg.grad_accum)]
        counts = torch.tensor([sum(mb.n_targets for mb in batches), sum(len(mb.input_ids) for mb in batches)],
                              dtype=torch.float64)
        n_targets, n_tokens = distributed.all_sum(counts, world).tolist()
        loss_sum = torch.zeros((), dtype=torch.float64)
        for a, mb in enumerate(batches):
            with distributed.gradient_sync(wrapped, sync=a == len(batches) - 1):
                loss = _loss_sum(wrapped, mb, device, use_autocast)
                # DDP and FSDP average gradients over ranks; times `world`, that is their sum.
                (loss * world / n_targets).backward()
            loss_sum += loss.detach().double().cpu()
        distributed.all_sum(loss_sum, world)
        grad_norm = distributed.whole(torch.nn.utils.clip_grad_norm_(params.values(), cfg.max_grad_norm)).item()
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0
        done = step + 1
        if lead:
            loss_value = loss_sum.item() / n_targets
            metrics.log(step=done, loss=loss_value, lr=lr, grad_norm=grad_norm, tokens=int(n_tokens),
                        tokens_per_s=n_tokens / elapsed, elapsed_s=time.perf_counter() - started)
            progress.step(done, loss=f"{loss_value:.4f}", tok_s=f"{n_tokens / elapsed:.0f}")
        if eval_every and done % eval_every == 0 and done < steps:
            run_eval(done)
        if (cfg.save_every and done % cfg.save_every == 0) or done == steps:
            save_checkpoint(done)
    progress.close()
    run_eval(steps)
    result = _result_model(model, cfg, lead)
    if lead:
        _write_result(result, cfg, out)
        plot(metrics.records(), out / "loss.png")
        progress.write(_eval_summary(metrics.records()))
    if world > 1:
        dist.barrier()
    return out


def _plan(cfg: TrainConfig, data: Batches, eval_batches: list[MicroBatch] | None, per_step: int) -> str:
    """One line saying what the run will do, before its first (slow) step."""
    targets = sum(sum(s.target) for s in data.samples)
    epochs = cfg.steps * per_step / data.per_epoch
    held = f", {sum(mb.n_targets for mb in eval_batches)} held-out target tokens" if eval_batches else ""
    what = f"LoRA rank {cfg.lora.rank}" if cfg.lora else "full"
    return (f"finetune: {len(data.samples)} samples ({targets} target tokens{held}), {data.per_epoch} "
            f"micro-batches an epoch: {cfg.steps} steps = {epochs:.3g} epochs, {what}, lr {cfg.lr:g}")


def _eval_summary(records: list[dict]) -> str:
    """The held-out loss before, at its lowest and at the end; it rising again means over-fitting."""
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    train = [r["loss"] for r in records if "loss" in r]
    line = f"train loss {train[0]:.4f} -> {train[-1]:.4f}" if train else "no new steps"
    if not evals:
        return line + " (no --eval-data: over-fitting cannot be seen)"
    (first_step, first), (low_step, low), last = evals[0], min(evals, key=lambda e: e[1]), evals[-1][1]
    line += (f"; eval loss {first:.4f} at step {first_step}, lowest {low:.4f} at step {low_step}, "
             f"{last:.4f} at the end")
    if last > 1.1 * low:
        line += (": it rose from its lowest, so the model over-fits the training data (fewer --epochs or "
                 "--steps, a lower --lr, or more varied data)")
    return line


def _result_model(model: Transformer, cfg: TrainConfig, lead: bool) -> Transformer | None:
    """The model whose weights are the result: `model`, or under FSDP a CPU copy gathered on rank 0
    (None elsewhere) that holds only the LoRA factors for LoRA (the frozen base is not written)."""
    if not distributed.sharded(model):
        return model
    named = {name: p for name, p in model.named_parameters() if p.requires_grad or not cfg.lora}
    tensors = distributed.gather(named, keep=lead)
    if not lead:
        return None
    if not cfg.lora:
        return build_model(model.args, tensors.items(), source=Path(cfg.out), dtype=None, device="cpu")
    with torch.device("meta"):
        copy = lora.apply_lora(Transformer(model.args), cfg.lora)
    copy.load_state_dict(tensors, strict=False, assign=True)
    return copy


def _write_result(model: Transformer, cfg: TrainConfig, out: Path) -> None:
    """The adapter (LoRA) or a reference-format checkpoint with its tokenizer (full) in `out`."""
    if cfg.lora:
        lora.save_adapter(model, out, base_model=cfg.model)
    else:
        save(model, out)
        save_tokenizer(cfg.tokenizer or cfg.model, out)
