"""The report: per-task metrics, the six category averages of Mistral 7B's table, as a text table,
a JSON file and a bar chart; several models side by side."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from statistics import fmean

from ..errors import InputError
from .tasks import CATEGORIES, TASKS


def categories(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """Each category's mean of the primary metric of the tasks run in it."""
    by_category: dict[str, list[float]] = {}
    for name, metrics in results.items():
        task = TASKS[name]
        by_category.setdefault(task.category, []).append(metrics[task.primary])
    return {c: fmean(by_category[c]) for c in CATEGORIES if c in by_category}


def table(runs: dict[str, dict[str, dict[str, float]]]) -> str:
    """runs: {model: results}. One row per task metric, then one per category; a column per model."""
    models = list(runs)
    first = runs[models[0]]
    rows = [("task", "metric", *models)]
    for name, metrics in first.items():
        for metric in metrics:
            rows.append((name, metric, *(f"{100 * runs[m][name][metric]:.1f}" for m in models)))
    cats = {m: categories(runs[m]) for m in models}
    for c in cats[models[0]]:
        rows.append((CATEGORIES[c], "average", *(f"{100 * cats[m][c]:.1f}" for m in models)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def to_json(runs: dict[str, dict[str, dict[str, float]]], config: dict) -> dict:
    """One model: {"results", "categories", "config"}; several: {"models": {name: {"results",
    "categories"}}, "config"}."""
    shaped = {m: {"results": r, "categories": categories(r)} for m, r in runs.items()}
    if len(runs) == 1:
        return {**next(iter(shaped.values())), "config": config}
    return {"models": shaped, "config": config}


def prepare_output(path: str | Path) -> None:
    """Create the folder of an output file and check a file can be written there, before any scoring."""
    path = Path(path)
    try:
        if path.is_dir():
            raise InputError(f"{path} is a folder; give a file name to write the report to")
        path.parent.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.").close()  # created and removed
    except OSError as e:
        raise InputError(f"{path}: cannot be written ({e.strerror or e})") from None


def write_json(path: str | Path, report: dict) -> None:
    """Written whole or not at all (a temporary file renamed over it), as it is rewritten after every task."""
    path = Path(path)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.",
                                     delete=False) as f:
        f.write(json.dumps(report, indent=2) + "\n")
    os.replace(f.name, path)


def plot(runs: dict[str, dict[str, dict[str, float]]], path: str | Path) -> None:
    """Grouped bars, one group per category (as the paper's figure), one bar per model."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    cats = {m: categories(r) for m, r in runs.items()}
    names = list(next(iter(cats.values())))
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names)), 4))
    for i, (model, values) in enumerate(cats.items()):
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(names))]
        bars = ax.bar(xs, [100 * values[c] for c in names], width, label=model)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(names)), [CATEGORIES[c] for c in names], rotation=15, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
