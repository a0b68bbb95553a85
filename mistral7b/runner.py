"""How a forward step runs: its route, fused projections and the native weights.

`model.py` says what the Mistral transformer computes, in pure torch; it is what training, LoRA,
CUDA and tensor-parallel ranks run and what every path here is tested against. A `Runner` executes
the same model for the engine, deciding once per step (`choose_route`) how:

    NATIVE_DECODE   B sequences, one token each: every block in one native call (kernels.decode_step)
    NATIVE_CHUNK    chunks of one or more sequences (each <= the cache's S slots, W for a windowed
                    model), decode rows among them: rows of that same call, each token attending to
                    its sequence's cached slots its window sees and to its chunk's earlier tokens
    EAGER_DECODE    one token per sequence through the model's blocks, attending in the cache in place
    EAGER_BAND      one sequence's chunk (its cached keys in position order) or rows from position 0
                    longer than W: the causal W-key band, no mask (attention.py)
    EAGER_MASKED    several sequences' chunks: a dense mask from the slots' positions
    EAGER_CAUSAL    rows from position 0 without a cache: plain causal attention

The eager routes run the model's modules with the runner's projections: q/k/v and gate/up as one
matmul each (`FusedProjection`), and few-row products of float weights through the native GEMV. The
native weights and the fusions are rebuilt whenever the tensors they derive from change (a replaced
or re-cast weight, a LoRA wrap, quantization): each step compares the modules and the storage of
their tensors with those the weights were built from, so nothing stale ever runs.

Batch invariance: wherever the native step can run a model, every step runs natively, whatever
its mix of sequences, chunks and decode rows, and every row's arithmetic there is its own: the GEMVs
quantize and dot each activation row alone, norms, RoPE, SiLU and the attention of a row depend only
on that row (the attention over fixed ranges of the row's slots, decode.cpp), and the logits come
from the native GEMV for any number of rows. So a sequence's logits do not depend on which other
sequences share its steps, nor on how its prompt was cut into chunks: greedy decoding gives the same
tokens alone or in a batch, and echoed prompt log-probabilities equal the library's own scoring.
The eager routes (a model the native step cannot run: CUDA, LoRA or tensor-parallel wrappers, fp16
weights, training, `native=False`) give no such guarantee: their kernels change with the number of
rows (GEMV or tiled matmul, MKL's blocking) and with the attention layout.

`native=False` forces the eager routes (tests compare the two that way). The engine asks
`preferred_chunk` how to cut a lone prompt, so a short one runs as native chunks.
"""

from __future__ import annotations

import enum
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .cache import KVCache, StepPlan
from .model import Linear, RMSNorm, Transformer, TransformerBlock, rope_rotation
from .quant import QuantLinear

# Longest pre-fill of one sequence worth running as native chunks of GEMV_MAX_ROWS tokens rather than
# as one eager chunk: fp32 weights break even at 64 tokens (MKL's matmul on the whole chunk), bf16
# and int8/int4 (whose eager chunk dequantizes tiles) gain to 128 (BENCHMARKS.md, "Short pre-fills").
NATIVE_PREFILL_TOKENS = {torch.float32: 64}
NATIVE_PREFILL_TOKENS_DEFAULT = 128


class Route(enum.Enum):
    NATIVE_DECODE = "native decode"
    NATIVE_CHUNK = "native causal chunk"
    EAGER_DECODE = "eager decode"
    EAGER_BAND = "eager band"
    EAGER_MASKED = "eager masked"
    EAGER_CAUSAL = "eager causal"

    @property
    def native(self) -> bool:
        return self in (Route.NATIVE_DECODE, Route.NATIVE_CHUNK)


def _fits_native_chunk(plan: StepPlan, cache: KVCache) -> bool:
    """Every sequence's chunk has all its tokens cached (<= S): the native step writes each row's key
    and value before attending, so a longer chunk would overwrite slots its own rows still read."""
    return plan.length <= cache.slots


def choose_route(plan: StepPlan, cache: KVCache | None, native_ready: bool) -> Route:
    """The one decision of how a step runs; `native_ready`: the native step can run this model,
    these activations and this cache."""
    if plan.decode:
        return Route.NATIVE_DECODE if native_ready else Route.EAGER_DECODE
    if native_ready and cache is not None and _fits_native_chunk(plan, cache):
        return Route.NATIVE_CHUNK
    if plan.mask is not None:
        return Route.EAGER_MASKED
    return Route.EAGER_BAND if plan.window is not None else Route.EAGER_CAUSAL


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    return [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]


def _identity(modules: tuple[nn.Module, ...]) -> tuple:
    """The modules and the storage of their tensors: a replaced module or weight, a cast or a move
    changes it."""
    return tuple(x for m in modules for x in (m, *(t.data_ptr() for t in _tensors(m))))


def _project(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """linear(x), with few-row products of plain float weights on the native GEMV: at batch 1 a BLAS
    call's fixed cost is most of the time of a small matrix."""
    if type(linear) is Linear:
        return kernels.float_linear(x, linear.weight)
    return linear(x)


class FusedProjection:
    """Projections of the same input (q/k/v, or gate/up) as one matmul: at batch 1 every matmul
    call has a fixed cost, so three calls cost more than one three times the size.

    The parts become views of the fused weight (no extra memory), and this object lives outside
    the module tree, so state_dict, saving, LoRA and tensor parallelism still see only the parts.
    """

    def __init__(self, parts: list[nn.Module]):
        """parts: plain Linears of one dtype, or QuantLinears of one kind (see _fusable)."""
        self.sizes = [p.out_features for p in parts]
        if isinstance(parts[0], QuantLinear):
            self.linear = type(parts[0]).concat(parts)
            bind = lambda part, a, b: part.view_rows_of(self.linear, a, b)
        else:
            weight = torch.cat([p.weight.detach() for p in parts])  # [sum(out), in]
            self.linear = Linear(weight.shape[1], weight.shape[0], device="meta")
            self.linear.weight = nn.Parameter(weight, requires_grad=False)
            bind = lambda part, a, b: setattr(part, "weight", nn.Parameter(weight[a:b], part.weight.requires_grad))
        start = 0
        for part, size in zip(parts, self.sizes):
            bind(part, start, start + size)
            start += size

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _project(self.linear, x).split(self.sizes, dim=-1)


def _fusable(parts: list[nn.Module]) -> bool:
    """Plain linears of one dtype and device, or quantized ones of one kind (not LoRA or TP wrappers)."""
    if all(type(p) is Linear for p in parts):
        return len({(p.weight.dtype, p.weight.device) for p in parts}) == 1
    return all(isinstance(p, QuantLinear) and type(p) is type(parts[0]) for p in parts)


def _separate(parts: list[nn.Module]):
    return lambda x: tuple(_project(p, x) for p in parts)


def _kernel_tensors(linear: nn.Module) -> list[torch.Tensor] | None:
    """A linear layer as kernels.decode_step takes it, or None when the native step cannot run it
    (a LoRA or tensor-parallel wrapper, an fp16 weight)."""
    if type(linear) is Linear and linear.weight.dtype in (torch.float32, torch.bfloat16):
        return [linear.weight]
    if isinstance(linear, QuantLinear):
        return [getattr(linear, name) for name in linear.tensor_names]
    return None


class LayerExecution:
    """How one transformer block runs: its q/k/v and gate/up projections (fused where the parts
    allow) and, where the native step can run it, its tensors in decode_step's layout."""

    def __init__(self, block: TransformerBlock):
        wq, wk, wv, w1, w3 = _fused_parts(block)
        qkv, gate_up = [wq, wk, wv], [w1, w3]
        fused_qkv = FusedProjection(qkv) if _fusable(qkv) else None
        fused_gate_up = FusedProjection(gate_up) if _fusable(gate_up) else None
        self.qkv = fused_qkv or _separate(qkv)
        self.gate_up = fused_gate_up or _separate(gate_up)
        self.native = self._native_tensors(block, fused_qkv, fused_gate_up)
        self.key = _identity(_modules_of(block))  # after fusing: the parts are now views

    @staticmethod
    def _native_tensors(block, fused_qkv, fused_gate_up) -> tuple[list[torch.Tensor], list[int]] | None:
        """([attention_norm, ffn_norm, *qkv, *wo, *gate_up, *down], [tensors in qkv, wo, gate_up, down])."""
        if fused_qkv is None or fused_gate_up is None:
            return None
        if type(block.attention_norm) is not RMSNorm or type(block.ffn_norm) is not RMSNorm:
            return None
        linears = [_kernel_tensors(m) for m in (fused_qkv.linear, block.attention.wo, fused_gate_up.linear,
                                                  block.feed_forward.w2)]
        if any(t is None for t in linears):
            return None
        return [block.attention_norm.weight, block.ffn_norm.weight, *sum(linears, [])], [len(t) for t in linears]


def _fused_parts(block: TransformerBlock) -> tuple[nn.Module, ...]:
    attn, ffn = block.attention, block.feed_forward
    return attn.wq, attn.wk, attn.wv, ffn.w1, ffn.w3


def _modules_of(block: TransformerBlock) -> tuple[nn.Module, ...]:
    attn, ffn = block.attention, block.feed_forward
    return (block.attention_norm, block.ffn_norm, attn.wq, attn.wk, attn.wv, attn.wo, ffn.w1, ffn.w3, ffn.w2)


class ModelExecution:
    """Every block's LayerExecution, and their native tensors flattened for decode_step (None when
    some block cannot run natively)."""

    def __init__(self, model: Transformer):
        self.layers = [LayerExecution(b) for b in model.layers]
        natives = [ex.native for ex in self.layers]
        self.native = None if any(n is None for n in natives) else (
            [t for tensors, _ in natives for t in tensors], [n for _, sizes in natives for n in sizes])
        # The fused projections are copies of their parts: only those can go stale without a registration
        # (the other tensors a step reads are the model's own objects, read as they are now).
        self.tensors = [t for b in model.layers for m in _fused_parts(b) for t in _tensors(m)]
        self.ptrs = list(map(torch.Tensor.data_ptr, self.tensors))
        self.registrations = _registrations[0]

    def current(self, model: Transformer) -> bool:
        """Built from exactly the model's present modules and tensors. Walking the modules costs ~2 ms
        a step at 30 layers, so it runs only after a module, parameter or buffer was registered
        anywhere; otherwise comparing the storage of the tensors it was built from (a cast or a
        `.data` swap moves it) suffices: ~60 us a step for SmolLM2's 450 int4 ones."""
        if self.registrations == _registrations[0] and list(map(torch.Tensor.data_ptr, self.tensors)) == self.ptrs:
            return True
        if len(self.layers) == len(model.layers) and all(
                ex.key == _identity(_modules_of(b)) for ex, b in zip(self.layers, model.layers)):
            self.registrations = _registrations[0]
            return True
        return False


def _count_registration(*_) -> None:
    _registrations[0] += 1


# Registrations of modules, parameters and buffers in any module (setattr, LoRA wraps, quantizing).
_registrations = [0]
torch.nn.modules.module.register_module_module_registration_hook(_count_registration)
torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)
torch.nn.modules.module.register_module_buffer_registration_hook(_count_registration)


# One execution per model, shared by its runners: two engines over one model (bench, eval) must not
# re-fuse its weights from under each other.
_executions: weakref.WeakKeyDictionary[Transformer, ModelExecution] = weakref.WeakKeyDictionary()


def execution_of(model: Transformer) -> ModelExecution:
    """The model's execution, rebuilt when its tensors changed since it was built."""
    ex = _executions.get(model)
    if ex is None or not ex.current(model):
        # Fused weights are the parts' storage from now on: never inference tensors (the engine steps in
        # inference mode), which autograd could no longer use when the model is trained afterwards.
        with torch.inference_mode(False), torch.no_grad():
            ex = _executions[model] = ModelExecution(model)
    return ex


class Runner:
    """Runs a `Transformer` for the engine (inference): `runner(input_ids, seqlens, cache, rows=,
    output_rows=)` gives the model's logits, by the fastest route that computes them."""

    shares_blocks = True  # the engine may start sequences on cached blocks of this runner's caches

    def __init__(self, model: Transformer, *, native: bool = True):
        self.model, self.native = model, native

    # What the engine needs of a model (engine.StepModel), as the model has it.
    @property
    def args(self):
        return self.model.args

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def cache_dtype(self) -> torch.dtype:
        return self.model.cache_dtype

    def new_cache(self, max_seqs: int, max_len: int | None = None, **pool) -> KVCache:
        return self.model.new_cache(max_seqs, max_len, **pool)

    def _native_ready(self, ex: ModelExecution, h: torch.Tensor, cache: KVCache | None) -> bool:
        return (self.native and cache is not None and ex.native is not None
                and type(self.model.norm) is RMSNorm and kernels.decode_step_available(h, cache.k))

    def preferred_chunk(self, cache: KVCache, row: int, remaining: int) -> int | None:
        """How many tokens of a lone sequence's remaining prompt to pre-fill next, when it should
        not go as one chunk: GEMV_MAX_ROWS while the native chunks can take the whole rest (up to
        NATIVE_PREFILL_TOKENS, where one eager chunk becomes faster), else None."""
        if not self.native or remaining <= 1:
            return None
        ex = execution_of(self.model)
        if ex.native is None:
            return None
        first = ex.layers[0].native[0][2]  # layer 0's fused qkv weight (or qweight)
        if remaining > NATIVE_PREFILL_TOKENS.get(first.dtype, NATIVE_PREFILL_TOKENS_DEFAULT):
            return None
        return min(remaining, kernels.GEMV_MAX_ROWS)

    # -- one step ---------------------------------------------------------------------------------
    def __call__(self, input_ids: torch.Tensor, seqlens: list[int], cache: KVCache | None = None, *,
                 rows: list[int] | None = None, output_rows: torch.Tensor | None = None) -> torch.Tensor:
        """As Transformer.forward: input_ids [T] packed -> logits [T or len(output_rows), vocab] fp32."""
        model = self.model
        plan = model.plan(input_ids, seqlens, cache, rows)
        training = torch.is_grad_enabled()  # autograd needs the parts' own parameters: the model itself
        ex = None if training else execution_of(model)
        h = model.tok_embeddings(input_ids)  # [T, dim]
        route = choose_route(plan, cache, not training and self._native_ready(ex, h, cache))
        if route.native:
            normed = self._native(ex.native, h, plan, cache, route, seqlens, rows)  # all blocks, the final norm
            normed = normed if output_rows is None else normed[output_rows]
            logits = _project_rows(model.output, normed)
        else:
            rope = rope_rotation(plan.positions, model.args.head_dim, model.args.rope_theta)
            for i, block in enumerate(model.layers):
                h = block(h, rope, plan, cache, i) if training else _eager_block(block, ex.layers[i], h, rope, plan, cache, i)
            normed = model.norm(h if output_rows is None else h[output_rows])
            logits = _project(model.output, normed)
        if cache is not None:
            cache.commit(plan, seqlens, rows)
        return logits.float()

    def _native(self, weights: tuple[list[torch.Tensor], list[int]], h: torch.Tensor, plan: StepPlan,
                cache: KVCache, route: Route, seqlens: list[int], rows: list[int] | None) -> torch.Tensor:
        """h [T, dim] -> norm(h after every block) [T, dim] in one kernels.decode_step call. Decode: the
        rows are the sequences; chunks: each token a row attending to its sequence's slots up to its
        own position (the chunk's earlier tokens are written before any row attends)."""
        if route is Route.NATIVE_DECODE:
            mask = None if plan.mask is None else plan.mask[:, 0, 0]  # [B, used]
            step, slots = (plan.write_dst, plan.used_slots, mask, plan.positions), plan.slots
        else:  # each row sees its sequence's cached slots and its chunk's own: span = cached + chunk
            device = h.device
            seq = torch.repeat_interleave(torch.arange(len(seqlens)), torch.tensor(seqlens)).to(device)  # [T]
            first = torch.tensor(plan.first_pos, device=device)[seq]  # [T] position of each row's slot 0
            q_pos = plan.positions[:, None]  # [T, 1]
            span = int((plan.positions - first).max()) + 1
            k_pos = first[:, None] + torch.arange(span, device=device)[None, :]  # [T, span]
            seen = (k_pos <= q_pos) & ((q_pos - k_pos < cache.window) if cache.window else True)
            table = cache.slot_index(list(range(len(seqlens))) if rows is None else rows, span)  # [B, span]
            slots = table.expand(len(seq), span) if len(seqlens) == 1 else table[seq]
            step = (plan.write_dst, span, seen, plan.positions)
        attn, args = self.model.layers[0].attention, self.model.args
        return kernels.decode_step(h, *weights, args.norm_eps, attn.n_heads, attn.n_kv_heads,
                                   cache.k, cache.v, *step, args.rope_theta, self.model.norm.weight, slots)


def _project_rows(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """linear(x) [M, N] by the native GEMV for any number of rows M, each row quantized and dotted on
    its own: a row's result never depends on the other rows (the per-op path switches to a tiled
    matmul above GEMV_MAX_ROWS rows). Other layers (a LoRA or tensor-parallel wrapper): as they run."""
    if type(linear) is Linear and linear.weight.dtype in (torch.float32, torch.bfloat16):
        return torch.ops.mistral7b.float_gemv(x, linear.weight)
    if isinstance(linear, QuantLinear) and linear.mode == "int8":
        return torch.ops.mistral7b.int8_gemv(x, linear.qweight, linear.scales)
    if isinstance(linear, QuantLinear) and linear.mode == "int4":
        return torch.ops.mistral7b.int4_gemv(x, linear.qweight, linear.scales, linear.mins)
    return _project(linear, x)


def _eager_block(block: TransformerBlock, ex: LayerExecution, h: torch.Tensor, rope: torch.Tensor,
                 plan: StepPlan, cache: KVCache | None, layer: int) -> torch.Tensor:
    """TransformerBlock.forward with the runner's projections; h [T, dim] -> [T, dim]."""
    attn = block.attention
    q, k, v = ex.qkv(block.attention_norm(h))
    h = h + _project(attn.wo, attn.mix(q, k, v, rope, plan, cache, layer))
    gate, up = ex.gate_up(block.ffn_norm(h))
    return h + _project(block.feed_forward.w2, F.silu(gate) * up)
