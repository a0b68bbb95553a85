"""The GGUF container reader against the gguf package's own writer and reader, and its errors on
damaged files."""

from __future__ import annotations

import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from mistral7b.errors import CheckpointError
from mistral7b.gguf_file import GGUFFile, open_gguf

V = gguf.GGUFValueType
# key -> (value, type[, item type]): every value type, arrays of scalars, of strings and of arrays
METADATA = {
    "u8": (200, V.UINT8), "i8": (-100, V.INT8), "u16": (60000, V.UINT16), "i16": (-30000, V.INT16),
    "u32": (4_000_000_000, V.UINT32), "i32": (-2_000_000_000, V.INT32), "u64": (2**63 + 1, V.UINT64),
    "i64": (-(2**62), V.INT64), "f32": (0.1, V.FLOAT32), "f64": (0.1, V.FLOAT64), "yes": (True, V.BOOL),
    "text": ("héllo ▁ 😀", V.STRING), "ints": ([1, 2, 3], V.ARRAY, V.INT32), "floats": ([0.5, -1.0], V.ARRAY, V.FLOAT32),
    "strings": (["a", "", "ü b"], V.ARRAY, V.STRING), "bools": ([True, False], V.ARRAY, V.BOOL),
    "nested": ([["a", "b"], ["c"]], V.ARRAY, V.ARRAY),
}
# name -> (shape, ours: row-major; stored type): random values, quantized by the gguf package
# (the writer pads the last tensor to 32 bytes: q4 is 80 bytes + 16 padding)
TENSORS = {"matrix": ((4, 64), Q.F32), "half": ((3, 32), Q.F16), "vector": ((32,), Q.F32),
           "cube": ((2, 3, 32), Q.Q8_0), "q4": ((2, 64), Q.Q4_1)}


def write(path, *, alignment: int | None = None, **writer_options):
    w = gguf.GGUFWriter(str(path), "llama", **writer_options)
    for key, (value, kind, *item) in METADATA.items():
        w.add_key_value(key, value, kind, sub_type=item[0] if item else None)
    if alignment:
        w.add_custom_alignment(alignment)
    rng = np.random.default_rng(0)
    for name, (shape, qtype) in TENSORS.items():
        values = rng.standard_normal(shape, dtype=np.float32)
        data = gguf.quants.quantize(values, qtype)
        w.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("alignment", [None, 64])
def test_matches_gguf_reader(tmp_path, alignment):
    path = write(tmp_path / "all.gguf", alignment=alignment)
    ours, peer = GGUFFile(path), gguf.GGUFReader(path)
    expected = {"general.architecture": "llama"} | {key: value for key, (value, *_) in METADATA.items()}
    expected["f32"] = float(np.float32(0.1))  # stored as float32
    if alignment:
        expected["general.alignment"] = alignment
    assert ours.metadata == expected
    assert list(ours.tensors) == [t.name for t in peer.tensors]
    for tensor in peer.tensors:
        info = ours.tensors[tensor.name]
        assert (info.shape, info.type) == TENSORS[tensor.name]
        assert (info.offset, info.nbytes) == (tensor.data_offset, tensor.n_bytes)
        assert info.offset % (alignment or 32) == 0
        assert ours.data(info).tobytes() == np.asarray(tensor.data).tobytes()
        assert np.array_equal(ours.dequantize(info),
                              gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(info.shape))


def test_open_gguf_parses_a_file_once_until_it_changes(tmp_path):
    path = write(tmp_path / "model.gguf")
    first = open_gguf(path)
    assert open_gguf(path) is first
    os.utime(path, ns=(1, 1))
    assert open_gguf(path) is not first


def _patch(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new):]


def _tensor_type_at(data: bytes, name: str, n_dims: int) -> int:
    """Byte offset of a tensor info's ggml type: after its name, n_dims and ne."""
    return data.index(name.encode()) + len(name) + 4 + 8 * n_dims


FIRST_TYPE = 24 + 8 + len("general.architecture")  # the first key's value type follows the header and key


def _strings_at(data: bytes) -> int:
    """Byte offset of the "strings" array's first item: after the key, value type, item type and count."""
    return data.index(b"strings") + len("strings") + 4 + 4 + 8


DAMAGES = {
    "empty": (lambda d: b"", r"it has 0 bytes, fewer than a GGUF header's 24"),
    "not gguf": (lambda d: b"GGML" + d[4:], r"it does not start with the bytes 'GGUF'"),
    "version 1": (lambda d: _patch(d, 4, (1).to_bytes(4, "little")), r"GGUF version 1 is not supported"),
    "metadata cut": (lambda d: d[:200], r"the file ends at byte 200, inside the \d+-byte value at byte \d+: it is truncated"),
    "data cut": (lambda d: d[:-20], r"tensor 'q4' ends at byte \d+, the file at byte \d+: it is truncated"),
    "string array cut": (lambda d: d[:_strings_at(d) + 8 + 1 + 8 + 2],  # inside "ü b", the third string
                         r"the file ends at byte \d+, inside string 2 of 3 at byte \d+: it is truncated"),
    "string size": (lambda d: _patch(d, _strings_at(d), b"\xff" * 8),
                    r"the file ends at byte \d+, inside string 0 of 3"),
    "huge count": (lambda d: _patch(d, 24, b"\xff" * 8), r"the file ends at byte \d+, inside the \d+-byte value"),
    "value type": (lambda d: _patch(d, FIRST_TYPE, (99).to_bytes(4, "little")),
                   r"key 'general\.architecture' has unknown value type 99"),
    "ggml type": (lambda d: _patch(d, _tensor_type_at(d, "cube", 3), (99).to_bytes(4, "little")),
                  r"tensor 'cube' has ggml type 99, unknown"),
    "utf-8": (lambda d: _patch(d, 32, b"\xff"), r"'utf-8' codec can't decode"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_file(tmp_path, damage):
    change, reason = DAMAGES[damage]
    path = tmp_path / "broken.gguf"
    path.write_bytes(change(write(tmp_path / "good.gguf").read_bytes()))
    with pytest.raises(CheckpointError, match=rf"^{path}: not a readable GGUF file \({reason}"):
        GGUFFile(path)


def test_big_endian_file(tmp_path):
    path = write(tmp_path / "big.gguf", endianess=gguf.GGUFEndian.BIG)
    with pytest.raises(CheckpointError, match=r"big\.gguf: not a readable GGUF file \(it is big-endian"):
        GGUFFile(path)


def test_unreadable_path(tmp_path):
    with pytest.raises(CheckpointError, match=rf"^{tmp_path}: cannot be read"):
        GGUFFile(tmp_path)


def test_import_mistral7b_leaves_gguf_unloaded():
    """`import gguf` costs ~1 s (it loads mistral_common): only reading a GGUF file should pay it."""
    code = "import sys, mistral7b; print(sorted(m for m in ('gguf', 'mistral_common') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_reading_a_gguf_file_leaves_mistral_common_unloaded(tmp_path):
    """gguf's vocab module imports mistral_common (~0.5 s of a chat's start) for a converter class we
    never call: reading a GGUF file skips it, and mistral_common still imports and works afterwards."""
    path = write(tmp_path / "model.gguf")
    code = (f"import sys, pathlib; from mistral7b.gguf_file import GGUFFile; GGUFFile(pathlib.Path({str(path)!r})); "
            "print('mistral_common' in sys.modules); "
            "from mistral_common.tokens.tokenizers.mistral import MistralTokenizer; print(MistralTokenizer.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == "False\nMistralTokenizer\n"
