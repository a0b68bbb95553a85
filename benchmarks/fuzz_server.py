"""A schema fuzz of `mistral7b serve`: schemathesis generates requests from the server's own OpenAPI
document (every route, valid and invalid bodies) and checks that none gets a 5xx.

    pip install schemathesis
    python benchmarks/fuzz_server.py [--max-examples 25] [--phases coverage,fuzzing]

The server runs with --api-key (the key goes with every request) and --max-model-len 64, which
bounds the work of each generation. Exits with schemathesis' status: 0 when no request got a 5xx.

The counts are in BENCHMARKS.md ("The server's OpenAPI document, fuzzed").
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _server import start_server, stop_server  # noqa: E402

KEY = "fuzz-key"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=25, help="cases per route and phase (default: 25)")
    parser.add_argument("--phases", default="coverage,fuzzing", help="schemathesis phases (default: coverage,fuzzing)")
    parser.add_argument("--server-args", default="--dtype fp32", help="more flags for mistral7b serve")
    args = parser.parse_args()
    proc, url = start_server("--api-key", KEY, "--max-model-len", "64", "--max-num-seqs", "4", *args.server_args.split())
    try:
        with tempfile.TemporaryDirectory() as scratch:  # schemathesis leaves a .schemathesis folder where it runs
            return subprocess.run(["schemathesis", "run", f"{url}/openapi.json", "--checks", "not_a_server_error",
                                   "--max-examples", str(args.max_examples), "--phases", args.phases,
                                   "--header", f"Authorization: Bearer {KEY}", "--request-timeout", "60"],
                                  cwd=scratch).returncode
    finally:
        stop_server(proc)


if __name__ == "__main__":
    sys.exit(main())
