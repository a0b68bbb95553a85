"""Scoring one task with one backend: documents and shots in, per-task metrics out.

Every request of a task goes to the backend in one call, so the engine batches across documents.
Grouped tasks (MMLU subjects, BBH tasks, AGIEval exams, MATH subjects) are scored per group and the
groups averaged, each group counting once.
"""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import fmean

from ..errors import InputError
from .backends import Backend
from .sandbox import run_program
from .tasks import Code, Generation, MultipleChoice, Task


@dataclass(frozen=True)
class Example:
    group: str
    doc: dict
    prefix: str  # description and shots


def examples(task: Task, data_dir: str | Path, *, limit: int | None, shots: int, seed: int) -> list[Example]:
    """The scored documents of a task (the first `limit` of each group) with their few-shot prefixes."""
    subsets: list[str | None] = [None]
    if task.subsets:
        subsets = [s for s in task.subsets if task.available(data_dir, s)]
        if not subsets:
            raise InputError(f"no {task.name} data in {Path(data_dir) / task.name}: expected e.g. "
                             f"{task.name}/{task.subsets[0]}/{task.split}.jsonl from {task.hub(task.subsets[0])}")
    out: list[Example] = []
    for subset in subsets:
        docs = task.load(data_dir, subset, task.split)
        if task.expand:
            docs = [e for d in docs for e in task.expand(d)]
        pool = task.pool(data_dir, subset) if shots else []
        taken: dict[str, int] = defaultdict(int)
        for i, doc in enumerate(docs):
            group = doc[task.group_by] if task.group_by else (subset or task.name)
            if limit is not None and taken[group] >= limit:
                continue
            taken[group] += 1
            out.append(Example(group, doc, task.prefix(pool, doc, shots, seed, key=f"{subset}/{i}")))
    return out


def per_example(task: Task, backend: Backend, items: list[Example], *, seed: int, workers: int = 2) -> list[dict]:
    """Each example's metrics."""
    if isinstance(task, MultipleChoice):
        pairs = [[(e.prefix + ctx, cont) for ctx, cont in task.pairs(e.doc)] for e in items]
        logliks = iter(backend.loglikelihood([p for ps in pairs for p in ps]))
        return [task.score([next(logliks) for _ in ps], e.doc) for ps, e in zip(pairs, items)]
    assert isinstance(task, Generation)
    how = replace(task.how, seed=seed) if task.how.n > 1 else task.how
    samples = backend.generate([e.prefix + task.prompt(e.doc) for e in items], how)
    if isinstance(task, Code):
        programs = [task.program(e.doc, s[0]) for e, s in zip(items, samples)]
        with ThreadPoolExecutor(workers) as pool:
            return [{"pass@1": float(o.passed)} for o in pool.map(run_program, programs)]
    return [task.score_samples(s, e.doc) for s, e in zip(samples, items)]


def evaluate(task: Task, backend: Backend, data_dir: str | Path, *, limit: int | None = None,
             num_fewshot: int | None = None, seed: int = 1234) -> tuple[dict[str, float], int]:
    """-> ({metric: value}, number of examples scored)."""
    items = examples(task, data_dir, limit=limit, shots=task.shots if num_fewshot is None else num_fewshot, seed=seed)
    if not items:
        raise InputError(f"{task.name}: the {task.split} split in {Path(data_dir) / task.name} is empty")
    scores = per_example(task, backend, items, seed=seed)
    groups: dict[str, list[dict]] = defaultdict(list)
    for e, s in zip(items, scores):
        groups[e.group].append(s)
    metrics = scores[0].keys()
    return {m: fmean(fmean(s[m] for s in g) for g in groups.values()) for m in metrics}, len(items)
