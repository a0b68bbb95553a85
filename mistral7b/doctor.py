"""`mistral7b doctor`: checks this machine's set-up, one `ok`/`warn` line each, and builds the native
kernels if they are not built yet, so that the first chat answer does not wait for the compiler."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
import warnings


def register(sub) -> None:
    p = sub.add_parser("doctor", help="check the set-up and build the native kernels once",
                       description="Check torch, threads, AVX2, the C++ compiler, the native kernels (built now "
                                   "if they are not: ~20-60 s, once per version) and the default model. "
                                   "Prints one ok/warn line per check; warnings do not stop other commands.")
    p.set_defaults(run=run)


def run(args=None) -> None:
    for status, name, detail in (check() for check in CHECKS):
        print(f"{status:<5} {name:<15} {detail}", flush=True)


def _torch():
    import torch

    return "ok", "torch", f"{torch.__version__} (Python {platform.python_version()})"


def _threads():
    import torch

    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    detail = f"{torch.get_num_threads()} torch threads on {cores} CPU cores, load average {load:.1f}"
    if load > cores:  # other jobs hold the cores: a thread team waits for descheduled members
        return "warn", "threads", detail + ": the CPU is busy; OMP_NUM_THREADS=1 may decode faster"
    return "ok", "threads", detail


def _cpu():
    import torch

    from .kernels import native

    capability = torch.backends.cpu.get_cpu_capability()
    if native.cpu_supported():
        return "ok", "cpu", f"{capability} ({platform.machine()})"
    return "warn", "cpu", f"{capability}: no AVX2, so the native kernels cannot run (pure torch: slower decode)"


def _compiler():
    from torch.utils.cpp_extension import is_ninja_available

    cxx = os.environ.get("CXX", "c++")
    path = shutil.which(cxx)
    if path is None:
        return "warn", "compiler", f"no C++ compiler ({cxx}) on PATH: the native kernels cannot be built"
    if not is_ninja_available():
        return "warn", "compiler", f"{path} but no ninja (pip install ninja): the native kernels cannot be built"
    version = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.partition("\n")[0]
    return "ok", "compiler", f"{version or path}, ninja"


def _kernels():
    from .kernels import native

    if not native.ENABLED:
        return "warn", "native kernels", "off (MISTRAL7B_NATIVE=0): pure torch in use"
    if not native.cpu_supported():
        return "warn", "native kernels", "not used on this CPU (no AVX2)"
    built_before = native.is_built()
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = native.native_available()
    if not ok:
        reason = str(caught[-1].message) if caught else "the build failed"
        return "warn", "native kernels", f"{reason.splitlines()[0]}"
    how = "built" if built_before else f"compiled now in {time.perf_counter() - start:.0f} s"
    return "ok", "native kernels", f"{how} ({native.library_path().parent})"


def _default_model():
    from .defaults import default_model_path
    from .errors import Mistral7BError

    try:
        path = default_model_path()
    except Mistral7BError as e:
        return "warn", "default model", f"{e} (commands then need --model PATH)"
    return "ok", "default model", f"{path} ({path.stat().st_size / 2**20:.1f} MiB)"


CHECKS = (_torch, _threads, _cpu, _compiler, _kernels, _default_model)
