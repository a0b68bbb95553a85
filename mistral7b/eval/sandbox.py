"""Executing generated code: a fresh `python -I` in a temp dir with an empty environment, rlimits on
memory, CPU time and file size, a wall-clock timeout, and the guards of `_guard.py` (no sockets, no
processes, no writes outside the temp dir)."""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

GUARD = Path(__file__).with_name("_guard.py")


@dataclass(frozen=True)
class Outcome:
    passed: bool
    reason: str  # "passed", "failed: <last line of stderr>", "timeout"


def _limits(seconds: float, memory_mb: int) -> None:
    """In the child before exec: soft = hard limits, so the program cannot raise them."""
    cpu = int(seconds) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_program(source: str, *, timeout: float = 10.0, memory_mb: int = 1024) -> Outcome:
    """Run `source` as a script; it passes when it exits 0 within `timeout` seconds."""
    with tempfile.TemporaryDirectory(prefix="mistral7b-sandbox-") as tmp:
        program = Path(tmp) / "program.py"
        program.write_text(source, encoding="utf-8")
        try:
            done = subprocess.run([sys.executable, "-I", "-B", str(GUARD), str(program)], cwd=tmp,
                                  env={"TMPDIR": tmp, "HOME": tmp}, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=timeout, preexec_fn=lambda: _limits(timeout, memory_mb),
                                  start_new_session=True)
        except subprocess.TimeoutExpired:
            return Outcome(False, "timeout")
    if done.returncode == 0:
        return Outcome(True, "passed")
    if done.returncode < 0 and -done.returncode in (9, 24):  # SIGKILL / SIGXCPU: the CPU limit
        return Outcome(False, "timeout")
    lines = done.stderr.decode(errors="replace").strip().splitlines()
    return Outcome(False, "failed: " + (lines[-1] if lines else f"exit status {done.returncode}"))
