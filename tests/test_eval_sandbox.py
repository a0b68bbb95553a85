"""Generated code runs confined: no writes outside its temp dir, no sockets, no run past its time limit."""

from __future__ import annotations

import time

from mistral7b.eval.sandbox import run_program


def test_passing_and_failing_programs():
    assert run_program("assert sum([1, 2]) == 3\nopen('scratch.txt', 'w').write('ok')\n").passed
    outcome = run_program("assert 1 == 2\n")
    assert not outcome.passed and "AssertionError" in outcome.reason


def test_cannot_write_outside_its_temp_dir(tmp_path):
    target = tmp_path / "escaped.txt"
    for attempt in (f"open({str(target)!r}, 'w').write('x')",
                    f"import os; os.close(os.open({str(target)!r}, os.O_CREAT | os.O_WRONLY))",
                    f"import shutil; shutil.copy(__file__, {str(target)!r})",
                    f"import os; os.rename(__file__, {str(target)!r})"):
        outcome = run_program(attempt)
        assert not outcome.passed and "PermissionError" in outcome.reason, attempt
        assert not target.exists()


def test_cannot_open_a_socket():
    for attempt in ("import socket; socket.socket()",
                    "import socket; socket.create_connection(('127.0.0.1', 80), timeout=1)",
                    "import urllib.request; urllib.request.urlopen('http://127.0.0.1:1')",
                    "import ctypes; ctypes.CDLL(None).socket(2, 1, 0)",
                    "import subprocess; subprocess.run(['curl', 'http://127.0.0.1'])"):
        outcome = run_program(attempt)
        assert not outcome.passed and "not allowed" in outcome.reason, (attempt, outcome)


def test_cannot_run_past_its_time_limit():
    start = time.monotonic()
    assert run_program("while True:\n    pass\n", timeout=1.0).reason == "timeout"
    assert run_program("import time\ntime.sleep(30)\n", timeout=1.0).reason == "timeout"  # wall clock, not CPU
    assert time.monotonic() - start < 10


def test_memory_is_bounded():
    outcome = run_program("x = bytearray(4 << 30)\n", memory_mb=512)
    assert not outcome.passed and "MemoryError" in outcome.reason
