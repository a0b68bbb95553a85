"""Evaluation on the benchmarks of Mistral 7B's table: data (`data`), tasks (`tasks`), scoring
(`metrics`, `runner`, `sandbox` for code), backends (our engine or a server) and the report."""

from .backends import Backend, EngineBackend, Sampling, ServerBackend
from .runner import evaluate
from .tasks import CATEGORIES, TASKS

__all__ = ["Backend", "EngineBackend", "ServerBackend", "Sampling", "evaluate", "TASKS", "CATEGORIES"]
