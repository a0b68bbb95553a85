"""LoRA: low-rank adapters on the model's linear layers, and their files.

`apply_lora(model, config)` swaps the targeted `nn.Linear`s (named as in our model: wq wk wv wo w1 w2
w3) for `LoRALinear`s that keep the frozen base weight and add `scaling * B @ A`. Adapters are saved in
two layouts side by side: ours (`lora.json` + `lora.safetensors`, our tensor names) and PEFT's
(`adapter_config.json` + `adapter_model.safetensors`, Hugging Face module names), which transformers +
peft load as is. `load_adapter` reads either.

Hugging Face checkpoints permute wq/wk rows for their rotate-half RoPE (see weights/hf.py). The delta
`B @ A` lives in the weight's row space, so exporting to HF permutes B's rows the same way; A is untouched.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .args import read_json_object
from .errors import CheckpointError, ConfigError
from .model import Linear, Transformer
from .weights.hf import permute_from_hf, permute_to_hf

# our module name -> (parent attribute in a block, HF module name)
TARGETS = {"wq": ("attention", "q_proj"), "wk": ("attention", "k_proj"), "wv": ("attention", "v_proj"),
           "wo": ("attention", "o_proj"), "w1": ("feed_forward", "gate_proj"),
           "w2": ("feed_forward", "down_proj"), "w3": ("feed_forward", "up_proj")}
_HF_PARENT = {"attention": "self_attn", "feed_forward": "mlp"}
_FROM_HF_TARGET = {hf: ours for ours, (_, hf) in TARGETS.items()}
OUR_CONFIG, OUR_WEIGHTS = "lora.json", "lora.safetensors"
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise ConfigError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise ConfigError(f"LoRA targets must be among {', '.join(TARGETS)}, got {', '.join(self.targets) or 'none'}")
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in self.targets))  # canonical order

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class _FrozenQuantized(torch.autograd.Function):
    """y = base(x) for a quantized linear `base` (frozen), differentiable w.r.t. x only. Its backward
    dequantizes W again: autograd through `F.linear(x, dequantize(W))` would keep a float copy of
    every layer's weight alive until the backward pass, more memory than a float base."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, base: nn.Module) -> torch.Tensor:
        ctx.base = base
        return base(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.base.dequantize(grad.dtype), None  # [..., out] @ [out, in]


class LoRALinear(nn.Module):
    """y = x W^T + scaling * dropout(x) A^T B^T, with W [out, in] frozen, A [r, in], B [out, r] trainable.

    The base weight keeps its name (`weight`), so the block's state-dict names are unchanged beside
    the new `lora_A`/`lora_B`. A starts as Kaiming-uniform noise and B at zero (the delta starts at 0),
    as in the LoRA paper and peft. LoRA factors are fp32 whatever the base dtype.

    The base may also be a quantized linear of `mistral7b.quant` (QLoRA-style training), kept as
    `base`; such an adapter cannot be merged into it (see `merge`).
    """

    def __init__(self, base: nn.Module, config: LoRAConfig):
        super().__init__()
        if isinstance(base, nn.Linear):
            self.weight = base.weight
            self.weight.requires_grad_(False)
            self.base, device = None, base.weight.device
        elif hasattr(base, "dequantize"):
            self.base, device = base, base.qweight.device
        else:
            raise ConfigError(f"LoRA wraps linear layers, not {type(base).__name__}")
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(config.rank, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, config.rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight) if self.base is None else _FrozenQuantized.apply(x, self.base)
        if self.merged:
            return y
        delta = F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return y + (delta * self.scaling).to(y.dtype)

    def delta(self) -> torch.Tensor:
        """scaling * B @ A: [out, in] fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if self.base is not None:
            # Re-quantizing W + BA would round the base weights again, and a float result would
            # undo the quantization: merge into the float model, then quantize it.
            raise ConfigError("cannot merge a LoRA adapter into quantized weights; load the model "
                              "without quantization, merge, then quantize")
        if not self.merged:
            self.weight.copy_((self.weight.float() + self.delta()).to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight.copy_((self.weight.float() - self.delta()).to(self.weight.dtype))
            self.merged = False


def target_modules(model: Transformer, targets: tuple[str, ...]):
    """(our name prefix 'layers.i.attention.wq', parent module, attribute) for every target layer."""
    for i, block in enumerate(model.layers):
        for name in targets:
            parent_attr = TARGETS[name][0]
            yield f"layers.{i}.{parent_attr}.{name}", getattr(block, parent_attr), name


def apply_lora(model: Transformer, config: LoRAConfig) -> Transformer:
    """Freeze every parameter of `model` and wrap the target layers in place; returns `model`."""
    model.requires_grad_(False)
    for _, parent, name in target_modules(model, config.targets):
        module = getattr(parent, name)
        if isinstance(module, LoRALinear):
            raise ConfigError("the model already carries a LoRA adapter")
        setattr(parent, name, LoRALinear(module, config))
    model.lora_config = config
    return model


def lora_modules(model: Transformer) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our names: 'layers.0.attention.wq.lora_A' [r, in], '... .lora_B' [out, r]."""
    return {f"{name}.{part}": getattr(m, part).detach() for name, m in lora_modules(model).items()
            for part in ("lora_A", "lora_B")}


def set_merged(model: Transformer, merged: bool) -> None:
    for m in lora_modules(model).values():
        m.merge() if merged else m.unmerge()


def merge_and_unload(model: Transformer) -> Transformer:
    """Fold every adapter into its base weight and put plain linears back: a model `save` writes as is."""
    for name, m in lora_modules(model).items():
        m.merge()
        parent_name, _, attr = name.rpartition(".")
        plain = Linear(m.weight.shape[1], m.weight.shape[0], device="meta")
        plain.weight = m.weight
        setattr(model.get_submodule(parent_name), attr, plain)
    model.__dict__.pop("lora_config", None)
    return model


# --- files -------------------------------------------------------------------------------------------

def _hf_key(our_name: str, part: str) -> str:
    """'layers.3.attention.wq' + 'lora_A' -> 'base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight'."""
    _, index, parent, name = our_name.split(".")
    return f"base_model.model.model.layers.{index}.{_HF_PARENT[parent]}.{TARGETS[name][1]}.{part}.weight"


def _permute(our_name: str, b: torch.Tensor, model: Transformer, to_hf: bool) -> torch.Tensor:
    """B's rows follow the weight's rows: permute them for wq/wk like weights/hf.py does."""
    heads = {"wq": model.args.n_heads, "wk": model.args.n_kv_heads}.get(our_name.rsplit(".", 1)[1])
    if heads is None:
        return b
    return permute_to_hf(b, heads) if to_hf else permute_from_hf(b, heads)


def _write(tensors: dict[str, torch.Tensor], file: Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(file))


def save_adapter(model: Transformer, path: str | os.PathLike, *, base_model: str | None = None) -> None:
    """Write the adapter of `model` in our layout and in PEFT's, into folder `path`."""
    config: LoRAConfig = model.lora_config
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = lora_state_dict(model)
    (path / OUR_CONFIG).write_text(json.dumps({**asdict(config), "targets": list(config.targets)}, indent=2) + "\n")
    _write(state, path / OUR_WEIGHTS)
    peft_state = {}
    for name, m in lora_modules(model).items():
        peft_state[_hf_key(name, "lora_A")] = m.lora_A
        peft_state[_hf_key(name, "lora_B")] = _permute(name, m.lora_B.detach().cpu(), model, to_hf=True)
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.rank, "lora_alpha": config.alpha,
        "lora_dropout": config.dropout, "target_modules": [TARGETS[t][1] for t in config.targets],
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "base_model_name_or_path": base_model,
    }
    (path / PEFT_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
    _write(peft_state, path / PEFT_WEIGHTS)


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    if not file.exists():
        raise CheckpointError(f"{file.parent}: adapter weights {file.name} are missing")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def _read_ours(path: Path) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    data = read_json_object(path / OUR_CONFIG)
    try:
        config = LoRAConfig(rank=data["rank"], alpha=data["alpha"], dropout=data.get("dropout", 0.0),
                            targets=tuple(data["targets"]))
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{path / OUR_CONFIG}: missing or bad key {e}") from None
    except ConfigError as e:
        raise ConfigError(f"{path / OUR_CONFIG}: {e}") from None
    return config, _read_weights(path / OUR_WEIGHTS)


def _read_peft(path: Path, model: Transformer) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    file = path / PEFT_CONFIG
    data = read_json_object(file)
    if data.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{file}: peft_type {data['peft_type']!r} is not supported (only LORA)")
    for key in ("use_rslora", "use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform"):
        if data.get(key):
            raise ConfigError(f"{file}: '{key}' is not supported")
    if data.get("bias", "none") != "none":
        raise ConfigError(f"{file}: bias {data['bias']!r} is not supported (only 'none')")
    modules = data.get("target_modules") or []
    modules = [modules] if isinstance(modules, str) else modules
    unknown = [m for m in modules if m not in _FROM_HF_TARGET]
    if unknown:
        raise ConfigError(f"{file}: target module(s) {unknown} are not supported (expected among {sorted(_FROM_HF_TARGET)})")
    try:
        config = LoRAConfig(rank=data["r"], alpha=data.get("lora_alpha", 8), dropout=data.get("lora_dropout", 0.0),
                            targets=tuple(_FROM_HF_TARGET[m] for m in modules))
    except (KeyError, ConfigError) as e:
        raise ConfigError(f"{file}: {e}") from None
    state = {}
    for key, tensor in _read_weights(path / PEFT_WEIGHTS).items():
        parts = key.removeprefix("base_model.model.").split(".")  # model.layers.i.self_attn.q_proj.lora_A.weight
        if len(parts) != 7 or parts[:2] != ["model", "layers"] or parts[4] not in _FROM_HF_TARGET \
                or parts[5] not in ("lora_A", "lora_B"):
            raise CheckpointError(f"{path / PEFT_WEIGHTS}: unexpected tensor '{key}'")
        ours = _FROM_HF_TARGET[parts[4]]
        name = f"layers.{parts[2]}.{TARGETS[ours][0]}.{ours}"
        state[f"{name}.{parts[5]}"] = _permute(name, tensor, model, to_hf=False) if parts[5] == "lora_B" else tensor
    return config, state


def read_adapter(path: str | os.PathLike, model: Transformer) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """The config and our-named tensors of an adapter folder, ours or PEFT's (ours first when both)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such adapter folder")
    if (path / OUR_CONFIG).exists():
        return _read_ours(path)
    if (path / PEFT_CONFIG).exists():
        return _read_peft(path, model)
    raise CheckpointError(f"{path}: not a LoRA adapter (expected {OUR_CONFIG} or {PEFT_CONFIG})")


def load_adapter(model: Transformer, path: str | os.PathLike, *, merge: bool = False) -> Transformer:
    """Apply the adapter in folder `path` to `model` (in place). merge=True folds it into the base
    weights and returns a plain model (for inference: no extra cost per token)."""
    config, state = read_adapter(path, model)
    apply_lora(model, config)
    expected = {k: v.shape for k, v in lora_state_dict(model).items()}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{path}: adapter is missing tensor(s) {', '.join(missing[:3])}"
                              + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
    for key, tensor in state.items():
        if key not in expected:
            raise CheckpointError(f"{path}: unexpected adapter tensor '{key}' (not part of this model)")
        if tensor.shape != expected[key]:
            raise CheckpointError(f"{path}: adapter tensor '{key}' has shape {tuple(tensor.shape)}, "
                                  f"but the model needs {tuple(expected[key])}")
    modules = lora_modules(model)
    with torch.no_grad():
        for key, tensor in state.items():
            name, _, part = key.rpartition(".")
            getattr(modules[name], part).copy_(tensor)
    return merge_and_unload(model) if merge else model
