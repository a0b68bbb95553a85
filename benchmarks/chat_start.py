"""Time from `mistral7b chat` starting to its answer, as a user meets it (issue 16's goal: warm start
under 3 s in all, first token under 0.5 s after the prompt).

    python benchmarks/chat_start.py [--runs 5] [--fresh-kernels]

Each run is `echo Hi | mistral7b chat --max-tokens 8` in a new process, the default model's file in
the OS page cache. Prints each run's wall time (process start to exit) and the chat's own "first
token after" figure, then their medians. --fresh-kernels first runs once on an empty kernel cache
(MISTRAL7B_KERNELS_DIR in a new temporary folder), which compiles the native kernels.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time

COMMAND = ["mistral7b", "chat", "--max-tokens", "8"]
FIRST_TOKEN = re.compile(r"first token after ([0-9.]+) s")


def run_once(env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, first token seconds after the prompt) of one chat."""
    start = time.perf_counter()
    out = subprocess.run(COMMAND, input="Hi\n", capture_output=True, text=True, env=env, check=True)
    wall = time.perf_counter() - start
    found = FIRST_TOKEN.search(out.stderr)
    if found is None:
        raise SystemExit(f"no 'first token after' line in the chat's output:\n{out.stderr}")
    return wall, float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="warm runs (default 5)")
    parser.add_argument("--fresh-kernels", action="store_true", help="start with an empty kernel cache")
    args = parser.parse_args()
    if shutil.which(COMMAND[0]) is None:
        raise SystemExit("the mistral7b command is not on PATH: pip install -e . first")
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as kernels:
        if args.fresh_kernels:
            env["MISTRAL7B_KERNELS_DIR"] = kernels
            wall, first = run_once(env)
            print(f"fresh kernel cache: {wall:.2f} s in all, first token {first:.2f} s after the prompt")
        runs = [run_once(env) for _ in range(args.runs)]
    for i, (wall, first) in enumerate(runs, 1):
        print(f"warm run {i}: {wall:.2f} s in all, first token {first:.2f} s after the prompt")
    walls, firsts = [w for w, _ in runs], [f for _, f in runs]
    print(f"warm median: {statistics.median(walls):.2f} s in all (range {min(walls):.2f}-{max(walls):.2f}), "
          f"first token {statistics.median(firsts):.2f} s (range {min(firsts):.2f}-{max(firsts):.2f}); "
          f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
