"""Tensor parallelism over torch.distributed: one model split across processes (gloo on CPU, NCCL
on CUDA), started by torchrun.

    torchrun --nproc-per-node 2 -m mistral7b generate|chat|serve --tp 2 ...

`shard.py` says which part of each weight a rank holds and wraps the layers that communicate;
`run.py` runs the processes: rank 0 runs the command and the others mirror its model calls.
"""

from .run import Leader, follow, is_rank0, launch, load_everywhere, shard
from .shard import Shard, possible_sizes

__all__ = ["Leader", "Shard", "follow", "is_rank0", "launch", "load_everywhere", "possible_sizes", "shard"]
