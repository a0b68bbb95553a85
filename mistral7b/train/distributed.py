"""Data-parallel training over torch.distributed: DDP or FSDP2, and whole tensors for checkpoints.

* `ddp`: every process holds the whole model; `DistributedDataParallel` all-reduces gradients in
  buckets during the backward pass.
* `fsdp`: `fully_shard` on each TransformerBlock and on the root, so each process holds 1/world of
  every parameter, gradient and optimizer state (DTensors sharded on dim 0); a block's weights are
  all-gathered just before it runs and freed after. For models whose training state does not fit one
  device. Works on CPU with gloo as on CUDA with NCCL. Buffers (a quantized LoRA base) are not
  sharded: each rank keeps a whole copy.

Both average gradients over ranks; the loop wants their sum (see loop.py) and scales its loss by the
world size. Checkpoints and results hold whole tensors whatever the mode: `gather` collects them
(a collective: every rank calls it) and `shard_like` cuts them back on resume.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from ..model import Transformer

MODES = ("ddp", "fsdp")


def world() -> tuple[int, int]:
    """(rank, world size); joins the process group when started by torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), size) if size > 1 else (0, 1)


def wrap(model: Transformer, mode: str, size: int, device: torch.device) -> nn.Module:
    """The module to train: `model` itself in one process, DDP around it, or `model` sharded in place."""
    if size == 1:
        return model
    if mode == "ddp":
        # Every rank loads the same weights; buffers (a quantized base) need no broadcast each step.
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       broadcast_buffers=False)
    mesh = init_device_mesh(device.type, (size,))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)  # the rest: embeddings, final norm, output
    return model


def sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def gradient_sync(module: nn.Module, sync: bool):
    """Context of one micro-batch's backward: without sync (accumulation micro-steps) gradients add up
    locally, and are reduced once, in the last micro-step's backward."""
    if isinstance(module, DistributedDataParallel) and not sync:
        return module.no_sync()
    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(sync)
    return nullcontext()


def all_sum(tensor: torch.Tensor, size: int) -> torch.Tensor:
    if size > 1:
        dist.all_reduce(tensor)
    return tensor


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor shard as the whole tensor, on every rank (a collective); a plain tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gather(tensors: dict, keep: bool) -> dict[str, torch.Tensor]:
    """Whole CPU copies of `tensors`, one at a time (device memory peaks at one whole tensor); kept
    only where `keep` (rank 0), the other ranks just take part in the collectives."""
    out = {}
    for name, tensor in tensors.items():
        copy = whole(tensor.detach()).cpu()
        if keep:
            out[name] = copy
    return out


def gather_optimizer(state: dict, keep: bool) -> dict:
    """`optimizer.state_dict()` with whole state tensors: the format of a single process's."""
    per_param = {index: gather(values, keep) for index, values in state["state"].items()}
    return {"state": per_param, "param_groups": state["param_groups"]} if keep else {}


def shard_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Whole `tensor` cut as DTensor `like` is (each rank keeps its shard, no communication)."""
    if not isinstance(like, DTensor):
        return tensor
    return distribute_tensor(tensor.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def shard_optimizer(state: dict, params: list[torch.Tensor]) -> dict:
    """A saved optimizer state (whole tensors) cut like the parameters it belongs to."""
    for index, values in state["state"].items():
        for key, value in values.items():
            if value.dim():  # not the 0-d step counter
                values[key] = shard_like(value, params[index])
    return state


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds (its shards under FSDP)."""
    return sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in model.parameters())
