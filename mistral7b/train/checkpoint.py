"""Training checkpoints, written atomically: everything `--resume` needs to continue exactly.

`DIR/checkpoints/step-000040/` holds the trainable parameters (`trainable.safetensors`), the optimizer
state (`optimizer.pt`) and `state.pt` (step, scheduler, every rank's RNG states, the run's settings).
It is written under a temporary name, each file fsynced, then renamed in one step: a crash mid-save
leaves the previous checkpoint as the latest complete one, and a half-written folder is never read.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError

_NAME = re.compile(r"step-(\d+)$")
KEEP = 2  # complete checkpoints kept; older ones are deleted once a newer one is safely written


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(root: Path, step: int, trainable: dict[str, torch.Tensor], optimizer: dict, state: dict) -> Path:
    """Write checkpoint `step` under `root` atomically; returns its folder."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    scratch = root / f".tmp-step-{step:06d}"
    shutil.rmtree(scratch, ignore_errors=True)  # left by a crash during an earlier save
    scratch.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(scratch / "trainable.safetensors"))
    torch.save(optimizer, scratch / "optimizer.pt")
    torch.save({**state, "step": step}, scratch / "state.pt")
    for file in scratch.iterdir():
        _fsync(file)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(scratch, final)
    _fsync(root)
    for old in completed(root)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def completed(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def load(folder: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """-> (trainable tensors, optimizer state, state) of a checkpoint folder."""
    try:
        return (load_file(str(folder / "trainable.safetensors")),
                torch.load(folder / "optimizer.pt", weights_only=True),
                torch.load(folder / "state.pt", weights_only=False))
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{folder}: unreadable training checkpoint ({e})") from None
