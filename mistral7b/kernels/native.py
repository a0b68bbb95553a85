"""Builds and loads kernels.cpp and decode.cpp (the `torch.ops.mistral7b.*` ops) on first use.

The library is built once per build key (a hash of the sources, the compiler and its flags, torch's and
Python's versions) into its own folder, `mistral7b_kernels_<key>/`, under $MISTRAL7B_KERNELS_DIR, else
torch's extensions cache ($TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions). Any later process of any
install with the same key loads that library as it is, without ninja: torch's own `load(name=...)`
keeps one folder per name and writes the sources' absolute paths into its build.ninja, so two
checkouts of the same sources rebuilt over each other on every switch. Here the sources are copied
into the build, one process compiles (a file lock; others wait) in a temporary folder renamed into
place when done, so a folder that exists is complete. Compiling takes ~35 s of compiler CPU time
(~20 s wall on 2 idle cores) and says so on stderr; `mistral7b doctor` does it ahead of use.
No compiler, a CPU without AVX2, or a failed build warn once and leave the pure-torch path in use.
`MISTRAL7B_NATIVE=0` forces that path.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).parent
SOURCES = [HERE / "kernels.cpp", HERE / "decode.cpp"]
HEADERS = [HERE / "gemv.h", HERE / "simd.h"]
# -ffp-contract=off: dequantize rounds q * s, then + m, exactly as the pure-torch reference.
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off"]
LDFLAGS = ["-fopenmp"]
NAME = "mistral7b_kernels"
LIBRARY = f"{NAME}.so"


# False forces the pure-torch path (MISTRAL7B_NATIVE=0 at import; tests set it directly).
ENABLED = os.environ.get("MISTRAL7B_NATIVE", "1") != "0"


_built: list[bool] = []  # the build's outcome, once known


def native_available() -> bool:
    """True when native ops are enabled and built (the CPU has AVX2 and the build succeeded).
    torch.compile never traces the build (is_compiling); it reads the outcome of an eager call."""
    if ENABLED and not _built and not torch.compiler.is_compiling():
        _built.append(_build())
    return ENABLED and bool(_built) and _built[0]


def cpu_supported() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _read_sources() -> dict[str, bytes]:
    """The files as read once: the key and the build both use these bytes, even if a file changes."""
    return {p.name: p.read_bytes() for p in SOURCES + HEADERS}


def build_key(sources: dict[str, bytes] | None = None) -> str:
    """Hash of everything the library depends on: another key means another build folder."""
    h = hashlib.sha256()
    for name, code in (sources or _read_sources()).items():
        h.update(name.encode() + b"\0" + code)
    for part in (*FLAGS, "|", *LDFLAGS, os.environ.get("CXX", "c++"), torch.__version__,
                 torch.version.git_version, platform.python_version(), platform.machine()):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def cache_root() -> Path:
    if os.environ.get("MISTRAL7B_KERNELS_DIR"):
        return Path(os.environ["MISTRAL7B_KERNELS_DIR"])
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_extensions"


def library_path(sources: dict[str, bytes] | None = None) -> Path:
    """Where this version's built library is (or will be)."""
    return cache_root() / f"{NAME}_{build_key(sources)}" / LIBRARY


def is_built() -> bool:
    return library_path().is_file()


def _build() -> bool:
    if not cpu_supported():
        return False
    try:
        _load_or_compile()
    except Exception as e:  # no compiler, headers or ninja: any failure means "use the fallback"
        warnings.warn(f"mistral7b.kernels: native build failed, using pure torch: {e}", stacklevel=3)
        return False
    _register_fakes()
    return True


def _load_or_compile() -> None:
    sources = _read_sources()
    library = library_path(sources)
    if not library.is_file():
        library.parent.parent.mkdir(parents=True, exist_ok=True)
        with _lock(library.parent.with_name(library.parent.name + ".lock")):
            if not library.is_file():  # not built by another process while this one waited
                _compile(library.parent, sources)  # cpp_extension.load also loads it
                return
    torch.ops.load_library(str(library))


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive lock on `path` that the OS drops if its holder dies (flock, not a lock file
    whose leftover would block every later process)."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; the rename in _compile still keeps folders whole
        yield
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("mistral7b: another process is compiling the native kernels; waiting...", file=sys.stderr,
                  flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _compile(folder: Path, sources: dict[str, bytes]) -> None:
    """Build into a private folder from copies of the sources (the same paths for every install),
    then rename it to `folder`: a folder under its final name always holds a finished library."""
    from torch.utils import cpp_extension

    work = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    (work / "src").mkdir(parents=True)
    for name, code in sources.items():
        (work / "src" / name).write_bytes(code)
    print("mistral7b: compiling native kernels (once, ~20-60 s)...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        cpp_extension.load(name=NAME, sources=[str(work / "src" / p.name) for p in SOURCES], extra_cflags=FLAGS,
                           extra_ldflags=LDFLAGS, build_directory=str(work), is_python_module=False, verbose=False)
        try:
            os.rename(work, folder)
        except OSError:  # another process (no lock on this OS) renamed its build first: use that one
            if not (folder / LIBRARY).is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)  # a failed build, or a folder another process renamed first
    print(f"mistral7b: native kernels compiled in {time.perf_counter() - start:.1f} s ({folder})",
          file=sys.stderr, flush=True)


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
