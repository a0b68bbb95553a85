"""The Mistral transformer, pure torch: RMSNorm, RoPE, grouped-query sliding-window attention, SwiGLU.

One forward for every caller: a packed, variable-length batch without padding,
`forward(input_ids[T], seqlens, cache) -> logits[T, vocab]`. Parameter names are those of the
reference `consolidated.safetensors`, so a reference state dict loads as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .attention import attend
from .cache import KVCache, StepPlan, plan_without_cache


class Linear(nn.Linear):
    """nn.Linear without bias: every projection of the model."""

    def __init__(self, in_features: int, out_features: int, **kwargs):
        super().__init__(in_features, out_features, bias=False, **kwargs)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the model dtype, as the reference does.
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_rotation(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """positions [T] -> unit complex rotations [T, 1, head_dim/2] (computed per step: no table to outgrow)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[:, None] * inv_freq[None, :]
    return torch.polar(torch.ones_like(angles), angles)[:, None, :]


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim] rotated in interleaved pairs (x[2i], x[2i+1]) as complex numbers, as the
    reference does (one complex multiply: fewer ops per token than cos/sin arithmetic), in fp32."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [T, heads, head_dim/2]
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


def _to_padded(x: torch.Tensor, plan: StepPlan) -> torch.Tensor:
    """Packed [T, heads, head_dim] -> padded [B, heads, L, head_dim]."""
    if plan.pad_index is not None:
        padded = x.new_zeros(plan.batch * plan.length, *x.shape[1:])
        x = padded.index_copy_(0, plan.pad_index, x)
    return x.view(plan.batch, plan.length, *x.shape[1:]).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = Linear(args.dim, args.n_heads * args.head_dim)
        self.wk = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wv = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, plan: StepPlan,
                cache: KVCache | None, layer: int) -> torch.Tensor:
        """x [T, dim] -> [T, dim]."""
        return self.wo(self.mix(self.wq(x), self.wk(x), self.wv(x), rope, plan, cache, layer))

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: torch.Tensor, plan: StepPlan,
            cache: KVCache | None, layer: int) -> torch.Tensor:
        """Projected q [T, H*hd], k, v [T, Hkv*hd] -> attention output [T, H*hd] (before wo): RoPE,
        the cache's keys and values, and the plan's attention."""
        T = q.shape[0]
        q = apply_rope(q.view(T, self.n_heads, self.head_dim), rope)  # [T, H, hd]
        k = apply_rope(k.view(T, self.n_kv_heads, self.head_dim), rope)  # [T, Hkv, hd]
        v = v.view(T, self.n_kv_heads, self.head_dim)
        if plan.decode:  # T = B sequences, one token each: attend over the cache in place
            keys, values = cache.append_and_read(layer, plan, k, v)  # [B, Hkv, used, hd]
            # In the activations' dtype: a cache may be stored coarser (fp16 for quantized models).
            out = attend(q[:, :, None], keys.to(q.dtype), values.to(q.dtype), plan)  # [B, H, 1, hd]
            return out.reshape(T, -1)

        qp, kp, vp = _to_padded(q, plan), _to_padded(k, plan), _to_padded(v, plan)  # [B, heads, L, hd]
        if cache is not None:
            cached_k, cached_v = cache.keys_values(layer, plan)  # [B, S, Hkv, hd]
            kp = torch.cat([cached_k.transpose(1, 2).to(kp.dtype), kp], dim=2)  # [B, Hkv, S+L, hd]
            vp = torch.cat([cached_v.transpose(1, 2).to(vp.dtype), vp], dim=2)
            cache.write(layer, plan, k, v)  # after reading: the mask refers to the old slots
        out = attend(qp, kp, vp, plan)  # [B, H, L, hd]
        out = out.transpose(1, 2).reshape(plan.batch * plan.length, -1)  # [B*L, H*hd]
        return out if plan.pad_index is None else out[plan.pad_index]


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = Linear(args.dim, args.hidden_dim)  # gate
        self.w2 = Linear(args.hidden_dim, args.dim)  # down
        self.w3 = Linear(args.dim, args.hidden_dim)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU: [T, dim] -> [T, hidden] -> [T, dim]


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, rope, plan, cache, layer):
        h = x + self.attention(self.attention_norm(x), rope, plan, cache, layer)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # Built from an explicit tensor: nn.Embedding's own init costs ~2 s of imports on the meta
        # device, where loading builds the model; real tensors get the usual N(0, 1) init.
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, _weight=torch.empty(args.vocab_size, args.dim))
        if not self.tok_embeddings.weight.is_meta:
            nn.init.normal_(self.tok_embeddings.weight)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size)
        if args.tied_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.kv_cache_dtype: torch.dtype | None = None  # None: default_kv_cache_dtype()

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    def default_kv_cache_dtype(self) -> torch.dtype:
        """The model's dtype, but fp16 for weight-quantized models computing in fp32: their keys and
        values need not be stored finer than their weights, and fp16 halves the cache's memory and the
        bytes a decode step reads per cached position (at Mistral 7B's 4096-token window: 512 MiB per
        sequence instead of 1 GiB). llama.cpp keeps an fp16 cache by default likewise."""
        integer_weights = any(not b.is_floating_point() for b in self.buffers())  # mistral7b.quant's layers
        if self.dtype == torch.float32 and integer_weights:
            return torch.float16
        return self.dtype

    @property
    def cache_dtype(self) -> torch.dtype:
        """The dtype of the caches new_cache() makes: `kv_cache_dtype` when set, else the default."""
        return self.kv_cache_dtype or self.default_kv_cache_dtype()

    def new_cache(self, max_seqs: int, max_len: int | None = None, **pool) -> KVCache:
        """A KV cache in `cache_dtype` on this model's device; `pool`: KVCache's n_blocks, block_size."""
        return KVCache(self.args, max_seqs, max_len, dtype=self.cache_dtype, device=self.device, **pool)

    def plan(self, input_ids: torch.Tensor, seqlens: list[int], cache: KVCache | None,
             rows: list[int] | None) -> StepPlan:
        """The step's attention plan (shared by every layer), after checking the packed input."""
        if input_ids.dim() != 1 or input_ids.shape[0] != sum(seqlens):
            raise ValueError(f"input_ids must be 1-D with sum(seqlens)={sum(seqlens)} tokens, got shape {tuple(input_ids.shape)}")
        if cache is None:
            return plan_without_cache(seqlens, self.args.sliding_window, input_ids.device)
        return cache.plan(seqlens, rows)

    def forward(self, input_ids: torch.Tensor, seqlens: list[int], cache: KVCache | None = None,
                *, rows: list[int] | None = None, output_rows: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [T] (sequences packed back to back, len(seqlens) of them) -> logits [T, vocab] fp32.

        With a cache, the tokens continue the sequences held in cache rows `rows` (default 0..B-1)
        and their keys/values are appended; without one, each sequence starts at position 0.
        `output_rows` [N] picks the positions whose logits are wanted (-> [N, vocab]): a pre-fill
        needs only its last one, and the vocabulary projection is a large share of the work.
        (mistral7b.runner runs this same model faster for inference.)
        """
        plan = self.plan(input_ids, seqlens, cache, rows)
        h = self.tok_embeddings(input_ids)  # [T, dim]
        rope = rope_rotation(plan.positions, self.args.head_dim, self.args.rope_theta)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, plan, cache, i)
        normed = self.norm(h if output_rows is None else h[output_rows])
        if cache is not None:
            cache.commit(plan, seqlens, rows)
        return self.output(normed).float()
