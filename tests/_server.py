"""Starting a real `mistral7b serve` subprocess on a free 127.0.0.1 port, for tests."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*flags: str, command: tuple[str, ...] = (sys.executable, "-m", "mistral7b")) -> tuple[subprocess.Popen, str]:
    """-> (process, base URL), once /health answers. `command` runs mistral7b (e.g. under torchrun)."""
    port = free_port()
    return start_process([*command, "serve", "--port", str(port), *flags], port)


def start_process(argv: list[str], port: int, timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """Start a server that listens on 127.0.0.1:port -> (process, base URL), once its /health answers."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read()}")
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{argv[0]} did not start")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
