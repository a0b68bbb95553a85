"""One rank's part of a tensor-parallel model, and the layers that join the parts.

Rank r of N holds heads [r*H/N, (r+1)*H/N) (query and key/value heads alike, so each rank's GQA
groups stay whole), FFN columns [r*F/N, (r+1)*F/N) and a 1/N block of the vocabulary rows:

    wq, wk, wv, w1, w3   column-parallel: their output rows are split; no communication
    wo, w2               row-parallel: their input columns are split; all-reduce the partial sums
    tok_embeddings       vocabulary rows split: masked lookup, all-reduce (one rank holds each id)
    output               vocabulary rows split: rank 0 gathers the logit columns of every rank

So a block costs two all-reduces of [T, dim]. The rank's model is a plain `Transformer` built from
its *local* `ModelArgs` (n_heads/N, n_kv_heads/N, hidden_dim/N, vocabulary block), whose attention,
RoPE and KV cache need no change; `parallelize` then wraps the four layers above. The wrappers hold
the linear as a child, so a later swap of it (quantization) keeps the communication.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..args import ModelArgs
from ..errors import ConfigError
from ..model import Transformer

# Module name -> the dimension of its weight that is split (0: output rows, 1: input columns).
_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1, "tok_embeddings": 0, "output": 0}


def possible_sizes(args: ModelArgs) -> list[int]:
    """The numbers of ranks a model splits over evenly (they divide every head count and the FFN)."""
    g = math.gcd(args.n_heads, args.n_kv_heads, args.hidden_dim)
    return [n for n in range(1, g + 1) if g % n == 0]


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int

    def check(self, args: ModelArgs) -> None:
        if self.world not in possible_sizes(args):
            raise ConfigError(
                f"--tp {self.world}: this model's {args.n_heads} attention heads, {args.n_kv_heads} key/value heads "
                f"and {args.hidden_dim} feed-forward columns do not split evenly over {self.world} ranks; "
                f"possible --tp values: {', '.join(map(str, possible_sizes(args)))}")

    def _range(self, size: int) -> tuple[int, int]:
        """This rank's block of `size` rows: ceil(size/N) each, the last one shorter if need be."""
        per = -(-size // self.world)
        return min(self.rank * per, size), min((self.rank + 1) * per, size)

    def local_args(self, args: ModelArgs) -> ModelArgs:
        """The architecture of this rank's part (a smaller model of the same shape)."""
        self.check(args)
        start, stop = self._range(args.vocab_size)
        if stop <= start:
            raise ConfigError(f"--tp {self.world}: a vocabulary of {args.vocab_size} tokens is too small to split")
        n = self.world
        return dataclasses.replace(args, n_heads=args.n_heads // n, n_kv_heads=args.n_kv_heads // n,
                                   hidden_dim=args.hidden_dim // n, vocab_size=stop - start)

    def part_of(self, name: str, shape: tuple[int, ...]) -> tuple[int, int, int] | None:
        """The (dim, start, stop) of checkpoint tensor `name` (our names) that this rank reads;
        None: all of it (the norms, replicated)."""
        dim = _SPLIT_DIM.get(name.rsplit(".", 2)[-2]) if name.endswith(".weight") else None
        if dim is None or len(shape) != 2:
            return None
        return (dim, *self._range(shape[dim]))

    def parallelize(self, model: Transformer, full: ModelArgs) -> Transformer:
        """Wrap a model built from `local_args(full)` and filled with `part_of` slices."""
        start, _ = self._range(full.vocab_size)
        model.tok_embeddings = VocabParallelEmbedding(model.tok_embeddings, start)
        model.output = VocabParallelOutput(model.output, full.vocab_size, -(-full.vocab_size // self.world))
        for layer in model.layers:
            layer.attention.wo = RowParallel(layer.attention.wo)
            layer.feed_forward.w2 = RowParallel(layer.feed_forward.w2)
        # Callers see the whole vocabulary (prompt checks); heads and FFN stay local (KV cache).
        model.args = dataclasses.replace(model.args, vocab_size=full.vocab_size)
        return model


class RowParallel(nn.Module):
    """A linear over this rank's input columns: [T, in/N] -> the sum over ranks [T, out]."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        dist.all_reduce(y)
        return y


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + n) of the embedding: ids [T] -> [T, dim], each id from the rank holding it."""

    def __init__(self, embedding: nn.Embedding, start: int):
        super().__init__()
        self.embedding, self.start = embedding, start

    @property
    def weight(self) -> torch.Tensor:  # Transformer.dtype / .device read it
        return self.embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.embedding.num_embeddings)
        h = self.embedding(local.masked_fill(outside, 0)).masked_fill_(outside[:, None], 0)
        dist.all_reduce(h)
        return h


class VocabParallelOutput(nn.Module):
    """The output projection over this rank's vocabulary rows. [N, dim] -> rank 0: logits
    [N, vocab] of all ranks; other ranks: their own columns [N, vocab/ranks] (unused)."""

    def __init__(self, linear: nn.Module, vocab_size: int, per_rank: int):
        super().__init__()
        self.linear, self.vocab_size, self.per_rank = linear, vocab_size, per_rank

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.linear(h)
        if y.shape[-1] < self.per_rank:  # the last block may be short: gather needs equal sizes
            y = F.pad(y, (0, self.per_rank - y.shape[-1]))
        parts = [torch.empty_like(y) for _ in range(dist.get_world_size())] if dist.get_rank() == 0 else None
        dist.gather(y, parts, dst=0)
        return torch.cat(parts, dim=-1)[:, :self.vocab_size] if parts else y
