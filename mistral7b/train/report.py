"""What a run reports: `metrics.jsonl` (one JSON object per step or evaluation), `loss.png`, and its
progress on stderr."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm


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


class Progress:
    """Steps done, loss, tokens/s and ETA on stderr. On a terminal a tqdm bar; elsewhere (a log file,
    a pipe) tqdm's same text as a plain line about every tenth of the run, so logs stay line by line."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.total, self.initial, self.enabled = total, initial, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, desc="finetune", unit="step", disable=not self.tty,
                        dynamic_ncols=True)
        self.every = max(1, (total - initial) // 10)
        self.started = time.monotonic()

    def step(self, done: int, **postfix) -> None:
        if self.tty:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)
        elif self.enabled and (done - self.initial == 1 or done % self.every == 0 or done == self.total):
            text = ", ".join(f"{k}={v}" for k, v in postfix.items())
            self.write(tqdm.format_meter(done, self.total, time.monotonic() - self.started, prefix="finetune",
                                         unit="step", initial=self.initial, postfix=text, ascii=True))

    def write(self, line: str) -> None:
        """A line that stays (the bar redraws below it)."""
        if self.enabled:
            tqdm.write(line, file=sys.stderr)
            sys.stderr.flush()

    def close(self) -> None:
        self.bar.close()
