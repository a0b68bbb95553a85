"""What a run reports: `metrics.jsonl` (one JSON object per step or evaluation) and `loss.png`."""

from __future__ import annotations

import json
from pathlib import Path


class Metrics:
    def __init__(self, path: Path, resume_step: int):
        """Continue `path`, dropping records after `resume_step` (a resumed run writes them again)."""
        self.path = path
        records = []
        if resume_step and path.exists():
            records = [r for r in map(json.loads, path.read_text().splitlines()) if r["step"] <= resume_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in records))

    def log(self, **record) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()]


def plot(records: list[dict], file: Path) -> None:
    """Training loss per step and, where present, evaluation loss."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [r for r in records if "loss" in r]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    evals = [r for r in records if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(file, dpi=100)
    plt.close(fig)
