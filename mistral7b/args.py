"""`ModelArgs`: the hyper-parameters of a Mistral-family model, named as in the reference `params.json`.

Other formats (Hugging Face `config.json`, GGUF metadata) translate into this at the edge.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

# Keys of released params.json files that do not change the architecture we run.
_IGNORED_KEYS = {"max_batch_size", "model_type", "max_position_embeddings", "_name_or_path"}
# Keys that describe architectures this package does not implement.
_UNSUPPORTED_KEYS = {"moe": "mixture-of-experts", "vision_encoder": "vision", "lora": "built-in LoRA"}


def read_json_object(file: Path) -> dict[str, Any]:
    """A JSON config file's object; a ConfigError naming the file when it is not one."""
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: expected a JSON object")
    return data


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float
    vocab_size: int
    # Mistral 7B v0.1's params.json has no rope_theta; its value is 10000 (later releases say 1e6).
    rope_theta: float = 10000.0
    # Each token sees the previous `sliding_window` positions, itself included. None: full causal.
    sliding_window: int | None = None
    # Longest sequence the model was trained for (informational for windowed models, whose
    # rolling cache lets generation run past it). None: unknown.
    max_seq_len: int | None = None
    # The output projection shares the embedding matrix (SmolLM2 and other small llamas).
    tied_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"sliding_window must be positive or null, got {self.sliding_window!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "params.json") -> "ModelArgs":
        """Validate and build from a reference `params.json` dictionary; errors name `source` and the key."""
        fields = {f.name for f in dataclasses.fields(cls)}
        for key, what in _UNSUPPORTED_KEYS.items():
            if data.get(key):
                raise ConfigError(f"{source}: key '{key}' describes a {what} model, which mistral7b does not support")
        unknown = sorted(set(data) - fields - _IGNORED_KEYS - set(_UNSUPPORTED_KEYS))
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; expected keys: {', '.join(sorted(fields))}")
        known = {k: v for k, v in data.items() if k in fields}
        if "head_dim" not in known and "dim" in known and "n_heads" in known:
            known["head_dim"] = known["dim"] // known["n_heads"]
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [k for k in required if k not in known]
        if missing:
            raise ConfigError(f"{source}: missing required key(s) {', '.join(map(repr, missing))}")
        if known.get("rope_theta") is None:
            known.pop("rope_theta", None)
        try:
            return cls(**known)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelArgs":
        return cls.from_dict(read_json_object(Path(path)), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The reference `params.json` content (defaults that the reference omits are left out)."""
        out = dataclasses.asdict(self)
        for key in ("max_seq_len", "sliding_window"):
            if out[key] is None:
                del out[key]
        if not out["tied_embeddings"]:
            del out["tied_embeddings"]
        return out

    @property
    def n_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        ffn = 3 * self.dim * self.hidden_dim
        embed = self.vocab_size * self.dim * (1 if self.tied_embeddings else 2)
        return self.n_layers * (attn + ffn + 2 * self.dim) + embed + self.dim


_MISTRAL_7B = dict(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8, norm_eps=1e-5)

PRESETS: dict[str, ModelArgs] = {
    "mistral-7b-v0.1": ModelArgs(**_MISTRAL_7B, vocab_size=32000, rope_theta=10000.0, sliding_window=4096, max_seq_len=8192),
    "mistral-7b-v0.2": ModelArgs(**_MISTRAL_7B, vocab_size=32000, rope_theta=1e6, max_seq_len=32768),
    "mistral-7b-v0.3": ModelArgs(**_MISTRAL_7B, vocab_size=32768, rope_theta=1e6, max_seq_len=32768),
}
