"""What every checkpoint format shares: building the model on the meta device and filling it
tensor by tensor, with errors that name the file and the key."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open

from ..args import ModelArgs
from ..errors import CheckpointError
from ..model import Transformer
from ..quant import PackedWeight

# (name in our model, tensor) pairs; each loader yields them lazily so only one tensor is
# materialised at a time beside the model being filled.
NamedTensors = Iterator[tuple[str, torch.Tensor]]
# The part of a tensor to read, (dim, start, stop), or None for all of it: readers call a
# `PartOf(our tensor name, full shape)` before reading each tensor, so that a tensor-parallel rank
# reads only its slice of the file (see mistral7b.parallel).
Part = tuple[int, int, int] | None
PartOf = Callable[[str, tuple[int, ...]], Part]


def take(tensor, part: Part) -> torch.Tensor:
    """A copy of `part` of a tensor or of a lazy safetensors slice (which reads only those bytes).
    A copy, not a view of the memory-mapped file: a view would keep the whole map, and every page
    read to slice the other tensors, resident."""
    index = (slice(None),) if part is None else (slice(None),) * part[0] + (slice(part[1], part[2]),)
    return tensor[index].clone(memory_format=torch.contiguous_format)


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = Transformer(args)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()
            if not (args.tied_embeddings and name == "output.weight")}


def iter_safetensors(files: Iterable[Path], part_of: PartOf | None = None) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """(name, tensor, file) from safetensors files, one tensor at a time (memory-mapped);
    with `part_of` (called with the file's tensor names), only that part of each tensor."""
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    if part_of is None:
                        yield name, f.get_tensor(name), file
                    else:
                        yield name, _read_part(file, name, part_of), file
        except SafetensorError as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e}); it may be truncated") from None
        except OSError as e:
            raise CheckpointError(f"{file}: cannot be read ({e})") from None


def _read_part(file: Path, name: str, part_of: PartOf) -> torch.Tensor:
    """One tensor's part through a map of its own: closing it drops the pages read for this tensor
    from resident memory, so a tensor-parallel rank's peak is its part, not the whole file."""
    with safe_open(str(file), framework="pt") as f:
        lazy = f.get_slice(name)
        return take(lazy, part_of(name, tuple(lazy.get_shape())))


def build_model(args: ModelArgs, tensors: NamedTensors, *, source: Path, dtype: torch.dtype | None,
                device: torch.device | str | None, progress: Callable[[int], None] | None = None) -> Transformer:
    """Create the model without allocating (meta device), then assign each checkpoint tensor,
    converted to `dtype`/`device`, checking names and shapes against `args`."""
    shapes = expected_shapes(args)
    with torch.device("meta"):
        model = Transformer(args)
    state: dict[str, torch.Tensor] = {}
    packed: dict[str, PackedWeight] = {}  # quantized layers read as they are (GGUF blocks)
    for name, tensor in tensors:
        if isinstance(tensor, PackedWeight) and name == "output.weight":
            shapes.setdefault(name, (args.vocab_size, args.dim))  # a tied embedding's packed twin
        if name not in shapes:
            if args.tied_embeddings and name == "output.weight":
                continue
            raise CheckpointError(f"{source}: unexpected tensor '{name}' (not part of a model with this config)")
        if tuple(tensor.shape) != shapes[name]:
            raise CheckpointError(f"{source}: tensor '{name}' has shape {tuple(tensor.shape)}, "
                                  f"but the config implies {shapes[name]}")
        if name in state or name in packed:
            raise CheckpointError(f"{source}: tensor '{name}' appears twice")
        if isinstance(tensor, PackedWeight):
            packed[name] = tensor
            if progress:
                progress(tensor.nbytes)
            continue
        target_dtype = dtype or (tensor.dtype if tensor.is_floating_point() else torch.float32)
        state[name] = tensor.to(device=device or "cpu", dtype=target_dtype)
        if progress:
            progress(tensor.numel() * tensor.element_size())
    missing = sorted(set(shapes) - set(state) - set(packed))
    if missing:
        shown = ", ".join(f"'{m}'" for m in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{source}: missing tensor(s) {shown}")
    dtypes = {t.dtype for t in state.values()}
    if len(dtypes) > 1:  # mixed-precision files: bring everything to the widest float type present
        widest = torch.float32 if torch.float32 in dtypes else next(iter(dtypes))
        state = {k: v.to(widest) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    for name, weight in packed.items():
        model.set_submodule(name.removesuffix(".weight"), weight.layer(device or "cpu"))
    if args.tied_embeddings and "output.weight" not in packed:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()
