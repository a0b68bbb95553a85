"""Hugging Face folders: `config.json` + `model.safetensors` (or shards listed in
`model.safetensors.index.json`), MistralForCausalLM / LlamaForCausalLM naming.

HF checkpoints store wq/wk rows permuted for their rotate-half RoPE (each head's first half holds
the even dimensions, the second half the odd ones); ours, like the reference, rotates interleaved
pairs. We convert at the edge, both ways.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..args import ModelArgs, read_json_object
from ..errors import CheckpointError, ConfigError
from ..model import Transformer
from .common import NamedTensors, PartOf, iter_safetensors

_SUPPORTED_TYPES = {"mistral", "llama"}

# reference name -> HF name, for the parts outside the layers and inside each layer.
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_LAYER_NAMES = {
    "attention_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
}
_FROM_HF = {**{v: k for k, v in _TOP_NAMES.items()}, **{f"model.layers.{{}}.{v}": f"layers.{{}}.{k}" for k, v in _LAYER_NAMES.items()}}


def is_hf(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists()


def to_hf_name(name: str) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    _, index, rest = name.split(".", 2)  # layers.{i}.{rest}
    return f"model.layers.{index}.{_LAYER_NAMES[rest]}"


def from_hf_name(name: str) -> str | None:
    if name in _FROM_HF:
        return _FROM_HF[name]
    parts = name.split(".", 3)  # model.layers.{i}.{rest}
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        pattern = _FROM_HF.get(f"model.layers.{{}}.{parts[3]}")
        return pattern.format(parts[2]) if pattern else None
    return None


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows [heads * head_dim, dim]: interleaved pairs -> rotate-half halves, per head."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `permute_to_hf`."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def args_from_config(config: dict[str, Any], source: str) -> ModelArgs:
    model_type = config.get("model_type")
    if model_type not in _SUPPORTED_TYPES:
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported (expected one of {sorted(_SUPPORTED_TYPES)})")
    if config.get("attention_bias") or config.get("mlp_bias"):
        raise ConfigError(f"{source}: attention/MLP biases are not supported")
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act {config['hidden_act']!r} is not supported (expected 'silu')")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ConfigError(f"{source}: RoPE scaling {rope.get('rope_type', rope.get('type'))!r} is not supported")
    required = ["hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size"]
    missing = [k for k in required if k not in config]
    if missing:
        raise ConfigError(f"{source}: missing required key(s) {', '.join(map(repr, missing))}")
    n_heads = config["num_attention_heads"]
    return ModelArgs(
        dim=config["hidden_size"], n_layers=config["num_hidden_layers"],
        head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
        hidden_dim=config["intermediate_size"], n_heads=n_heads,
        n_kv_heads=config.get("num_key_value_heads") or n_heads,
        norm_eps=config.get("rms_norm_eps", 1e-6), vocab_size=config["vocab_size"],
        rope_theta=rope.get("rope_theta") or config.get("rope_theta") or 10000.0,
        sliding_window=config.get("sliding_window") if model_type == "mistral" else None,
        max_seq_len=config.get("max_position_embeddings"),
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def config_from_args(args: ModelArgs) -> dict[str, Any]:
    return {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral",
        "hidden_size": args.dim, "num_hidden_layers": args.n_layers, "head_dim": args.head_dim,
        "intermediate_size": args.hidden_dim, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "rms_norm_eps": args.norm_eps, "vocab_size": args.vocab_size,
        # Both spellings: transformers >= 5 reads rope_parameters, older tools read rope_theta.
        "rope_theta": args.rope_theta, "rope_parameters": {"rope_theta": args.rope_theta, "rope_type": "default"},
        "sliding_window": args.sliding_window,
        "tie_word_embeddings": args.tied_embeddings, "hidden_act": "silu", "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2,
        # Left out when unknown, so that reading the folder back gives the same ModelArgs.
        **({"max_position_embeddings": args.max_seq_len} if args.max_seq_len else {}),
    }


def read_args(path: Path) -> ModelArgs:
    file = path / "config.json"
    return args_from_config(read_json_object(file), str(file))


def weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.exists():
                raise CheckpointError(f"{index}: lists shard '{file.name}', which is missing")
        return files
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    raise CheckpointError(f"{path}: has config.json but no model.safetensors or model.safetensors.index.json "
                          "(.bin checkpoints are not supported; convert them to safetensors)")


def read_tensors(path: Path, args: ModelArgs, part_of: PartOf | None = None) -> NamedTensors:
    """With `part_of`, `args` are the shard's: q/k rows are permuted per head, so slices of whole
    heads permute with the shard's head counts."""
    hf_part_of = part_of and (lambda hf_name, shape: part_of(from_hf_name(hf_name) or hf_name, shape))
    for hf_name, tensor, file in iter_safetensors(weight_files(path), hf_part_of):
        if hf_name.endswith("rotary_emb.inv_freq"):  # a buffer some old exports saved
            continue
        name = from_hf_name(hf_name)
        if name is None:
            raise CheckpointError(f"{file}: unexpected tensor '{hf_name}'")
        if name.endswith("attention.wq.weight"):
            tensor = permute_from_hf(tensor, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = permute_from_hf(tensor, args.n_kv_heads)
        yield name, tensor


def save(model: Transformer, path: Path) -> None:
    args = model.args
    path.mkdir(parents=True, exist_ok=True)
    config = config_from_args(args)
    config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {}
    for name, tensor in model.state_dict().items():
        if args.tied_embeddings and name == "output.weight":
            continue
        tensor = tensor.detach().cpu()
        if name.endswith("attention.wq.weight"):
            tensor = permute_to_hf(tensor, args.n_heads)
        elif name.endswith("attention.wk.weight"):
            tensor = permute_to_hf(tensor, args.n_kv_heads)
        state[to_hf_name(name)] = tensor.contiguous()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
