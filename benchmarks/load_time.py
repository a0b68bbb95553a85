"""Time to load the default SmolLM2-135M-Instruct GGUF, in fresh processes, ours beside llama.cpp's.

    python benchmarks/load_time.py [--runs 3]

Each run is a new Python process (so imports count, as a user meets them); the file is in the OS
page cache after the first run. Prints the median seconds of: importing mistral7b, loading the
model as the command line does (its Q4_1 blocks kept as int4, `load(None, quantize="int4")`) and in
fp32 (`load(None)`, dequantized), the tokenizer, and llama.cpp's `Llama()`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

OURS = """
import json, time
t0 = time.perf_counter()
import mistral7b
t1 = time.perf_counter()
model = mistral7b.load(None, quantize="int4")
t2 = time.perf_counter()
tok = mistral7b.load_tokenizer(None)
t3 = time.perf_counter()
del model
model = mistral7b.load(None)
t4 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load (int4 blocks)": t2 - t1, "tokenizer": t3 - t2, "load (fp32)": t4 - t3}))
"""

LLAMA_CPP = """
import json, time
from mistral7b.defaults import default_model_path
path = str(default_model_path())
t0 = time.perf_counter()
from llama_cpp import Llama
t1 = time.perf_counter()
Llama(model_path=path, n_ctx=512, verbose=False)
t2 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "load": t2 - t1}))
"""


def run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    ours = [run(OURS) for _ in range(args.runs)]
    try:
        theirs = [run(LLAMA_CPP) for _ in range(args.runs)]
    except subprocess.CalledProcessError:
        theirs = []
    print(f"{'':>28} {'median s':>9}")
    for key in ("import", "load (int4 blocks)", "load (fp32)", "tokenizer"):
        print(f"{'mistral7b ' + key:>28} {statistics.median(r[key] for r in ours):9.2f}")
    for key in ("import", "load"):
        if theirs:
            print(f"{'llama.cpp ' + key:>28} {statistics.median(r[key] for r in theirs):9.2f}")


if __name__ == "__main__":
    main()
