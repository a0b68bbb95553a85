"""The Mistral transformer, pure torch: RMSNorm, RoPE, grouped-query sliding-window attention, SwiGLU.

One forward for every caller: a packed, variable-length batch without padding,
`forward(input_ids[T], seqlens, cache) -> logits[T, vocab]`. Parameter names are those of the
reference `consolidated.safetensors`, so a reference state dict loads as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .args import ModelArgs
from .attention import attend
from .cache import KVCache, StepPlan, plan_without_cache
from .quant import QuantLinear, quantized_mode


class Linear(nn.Linear):
    """nn.Linear (no bias) whose few-row products (decode) use mistral7b.kernels' GEMV: at batch 1
    a BLAS call's fixed cost is most of the time of a small matrix."""

    def __init__(self, in_features: int, out_features: int, **kwargs):
        super().__init__(in_features, out_features, bias=False, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.float_linear(x, self.weight)


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


def _weight_ptr(module: nn.Module) -> int:
    """Address of a layer's weight data (-1: none): it changes when the weight is replaced or cast."""
    weight = module.qweight if isinstance(module, QuantLinear) else getattr(module, "weight", None)
    return -1 if weight is None else weight.data_ptr()


class FusedProjection:
    """Projections of the same input (q/k/v, or gate/up) as one matmul: at batch 1 every matmul
    call has a fixed cost, so three calls cost more than one three times the size.

    The parts become views of the fused weight (no extra memory), and this object lives outside
    the module tree, so state_dict, saving, LoRA and tensor parallelism still see only the parts.
    Anything that replaces a part or its weight (LoRA wrapping, a dtype cast) makes `matches`
    false, and the caller falls back to the separate projections.
    """

    def __init__(self, parts: list[nn.Module]):
        self.parts = parts
        self.sizes = [p.out_features for p in parts]
        if all(hasattr(p, "concat") and type(p) is type(parts[0]) for p in parts):  # quant.QuantLinear
            self.linear = type(parts[0]).concat(parts)
            bind = lambda part, a, b: part.view_rows_of(self.linear, a, b)
        elif all(isinstance(p, nn.Linear) and p.bias is None for p in parts):
            weight = torch.cat([p.weight.detach() for p in parts])  # [sum(out), in]
            self.linear = Linear(weight.shape[1], weight.shape[0], device="meta")
            self.linear.weight = nn.Parameter(weight, requires_grad=False)
            bind = lambda part, a, b: setattr(part, "weight", nn.Parameter(weight[a:b], part.weight.requires_grad))
        else:
            raise TypeError("only plain or identically quantized linear layers without bias can be fused")
        start = 0
        for part, size in zip(parts, self.sizes):
            bind(part, start, start + size)
            start += size
        self.ptrs = [_weight_ptr(p) for p in parts]

    def matches(self, parts: list[nn.Module]) -> bool:
        return all(a is b for a, b in zip(parts, self.parts)) and [_weight_ptr(p) for p in parts] == self.ptrs

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(x).split(self.sizes, dim=-1)


def _kernel_tensors(linear: nn.Module) -> list[torch.Tensor] | None:
    """A linear layer as kernels.decode_step takes it, or None when the native step cannot run it
    (a LoRA or tensor-parallel wrapper, an fp16 weight)."""
    if type(linear) is Linear and linear.weight.dtype in (torch.float32, torch.bfloat16):
        return [linear.weight]
    if isinstance(linear, QuantLinear):
        return [getattr(linear, name) for name in linear.tensor_names]
    return None


def _matching(fused: FusedProjection | None, parts: list[nn.Module]) -> FusedProjection | None:
    """`fused` if it still computes exactly `parts`, else None."""
    return fused if fused is not None and fused.matches(parts) else None


def _fused_or_none(fused: FusedProjection | None, parts: list[nn.Module]) -> FusedProjection | None:
    # Training needs the parts' own parameters in the autograd graph.
    return None if torch.is_grad_enabled() else _matching(fused, parts)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = Linear(args.dim, args.n_heads * args.head_dim)
        self.wk = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wv = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim)
        self.fused_qkv: FusedProjection | None = None

    def fuse(self) -> None:
        self.fused_qkv = FusedProjection([self.wq, self.wk, self.wv])

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, dim] -> q [T, H*hd], k, v [T, Hkv*hd]."""
        parts = [self.wq, self.wk, self.wv]
        fused = _fused_or_none(self.fused_qkv, parts)
        return fused(x) if fused else tuple(p(x) for p in parts)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, plan: StepPlan,
                cache: KVCache | None, layer: int) -> torch.Tensor:
        T = x.shape[0]
        q, k, v = self.project_qkv(x)
        q = apply_rope(q.view(T, self.n_heads, self.head_dim), rope)  # [T, H, hd]
        k = apply_rope(k.view(T, self.n_kv_heads, self.head_dim), rope)  # [T, Hkv, hd]
        v = v.view(T, self.n_kv_heads, self.head_dim)
        if plan.decode:  # T = B sequences, one token each: attend over the cache in place
            keys, values = cache.append_and_read(layer, plan, k, v)  # [B, Hkv, used, hd]
            # In the activations' dtype: a cache may be stored coarser (fp16 for quantized models).
            out = attend(q[:, :, None], keys.to(q.dtype), values.to(q.dtype), plan)  # [B, H, 1, hd]
            return self.wo(out.reshape(T, -1))

        qp, kp, vp = _to_padded(q, plan), _to_padded(k, plan), _to_padded(v, plan)  # [B, heads, L, hd]
        if cache is not None:
            cached_k, cached_v = cache.keys_values(layer, plan)  # [B, S, Hkv, hd]
            kp = torch.cat([cached_k.transpose(1, 2).to(kp.dtype), kp], dim=2)  # [B, Hkv, S+L, hd]
            vp = torch.cat([cached_v.transpose(1, 2).to(vp.dtype), vp], dim=2)
            cache.write(layer, plan, k, v)  # after reading: the mask refers to the old slots
        out = attend(qp, kp, vp, plan)  # [B, H, L, hd]
        out = out.transpose(1, 2).reshape(plan.batch * plan.length, -1)  # [B*L, H*hd]
        if plan.pad_index is not None:
            out = out[plan.pad_index]
        return self.wo(out)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = Linear(args.dim, args.hidden_dim)  # gate
        self.w2 = Linear(args.hidden_dim, args.dim)  # down
        self.w3 = Linear(args.dim, args.hidden_dim)  # up
        self.fused_gate_up: FusedProjection | None = None

    def fuse(self) -> None:
        self.fused_gate_up = FusedProjection([self.w1, self.w3])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = _fused_or_none(self.fused_gate_up, [self.w1, self.w3])
        gate, up = fused(x) if fused else (self.w1(x), self.w3(x))  # [T, hidden] each
        return self.w2(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)
        self._native_key, self._native = None, None  # see native_weights

    def native_weights(self) -> tuple[list[torch.Tensor], list[int]] | None:
        """The block as kernels.decode_step takes it: ([attention_norm, ffn_norm, *qkv, *wo, *gate_up,
        *down], [tensors in qkv, wo, gate_up, down]), or None when it cannot run natively (unfused,
        LoRA- or tensor-parallel-wrapped projections, fp16 weights).
        Validating every module per token would cost more than the layer's arithmetic, so the result
        is kept while the block holds the same modules and fused projections (a LoRA wrap, a
        quantization or re-fusing replaces them); `_apply` (casts, moves) drops it."""
        attn, ffn = self.attention, self.feed_forward
        key = (*self._modules.values(), *attn._modules.values(), *ffn._modules.values(),
               attn.fused_qkv, ffn.fused_gate_up)
        if self._native_key != key:
            self._native_key, self._native = key, self._build_native_weights()
        return self._native

    def _apply(self, fn, *args, **kwargs):
        self._native_key = self._native = None
        return super()._apply(fn, *args, **kwargs)

    def _build_native_weights(self) -> tuple[list[torch.Tensor], list[int]] | None:
        attn, ffn = self.attention, self.feed_forward
        qkv = _matching(attn.fused_qkv, [attn.wq, attn.wk, attn.wv])
        gate_up = _matching(ffn.fused_gate_up, [ffn.w1, ffn.w3])
        if qkv is None or gate_up is None:
            return None
        linears = [_kernel_tensors(m) for m in (qkv.linear, attn.wo, gate_up.linear, ffn.w2)]
        if any(t is None for t in linears) or type(self.attention_norm) is not RMSNorm or type(self.ffn_norm) is not RMSNorm:
            return None
        return [self.attention_norm.weight, self.ffn_norm.weight, *sum(linears, [])], [len(t) for t in linears]

    def forward(self, x, rope, plan, cache, layer):
        h = x + self.attention(self.attention_norm(x), rope, plan, cache, layer)
        return h + self.feed_forward(self.ffn_norm(h))


# Longest pre-fill of one sequence run as native chunks of GEMV_MAX_ROWS tokens. Measured on SmolLM2,
# 2 threads, against one eager chunk: fp32 weights break even at 64 tokens (MKL's matmul on the whole
# chunk); bf16 (whose eager matmul is slow here) and int8/int4 (dequantized tiles) gain up to 128 and
# beyond: bf16 3.9x at 128 tokens, int4 1.7x at 64 and about even at 128.
NATIVE_PREFILL_TOKENS = {torch.float32: 64}
NATIVE_PREFILL_TOKENS_DEFAULT = 128


def _native_rows(plan: StepPlan, cache: KVCache) -> tuple | None:
    """kernels.decode_step's view of a step, (write_dst [T], used slots, mask [T, used] or None,
    positions [T]), where it can run the step; else None. A decode step's rows are its sequences. One
    sequence's pre-fill chunk of T <= GEMV_MAX_ROWS tokens runs as T rows of that sequence, each token
    attending to the slots up to its own, while the chunk does not wrap the rolling buffer (slot j then
    holds position j): the eager blocks' ~15 ops per layer cost a short prompt (a chat turn) as much as
    its GEMVs."""
    if plan.decode:
        return plan.write_dst, plan.used_slots, None if plan.mask is None else plan.mask[:, 0, 0], plan.positions
    if plan.batch != 1 or plan.mask is not None or plan.key_shift or plan.length > kernels.GEMV_MAX_ROWS:
        return None
    end = int(plan.positions[-1]) + 1  # the chunk fills slots [0, end)
    if end > cache.slots:
        return None
    causal = torch.arange(end, device=plan.positions.device)[None, :] <= plan.positions[:, None]  # [T, end]
    return plan.write_dst, end, causal, plan.positions


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
        self._native_blocks, self._native_flat = [], None  # see _native_decode
        self.kv_cache_dtype: torch.dtype | None = None  # None: default_kv_cache_dtype()

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    def fuse_projections(self) -> Transformer:
        """Compute q/k/v and gate/up as one matmul each at inference (idempotent; call it again
        after quantizing or casting). The engine does this for every model it runs."""
        for layer in self.layers:
            layer.attention.fuse()
            layer.feed_forward.fuse()
        return self

    def _native_blocks_or_none(self, h: torch.Tensor, cache: KVCache) -> tuple | None:
        """(weights, linear_sizes) of every block for kernels.decode_step, or None where it cannot run
        (autograd, too many rows, a block it cannot run)."""
        if not kernels.decode_step_available(h, cache.k) or type(self.norm) is not RMSNorm:
            return None
        blocks = [layer.native_weights() for layer in self.layers]
        if any(b is None for b in blocks):
            return None
        if len(blocks) != len(self._native_blocks) or any(a is not b for a, b in zip(blocks, self._native_blocks)):
            self._native_blocks = blocks  # flattened once: the per-block results are cached objects
            self._native_flat = [t for tensors, _ in blocks for t in tensors], [n for _, sizes in blocks for n in sizes]
        return self._native_flat

    def _native_decode(self, h: torch.Tensor, plan: StepPlan, cache: KVCache) -> torch.Tensor | None:
        """Every block of a decode step, or of one sequence's short pre-fill chunk, and the final norm
        as one native call (kernels.decode_step), h [T, dim] -> norm(h after the blocks) [T, dim]; None
        where that does not apply (see _native_rows and _native_blocks_or_none)."""
        weights = self._native_blocks_or_none(h, cache)
        step = None if weights is None else _native_rows(plan, cache)
        if step is None:
            return None
        attn = self.layers[0].attention
        return kernels.decode_step(h, *weights, self.args.norm_eps, attn.n_heads, attn.n_kv_heads,
                                   cache.k, cache.v, *step, self.args.rope_theta, self.norm.weight)

    def _prefill_in_native_pieces(self, input_ids: torch.Tensor, cache: KVCache, rows: list[int] | None,
                                  output_rows: torch.Tensor | None) -> torch.Tensor | None:
        """One sequence's pre-fill of GEMV_MAX_ROWS < T <= NATIVE_PREFILL_TOKENS tokens as consecutive
        native chunks of GEMV_MAX_ROWS (SmolLM2 int4, 2 threads: a 40-token chat prompt ~145 ms
        instead of ~225), or None where the pieces could not all run natively (then one eager chunk is
        faster than several)."""
        T, row = input_ids.shape[0], (rows or [0])[0]
        if T <= kernels.GEMV_MAX_ROWS or not 0 <= row < cache.max_seqs:  # decode steps (and bad rows: plan's error)
            return None
        if cache.lengths[row] + T > cache.slots:
            return None
        weights = self.dtype if quantized_mode(self) is None else "quantized"
        if T > NATIVE_PREFILL_TOKENS.get(weights, NATIVE_PREFILL_TOKENS_DEFAULT):
            return None
        if self._native_blocks_or_none(self.tok_embeddings(input_ids[:kernels.GEMV_MAX_ROWS]), cache) is None:
            return None
        wanted = torch.arange(T) if output_rows is None else output_rows.to("cpu", torch.long)
        positions, logits = [], []
        for start in range(0, T, kernels.GEMV_MAX_ROWS):
            piece = input_ids[start:start + kernels.GEMV_MAX_ROWS]
            inside = torch.unique(wanted[(wanted >= start) & (wanted < start + len(piece))])  # sorted
            # The last position's logits stand in where a piece has none wanted (the output GEMV is cheap).
            out = self.forward(piece, [len(piece)], cache, rows=rows,
                               output_rows=(inside if len(inside) else torch.tensor([len(piece) - 1]) + start) - start)
            if len(inside):
                positions.append(inside)
                logits.append(out)
        positions, logits = torch.cat(positions), torch.cat(logits)  # positions ascending, unique
        return logits[torch.searchsorted(positions, wanted)]

    def default_kv_cache_dtype(self) -> torch.dtype:
        """The model's dtype, but fp16 for weight-quantized models computing in fp32: their keys and
        values need not be stored finer than their weights, and fp16 halves the cache's memory and the
        bytes a decode step reads per cached position (at Mistral 7B's 4096-token window: 512 MiB per
        sequence instead of 1 GiB). llama.cpp keeps an fp16 cache by default likewise."""
        if self.dtype == torch.float32 and quantized_mode(self) is not None:
            return torch.float16
        return self.dtype

    @property
    def cache_dtype(self) -> torch.dtype:
        """The dtype of the caches new_cache() makes: `kv_cache_dtype` when set, else the default."""
        return self.kv_cache_dtype or self.default_kv_cache_dtype()

    def new_cache(self, max_seqs: int, max_len: int | None = None) -> KVCache:
        """A KV cache in `cache_dtype` on this model's device (W slots per sequence for windowed models)."""
        return KVCache(self.args, max_seqs, max_len, dtype=self.cache_dtype, device=self.device)

    def forward(self, input_ids: torch.Tensor, seqlens: list[int], cache: KVCache | None = None,
                *, rows: list[int] | None = None, output_rows: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [T] (sequences packed back to back, len(seqlens) of them) -> logits [T, vocab] fp32.

        With a cache, the tokens continue the sequences held in cache rows `rows` (default 0..B-1)
        and their keys/values are appended; without one, each sequence starts at position 0.
        `output_rows` [N] picks the positions whose logits are wanted (-> [N, vocab]): a pre-fill
        needs only its last one, and the vocabulary projection is a large share of the work.
        """
        if input_ids.dim() != 1 or input_ids.shape[0] != sum(seqlens):
            raise ValueError(f"input_ids must be 1-D with sum(seqlens)={sum(seqlens)} tokens, got shape {tuple(input_ids.shape)}")
        if cache is None:
            plan = plan_without_cache(seqlens, self.args.sliding_window, input_ids.device)
        else:
            if len(seqlens) == 1:
                pieces = self._prefill_in_native_pieces(input_ids, cache, rows, output_rows)
                if pieces is not None:
                    return pieces
            plan = cache.plan(seqlens, rows)
        h = self.tok_embeddings(input_ids)  # [T, dim]
        normed = self._native_decode(h, plan, cache) if cache is not None else None  # all blocks, then the norm
        if normed is None:
            rope = rope_rotation(plan.positions, self.args.head_dim, self.args.rope_theta)
            for i, layer in enumerate(self.layers):
                h = layer(h, rope, plan, cache, i)
            normed = self.norm(h if output_rows is None else h[output_rows])
        elif output_rows is not None:
            normed = normed[output_rows]
        if cache is not None:
            cache.commit(plan, seqlens, rows)
        return self.output(normed).float()
