"""Weight-only quantization: int8 (per output channel, or grouped) and int4 (grouped) linear layers.

Weights are stored quantized and read quantized: at batch 1 decode is bound by the bytes of
weights read per token, so int8 reads ~4x and int4 ~7x less than fp32. Activations stay in the
model's dtype; the packed formats and the matmul kernels live in `mistral7b.kernels`.

`quantize(model, "int8" | "int4", group_size)` swaps every `nn.Linear` of a loaded model for its
quantized twin (the token embedding stays a float table: a lookup reads one row per token). A tied
output projection gets its own quantized copy; per-channel int8 quantizes it in groups of 32. GGUF
files whose tensors are already Q8_0 / Q4_0 / Q4_1 / Q4_K fill these layers directly (`from_gguf`),
without a trip through fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import kernels
from .errors import InputError

QUANT_MODES = ("int8", "int4")
DEFAULT_GROUP_SIZE = {"int8": None, "int4": 32}  # int8: one scale per output channel
# ...except the vocabulary projection of per-channel int8: its rounding costs the most perplexity
# of any layer (BENCHMARKS.md, "Quantization quality"), so it takes groups of 32 (Q8_0's layout;
# llama.cpp's recipes likewise keep output.weight at Q8_0/Q6_K). 1.1 bytes a weight instead of 1, on one layer.
OUTPUT_GROUP_SIZE = 32


class QuantLinear(nn.Module):
    """Base of the quantized linears: `y = x @ dequantize(W).T`, W [out_features, in_features]."""

    mode: str
    tensor_names: tuple[str, ...]  # the buffers, all with out_features rows

    def __init__(self, *tensors: torch.Tensor):
        super().__init__()
        for name, t in zip(self.tensor_names, tensors):
            self.register_buffer(name, t)
        self.out_features = tensors[0].shape[0]

    @property
    def group_size(self) -> int:
        return self.in_features // self.scales.shape[1]

    @property
    def weight_bytes(self) -> int:
        return sum(getattr(self, n).nbytes for n in self.tensor_names)

    @classmethod
    def concat(cls, parts: list[QuantLinear]) -> QuantLinear:
        """One layer computing all parts' outputs (their rows stacked), e.g. q, k and v."""
        return cls(*(torch.cat([getattr(p, n) for p in parts]) for n in cls.tensor_names))

    def view_rows_of(self, fused: QuantLinear, start: int, stop: int) -> None:
        """Rebind this layer's tensors as views of rows [start, stop) of `fused` (see concat)."""
        for n in self.tensor_names:
            setattr(self, n, getattr(fused, n)[start:stop])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class Int8Linear(QuantLinear):
    """qweight int8 [N, K], scales fp32 [N, K / G]: w = q * s."""

    mode = "int8"
    tensor_names = ("qweight", "scales")

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor):
        super().__init__(qweight, scales)
        self.in_features = qweight.shape[1]

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int | None = None) -> Int8Linear:
        return cls(*kernels.quantize_int8(weight.float(), group_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.int8_linear(x, self.qweight, self.scales)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return kernels.dequantize_int8(self.qweight, self.scales, dtype=dtype)


class Int4Linear(QuantLinear):
    """qweight uint8 [N, K / 2] (GGUF Q4 block packing), scales and mins fp16 (fp32 from GGUF Q4_K)
    [N, K / G]: w = q * s + m."""

    mode = "int4"
    tensor_names = ("qweight", "scales", "mins")

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor):
        super().__init__(qweight, scales, mins)
        self.in_features = qweight.shape[1] * 2

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int | None = None) -> Int4Linear:
        return cls(*kernels.quantize_int4(weight.float(), group_size or DEFAULT_GROUP_SIZE["int4"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.int4_linear(x, self.qweight, self.scales, self.mins)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return kernels.dequantize_int4(self.qweight, self.scales, self.mins, dtype=dtype)


_LAYERS = {"int8": Int8Linear, "int4": Int4Linear}


@dataclass
class PackedWeight:
    """A linear layer's weight read already quantized (a GGUF's Q8_0/Q4_x blocks, see
    weights/gguf_quant.py): the loader makes it its layer as it is."""

    mode: str
    tensors: tuple[torch.Tensor, ...]

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.tensors[0].shape
        return rows, cols * (2 if self.mode == "int4" else 1)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def layer(self, device: torch.device | str) -> QuantLinear:
        return _LAYERS[self.mode](*(t.to(device) for t in self.tensors))


def check_quantize_args(mode: str | None, group_size: int | None, in_features: list[int] | None = None) -> None:
    """A clear error for an unknown mode or a group size the kernels cannot use."""
    if mode is None:
        if group_size is not None:
            raise InputError("a group size needs a quantization mode (--quantize int8|int4)")
        return
    if mode not in QUANT_MODES:
        raise InputError(f"unknown quantization {mode!r}; choose one of {', '.join(QUANT_MODES)}")
    if group_size is not None:
        if group_size <= 0 or group_size % 32:
            raise InputError(f"group size must be a positive multiple of 32, got {group_size}")
        bad = sorted({k for k in in_features or [] if k % group_size})
        if bad:
            raise InputError(f"group size {group_size} does not divide the input size of every layer ({bad[0]})")


def quantize(model: nn.Module, mode: str, group_size: int | None = None) -> nn.Module:
    """Replace every nn.Linear of `model` by an Int8Linear / Int4Linear (in place; returns model)."""
    linears = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    check_quantize_args(mode, group_size, [child.in_features for _, _, child in linears])
    layer_type = _LAYERS[mode]
    for parent, name, child in linears:
        if child.bias is not None:
            raise InputError(f"cannot quantize {name}: linear layers with a bias are not supported")
        size = group_size
        if (parent is model and name == "output" and mode == "int8" and group_size is None
                and child.in_features % OUTPUT_GROUP_SIZE == 0):
            size = OUTPUT_GROUP_SIZE
        quantized = layer_type.from_float(child.weight.detach(), size).to(child.weight.device)
        setattr(parent, name, quantized)  # the float weight is freed here unless tied elsewhere
    return model


def quantized_mode(model: nn.Module) -> str | None:
    """'int8', 'int4', 'mixed' or None (float) for a model's linear layers."""
    modes = {m.mode for m in model.modules() if isinstance(m, QuantLinear)}
    return None if not modes else modes.pop() if len(modes) == 1 else "mixed"
