"""Continuous batching: requests, the step-wise engine, and its thread for async servers."""

from .engine import Engine, QueueFull
from .request import Request, SequenceOutput, TokenLogprob

__all__ = ["Engine", "QueueFull", "Request", "SequenceOutput", "TokenLogprob"]
