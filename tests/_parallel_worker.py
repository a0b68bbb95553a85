"""Run under torchrun by tests/test_parallel.py: `python -m torch.distributed.run --nproc-per-node 2
tests/_parallel_worker.py OUT CHECKPOINT...`. Rank 0 runs `scenario` on each checkpoint split over
the ranks and saves the results to OUT; test_parallel.py runs the same scenario in one process."""

from __future__ import annotations

import sys

import torch

import mistral7b
from mistral7b import parallel


def scenario(model) -> dict[str, torch.Tensor]:
    """Logits of every kind of forward, with sequences longer than the window (W=4) so the rolling
    cache wraps, a reset and a truncated row, two caches, and the library's greedy generate."""
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(model.args.vocab_size, (n,), generator=g) for n in (11, 6, 5))
    out = {"packed": model(torch.cat([a, b]), [11, 6])}
    cache = model.new_cache(2)
    out["chunks"] = torch.cat([
        model(torch.cat([a[:3], b[:5]]), [3, 5], cache, rows=[0, 1]),
        model(a[3:9], [6], cache, rows=[0], output_rows=torch.tensor([2, 5])),
        model(torch.cat([b[5:], a[9:10]]), [1, 1], cache, rows=[1, 0]),
    ])
    cache.reset([1])  # a new sequence in row 1, a finished one in row 0
    out["after_reset"] = model(torch.cat([a[10:], c]), [1, 5], cache, rows=[0, 1])
    short = model.new_cache(1)
    model(c[:3], [3], short)
    short.truncate(0, 1)  # re-feed a changed tail (chat does this)
    out["after_truncate"] = model(c[3:], [2], short)
    tokens, logprobs = mistral7b.generate([a.tolist(), c.tolist()], model, max_tokens=8)
    out["generated"] = torch.tensor(tokens)
    out["logprobs"] = torch.tensor([lp for row in logprobs for lp in row])
    return out


def main(out: str, paths: list[str]) -> None:
    with parallel.launch(2) as leads:
        if leads:
            results = {}
            for path in paths:
                model = parallel.load_everywhere(lambda: mistral7b.load(path, shard=parallel.shard()))
                with torch.inference_mode():
                    results[path] = scenario(model)
            torch.save(results, out)
        else:
            following = iter(paths)  # rank 0 loads them in this order
            parallel.follow(lambda: mistral7b.load(next(following), shard=parallel.shard()))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
