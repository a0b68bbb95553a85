"""The reference format of Mistral's releases: `params.json` + `consolidated.safetensors`
(or `consolidated.00.pth`). Tensor names are exactly our model's."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..args import ModelArgs
from ..errors import CheckpointError
from ..model import Transformer
from .common import NamedTensors, PartOf, iter_safetensors, take


def is_reference(path: Path) -> bool:
    return path.is_dir() and (path / "params.json").exists()


def weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("consolidated*.safetensors"))
    if files:
        return files
    files = sorted(path.glob("consolidated*.pth"))
    if len(files) > 1:
        raise CheckpointError(f"{path}: holds {len(files)} consolidated.*.pth shards (model-parallel); "
                              "only single-file checkpoints are supported")
    if not files:
        raise CheckpointError(f"{path}: has params.json but no consolidated.safetensors or consolidated.00.pth")
    return files


def read_args(path: Path) -> ModelArgs:
    return ModelArgs.from_file(path / "params.json")


def read_tensors(path: Path, args: ModelArgs, part_of: PartOf | None = None) -> NamedTensors:
    files = weight_files(path)
    if files[0].suffix == ".safetensors":
        for name, tensor, _ in iter_safetensors(files, part_of):
            yield name, tensor
        return
    try:  # mmap: a 7B .pth is not read into memory in one piece
        state = torch.load(files[0], map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as e:
        raise CheckpointError(f"{files[0]}: not a readable PyTorch checkpoint ({e}); it may be truncated") from None
    for name, tensor in state.items():
        yield name, tensor if part_of is None else take(tensor, part_of(name, tuple(tensor.shape)))


def save(model: Transformer, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(model.args.to_dict(), indent=2) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.args.tied_embeddings:
        state.pop("output.weight")
    save_file(state, str(path / "consolidated.safetensors"))
