"""The GGUF container (llama.cpp's file format), read from a memory map: metadata and a tensor table.

Layout, little-endian (the spec: ggml's docs/gguf.md):
    "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x (string key, u32 value type, value)          string = u64 byte length + UTF-8
    n_tensors x (string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset)
    padding to `general.alignment` (default 32), then the tensor data, each at data start + offset

Only this container parsing is ours; the `gguf` package gives the constants and the block math.
gguf.GGUFReader reads the same files but wraps every vocabulary string in numpy views, slow for
tens of thousands of tokens and merges; decoding them straight from the map is not (BENCHMARKS.md,
"Loading the default model"). Importing this module imports `gguf` (~0.1 s, through gguf_lib.py):
import it where a GGUF file is read, not at package import.
"""

from __future__ import annotations

import functools
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CheckpointError
from .gguf_lib import (GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType,
                       Keys, dequantize)

_SCALARS = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
            GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
            GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q",
            GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}
_VERSIONS = (2, 3)  # version 1 (2023's first files) had 32-bit counts
_U32, _U64, _HEADER = struct.Struct("<I"), struct.Struct("<Q"), struct.Struct("<IIQQ")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # row-major, ours: GGUF's ne reversed ([rows, cols] for a matrix)
    type: GGMLQuantizationType
    offset: int  # of the first byte, from the start of the file
    nbytes: int


class GGUFFile:
    """A parsed GGUF file. `metadata`: key -> value (arrays as lists); `tensors`: name -> info, in file order.
    The map stays open while this object (or an array returned by `data`) lives."""

    def __init__(self, path: Path):
        try:
            with open(path, "rb") as f:
                size = path.stat().st_size
                if size < _HEADER.size:
                    raise _corrupt(path, f"it has {size} bytes, fewer than a GGUF header's {_HEADER.size}")
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
        try:
            self.metadata, self.tensors = _parse(self._map)
        except ValueError as e:  # UnicodeDecodeError included
            self._map.close()
            raise _corrupt(path, str(e)) from None

    def data(self, tensor: TensorInfo) -> np.ndarray:
        """The tensor's bytes, read-only from the map: uint8 [*shape[:-1], bytes per row]."""
        block, block_bytes = GGML_QUANT_SIZES[tensor.type]
        row_bytes = tensor.shape[-1] // block * block_bytes
        return np.frombuffer(self._map, np.uint8, tensor.nbytes, tensor.offset).reshape(*tensor.shape[:-1], row_bytes)

    def dequantize(self, tensor: TensorInfo, part: tuple[int, int, int] | None = None) -> np.ndarray:
        """float32 [shape]: F32 data is a read-only view of the map, other types a fresh array.
        NotImplementedError for types the gguf package cannot dequantize.

        part (dim, start, stop): only those rows, or those columns (innermost dim), dequantizing
        only their blocks when the columns fall on block edges."""
        blocks = self.blocks(tensor, part)
        if blocks is None:  # columns cut through blocks: dequantize the rows whole
            return self.dequantize(tensor)[..., part[1]:part[2]]
        data, shape = blocks
        return dequantize(data, tensor.type).reshape(shape)

    def blocks(self, tensor: TensorInfo, part: tuple[int, int, int] | None = None) -> tuple[np.ndarray, list[int]] | None:
        """(the bytes of `part` of a tensor as `data` gives them, its shape); None when the part's
        columns do not fall on block edges."""
        data, shape = self.data(tensor), list(tensor.shape)
        if part is not None:
            dim, start, stop = part
            block, block_bytes = GGML_QUANT_SIZES[tensor.type]
            if dim < len(shape) - 1:
                data = data[(slice(None),) * dim + (slice(start, stop),)]
            elif start % block or stop % block:
                return None
            else:
                data = data[..., start // block * block_bytes:stop // block * block_bytes]
            shape[dim] = stop - start
        return data, shape


def open_gguf(path: Path) -> GGUFFile:
    """The parsed file, kept for the next call on the same unchanged file (the model and its tokenizer
    read the same one)."""
    stat = path.stat()
    return _open(path.absolute(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1)
def _open(path: Path, size: int, mtime_ns: int) -> GGUFFile:
    return GGUFFile(path)


def _corrupt(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a readable GGUF file ({why})")


def _parse(buf: mmap.mmap) -> tuple[dict[str, Any], dict[str, TensorInfo]]:
    magic, version, n_tensors, n_kv = _HEADER.unpack_from(buf)
    if magic != GGUF_MAGIC:
        raise ValueError("it does not start with the bytes 'GGUF'")
    if version not in _VERSIONS and int.from_bytes(version.to_bytes(4, "little"), "big") in _VERSIONS:
        raise ValueError("it is big-endian; only little-endian GGUF files are supported")
    if version not in _VERSIONS:
        raise ValueError(f"GGUF version {version} is not supported, only {' and '.join(map(str, _VERSIONS))}")
    cursor = _Cursor(buf, _HEADER.size)
    metadata = dict(cursor.key_value() for _ in range(n_kv))
    infos = [cursor.tensor_info() for _ in range(n_tensors)]
    alignment = metadata.get(Keys.General.ALIGNMENT, GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        raise ValueError(f"'{Keys.General.ALIGNMENT}' is {alignment!r}, not a positive integer")
    start = -(-cursor.pos // alignment) * alignment  # the data section, after the table's padding
    tensors: dict[str, TensorInfo] = {}
    for name, ne, code, offset in infos:
        tensor = _tensor(name, ne, code, start + offset)
        if name in tensors:
            raise ValueError(f"tensor '{name}' appears twice")
        if tensor.offset + tensor.nbytes > len(buf):
            raise ValueError(f"tensor '{name}' ends at byte {tensor.offset + tensor.nbytes}, the file at byte "
                             f"{len(buf)}: it is truncated")
        tensors[name] = tensor
    return metadata, tensors


def _tensor(name: str, ne: tuple[int, ...], code: int, offset: int) -> TensorInfo:
    try:
        kind = GGMLQuantizationType(code)
        block, block_bytes = GGML_QUANT_SIZES[kind]
    except (ValueError, KeyError):
        raise ValueError(f"tensor '{name}' has ggml type {code}, unknown to the installed gguf package") from None
    if not ne or ne[0] % block:
        raise ValueError(f"tensor '{name}' has shape {ne} (innermost first), not whole {kind.name} blocks of {block}")
    return TensorInfo(name, ne[::-1], kind, offset, math.prod(ne) // block * block_bytes)


class _Cursor:
    """Reads values one after the other from `pos`; every read checks it stays inside the file."""

    def __init__(self, buf: mmap.mmap, pos: int):
        self.buf, self.pos = buf, pos

    def skip(self, n: int) -> int:
        """Advances over n bytes; returns where they start."""
        start, self.pos = self.pos, self.pos + n
        if self.pos > len(self.buf):
            raise ValueError(f"the file ends at byte {len(self.buf)}, inside the {n}-byte value at byte {start}: "
                             "it is truncated")
        return start

    def unpack(self, fmt: str, count: int = 1) -> tuple:
        start = self.skip(struct.calcsize(f"<{fmt}") * count)  # before unpacking: a corrupt count may be huge
        return struct.unpack_from(f"<{count}{fmt}", self.buf, start)

    def string(self) -> str:
        size = _U64.unpack_from(self.buf, self.skip(8))[0]
        start = self.skip(size)
        return str(self.buf[start:self.pos], "utf-8")

    def strings(self, count: int) -> list[str]:
        """`count` strings in a row: string() inlined, as vocabularies and merges hold ~10^5 of them."""
        buf, pos, end, unpack = self.buf, self.pos, len(self.buf), _U64.unpack_from
        out = []
        for i in range(count):
            start = pos + 8
            if start > end or (stop := start + unpack(buf, pos)[0]) > end:
                raise ValueError(f"the file ends at byte {end}, inside string {i} of {count} at byte {pos}: "
                                 "it is truncated")
            out.append(str(buf[start:stop], "utf-8"))
            pos = stop
        self.pos = pos
        return out

    def key_value(self) -> tuple[str, Any]:
        key = self.string()
        return key, self.value(self.kind(key), key)

    def kind(self, key: str) -> GGUFValueType:
        code = _U32.unpack_from(self.buf, self.skip(4))[0]
        try:
            return GGUFValueType(code)
        except ValueError:
            raise ValueError(f"key '{key}' has unknown value type {code}") from None

    def value(self, kind: GGUFValueType, key: str) -> Any:
        if kind == GGUFValueType.STRING:
            return self.string()
        if kind == GGUFValueType.ARRAY:
            item = self.kind(key)
            count = _U64.unpack_from(self.buf, self.skip(8))[0]
            if item in _SCALARS:  # one unpack for the whole array: token types, scores
                return list(self.unpack(_SCALARS[item], count))
            if item == GGUFValueType.STRING:
                return self.strings(count)
            return [self.value(item, key) for _ in range(count)]
        return self.unpack(_SCALARS[kind])[0]

    def tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        """(name, ne innermost first, ggml type code, offset from the data section)."""
        name = self.string()
        (n_dims,) = self.unpack("I")
        ne = self.unpack("Q", n_dims)
        code, offset = self.unpack("IQ")
        return name, ne, code, offset
