"""Builds and loads kernels.cpp and decode.cpp (the `torch.ops.mistral7b.*` ops) on first use.

The build goes to torch's extensions cache (~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR),
which persists across processes: only the first process after a change to a source compiles
(~35 s of compiler CPU time; 50-120 s wall on a busy 2-core machine).
No compiler, a CPU without AVX2, or a failed build warn once and leave the pure-torch path in use.
`MISTRAL7B_NATIVE=0` forces that path.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).parent
SOURCES = [HERE / "kernels.cpp", HERE / "decode.cpp"]
HEADERS = [HERE / "gemv.h", HERE / "simd.h"]
# -ffp-contract=off: dequantize rounds q * s, then + m, exactly as the pure-torch reference.
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off"]


# False forces the pure-torch path (MISTRAL7B_NATIVE=0 at import; tests set it directly).
ENABLED = os.environ.get("MISTRAL7B_NATIVE", "1") != "0"


_built: list[bool] = []  # the build's outcome, once known


def native_available() -> bool:
    """True when native ops are enabled and built (the CPU has AVX2 and the build succeeded).
    torch.compile never traces the build (is_compiling); it reads the outcome of an eager call."""
    if ENABLED and not _built and not torch.compiler.is_compiling():
        _built.append(_build())
    return ENABLED and bool(_built) and _built[0]


def _build() -> bool:
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    try:
        from torch.utils import cpp_extension

        # One build folder per source and flags: processes running different versions (a long-lived
        # server beside tests of an edit) must not rebuild over each other's library.
        code = b"".join(p.read_bytes() for p in SOURCES + HEADERS)
        digest = hashlib.sha1(code + " ".join(FLAGS).encode()).hexdigest()[:10]
        cpp_extension.load(name=f"mistral7b_kernels_{digest}", sources=[str(p) for p in SOURCES], extra_cflags=FLAGS,
                           extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except Exception as e:  # no compiler, headers or ninja: any failure means "use the fallback"
        warnings.warn(f"mistral7b.kernels: native build failed, using pure torch: {e}", stacklevel=3)
        return False
    _register_fakes()
    return True


def _register_fakes() -> None:
    """Shapes and dtypes of the ops without running them: torch.compile traces them as extern calls."""

    def gemv(x, qweight, *_):
        return x.new_empty((*x.shape[:-1], qweight.shape[0]))

    def dequantize(qweight, scales, *rest):
        n, k = qweight.shape[0], qweight.shape[1] * (2 if qweight.dtype == torch.uint8 else 1)
        return qweight.new_empty((n, k), dtype=rest[-1])

    for name in ("int8_gemv", "int4_gemv", "float_gemv"):
        torch.library.register_fake(f"mistral7b::{name}", gemv)
    for name in ("dequantize_int8", "dequantize_int4"):
        torch.library.register_fake(f"mistral7b::{name}", dequantize)
    torch.library.register_fake("mistral7b::decode_step", lambda h, *_: torch.empty_like(h))
