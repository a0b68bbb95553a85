"""Running a tensor-parallel model under torchrun: rank 0 leads, the other ranks follow.

Rank 0 runs the command (generate, chat, the HTTP server) with a `Leader` in place of its model.
Before each call that reaches the model (load, a new KV cache, a forward), the leader broadcasts
it to the followers, which make the same call on their own shard in `follow`. Messages go over a
gloo group of their own (CPU, with no timeout worth the name: an idle server sends nothing for
hours), as an int64 header [kind, 7 fields] and, for some kinds, an int64 payload. The model's
own collectives use the default group (gloo or NCCL).

KV caches: every rank's cache must hold the same positions. A forward carries the lengths of all
rows on rank 0; between forwards a row can only shrink (`reset`, `truncate`, which forget the
positions >= the new length), so a follower whose row is longer replays that shrink first. That
keeps rank 0's callers (engine, chat) free to manage their cache as they do without TP.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import threading
import traceback
import weakref
from datetime import timedelta
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from ..cache import KVCache
from ..errors import CheckpointError, InputError, Mistral7BError
from ..model import Transformer
from ..runner import Runner
from .shard import Shard

_STOP, _LOAD, _CACHE, _FORWARD = range(4)
_HEADER = 8
_IDLE = timedelta(days=365)  # how long followers wait for rank 0's next message

_channel: _Channel | None = None


class _Channel:
    """Rank 0 -> all broadcasts over a gloo group; `lock` keeps one message and its forward whole
    when several threads use the model (the server's engine thread, the main thread at exit)."""

    def __init__(self):
        self.group = dist.new_group(backend="gloo", timeout=_IDLE)
        self.lock = threading.Lock()
        self.stopped = False

    def send(self, kind: int, *fields: int, payload: torch.Tensor | None = None) -> None:
        if self.stopped:
            raise RuntimeError("the tensor-parallel ranks have been told to stop")
        header = torch.zeros(_HEADER, dtype=torch.long)
        header[:1 + len(fields)] = torch.tensor([kind, *fields])
        dist.broadcast(header, 0, group=self.group)
        if payload is not None and payload.numel():
            dist.broadcast(payload.to("cpu", torch.long), 0, group=self.group)

    def receive_header(self) -> list[int]:
        header = torch.empty(_HEADER, dtype=torch.long)
        dist.broadcast(header, 0, group=self.group)
        return header.tolist()

    def receive(self, n: int) -> torch.Tensor:
        payload = torch.empty(n, dtype=torch.long)
        if n:
            dist.broadcast(payload, 0, group=self.group)
        return payload

    def gather_errors(self, error: str | None) -> list[str | None]:
        errors: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error, group=self.group)
        return errors

    def stop(self) -> None:
        with self.lock:
            if not self.stopped:
                with contextlib.suppress(RuntimeError):  # followers already gone (Ctrl-C): nothing to tell
                    self.send(_STOP)
                self.stopped = True


def is_rank0() -> bool:
    """False in torchrun's processes other than rank 0 (they leave user errors to rank 0)."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def launch(tp: int | None, device: str = "cpu") -> Iterator[bool]:
    """Join torchrun's processes for `--tp` (None: a command without it, nothing to join). Yields
    True on the process that runs the command: rank 0, or the only one. Leaving tells the others
    to stop and leaves the group."""
    global _channel
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp is None:
        yield True
        return
    if tp < 1:
        raise InputError(f"--tp must be at least 1, got {tp}")
    if tp == 1 and world > 1:
        raise InputError(f"this is one of {world} torchrun processes: pass --tp {world} to split the model over them")
    if tp > 1 and "RANK" not in os.environ:
        raise InputError(f"--tp {tp} splits the model over {tp} processes; start them with torchrun: "
                         f"torchrun --nproc-per-node {tp} -m mistral7b ... --tp {tp}")
    if tp != world:
        raise InputError(f"--tp {tp} must equal the number of processes torchrun started ({world})")
    if tp == 1:
        yield True
        return
    backend = "gloo"
    if device.startswith("cuda"):
        if device != "cuda":
            raise InputError(f"--device {device}: with --tp pass --device cuda; each process uses the GPU of its LOCAL_RANK")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend = "nccl"
    dist.init_process_group(backend)
    _channel = _Channel()
    try:
        yield dist.get_rank() == 0
    finally:
        if dist.get_rank() == 0:
            _channel.stop()
        _channel = None
        dist.destroy_process_group()


def shard() -> Shard | None:
    """This process's part of the model under `launch`, for `mistral7b.load(..., shard=...)`."""
    return Shard(dist.get_rank(), dist.get_world_size()) if _channel else None


def _try(load_model: Callable[[], Transformer]) -> tuple[Transformer | None, Exception | None]:
    try:
        return load_model(), None
    except Exception as e:  # reported to rank 0, which raises it once for everyone
        return None, e


def _describe(e: Exception) -> str:
    return str(e) if isinstance(e, Mistral7BError) else f"{type(e).__name__}: {e}"


def load_everywhere(load_model: Callable[[], Transformer]) -> Transformer:
    """`load_model()` on every rank (each builds its shard, see `shard()`), returning rank 0's
    Leader; without `launch`, just `load_model()`. A rank that fails makes rank 0 raise."""
    if _channel is None:
        return load_model()
    with _channel.lock:
        _channel.send(_LOAD)
        model, error = _try(load_model)
        errors = _channel.gather_errors(error and _describe(error))
    if error is not None:
        raise error
    for rank, message in enumerate(errors):
        if message:
            raise CheckpointError(f"rank {rank} could not load its part of the model: {message}")
    return Leader(model, _channel)


class Leader(Runner):
    """Rank 0's model: the Runner of the local shard, whose calls are first sent to the other ranks
    (each runs its shard through a Runner too, see follow). Engine, chat and server use it as any
    Runner (engine.StepModel); logits are whole on rank 0."""

    # The other ranks' caches take blocks by replaying rank 0's forwards: blocks shared by an engine's
    # decision (prefix caching) would put them out of step.
    shares_blocks = False

    def __init__(self, model: Transformer, channel: _Channel):
        super().__init__(model)
        self._channel = channel
        self._cache_ids: weakref.WeakKeyDictionary[KVCache, int] = weakref.WeakKeyDictionary()
        self._next_id = itertools.count()

    def new_cache(self, max_seqs: int, max_len: int | None = None, n_blocks: int | None = None) -> KVCache:
        cache = self.model.new_cache(max_seqs, max_len, n_blocks=n_blocks)
        with self._channel.lock:
            ident = next(self._next_id)
            alive = list(self._cache_ids.values())  # followers drop their caches that are not
            self._channel.send(_CACHE, ident, max_seqs, -1 if max_len is None else max_len, len(alive),
                               n_blocks or -1, payload=torch.tensor(alive, dtype=torch.long))
            self._cache_ids[cache] = ident
        return cache

    def __call__(self, input_ids: torch.Tensor, seqlens: list[int], cache: KVCache | None = None, *,
                 rows: list[int] | None = None, output_rows: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.dim() != 1:  # the followers get a flat copy: fail here, before telling them
            raise ValueError(f"input_ids must be 1-D, got shape {tuple(input_ids.shape)}")
        if cache is not None and cache not in self._cache_ids:
            raise ValueError("a tensor-parallel model runs only caches made by its new_cache()")
        batch_rows = list(range(len(seqlens))) if rows is None else list(rows)
        # Every row's length, not only the batch's: a row rank 0 let go of (a finished or preempted
        # sequence) must give its blocks back on every rank, or their pools would drift apart.
        lengths = list(cache.lengths) if cache is not None else []
        outputs = output_rows.reshape(-1).cpu() if output_rows is not None else torch.empty(0, dtype=torch.long)
        payload = torch.cat([torch.tensor([*seqlens, *batch_rows, *lengths], dtype=torch.long), input_ids.cpu(), outputs])
        with self._channel.lock:
            self._channel.send(_FORWARD, self._cache_ids[cache] if cache is not None else -1, len(seqlens),
                               input_ids.numel(), -1 if output_rows is None else outputs.numel(), payload=payload)
            return super().__call__(input_ids, seqlens, cache, rows=rows, output_rows=output_rows)


def follow(load_model: Callable[[], Transformer]) -> None:
    """The loop of ranks > 0 under `launch`: make rank 0's calls on this rank's shard until it stops."""
    model: Runner | None = None
    caches: dict[int, KVCache] = {}
    while True:
        try:
            kind, *fields = _channel.receive_header()
        except RuntimeError as e:  # rank 0 died without a word (killed): say so in one line
            print(f"rank {dist.get_rank()}: lost rank 0 ({str(e).splitlines()[0]})", file=sys.stderr)
            raise SystemExit(1) from None
        if kind == _STOP:
            return
        if kind == _LOAD:
            loaded, error = _try(load_model)
            model = Runner(loaded) if error is None else None
            if error is not None and not isinstance(error, Mistral7BError):
                traceback.print_exception(error)  # a bug: rank 0 reports it in one line, the trace is here
            _channel.gather_errors(error and _describe(error))
        elif kind == _CACHE:
            ident, max_seqs, max_len, n_alive, n_blocks = fields[:5]
            alive = set(_channel.receive(n_alive).tolist())
            caches = {i: c for i, c in caches.items() if i in alive}
            caches[ident] = model.new_cache(max_seqs, None if max_len < 0 else max_len,
                                            n_blocks=None if n_blocks < 0 else n_blocks)
        elif kind == _FORWARD:
            _forward(model, caches, *fields[:4])


@torch.inference_mode()
def _forward(model: Runner, caches: dict[int, KVCache], cache_id: int, batch: int, tokens: int,
             n_outputs: int) -> None:
    cache = caches[cache_id] if cache_id >= 0 else None
    n_rows = cache.max_seqs if cache is not None else 0
    payload = _channel.receive(2 * batch + n_rows + tokens + max(n_outputs, 0))
    seqlens, rows, lengths, ids, outputs = payload.split([batch, batch, n_rows, tokens, max(n_outputs, 0)])
    rows = rows.tolist()
    if cache is not None:
        _replay_shrinks(cache, range(n_rows), lengths.tolist())
    try:
        model(ids.to(model.device), seqlens.tolist(), cache, rows=rows,
              output_rows=outputs.to(model.device) if n_outputs >= 0 else None)
    except (Mistral7BError, ValueError):
        pass  # a bad call: rank 0 raised the same error, before any collective


def _replay_shrinks(cache: KVCache, rows, lengths: list[int]) -> None:
    """Make the rows as long as on rank 0, which may have reset or truncated them since the last forward."""
    for row, length in zip(rows, lengths):
        if cache.lengths[row] == length:
            continue
        if length == 0:
            cache.reset([row])
        elif length > cache.lengths[row] or not cache.truncate(row, length):
            raise RuntimeError(f"KV cache row {row} is out of step with rank 0 ({cache.lengths[row]} vs {length})")
