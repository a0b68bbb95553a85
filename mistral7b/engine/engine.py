"""The continuous-batching engine: requests join and leave the running batch at every step.

Single-threaded by design: servers drive it from one thread (see `engine/threaded.py`).

Each `step()` is one packed forward. Running sequences decode one token each first (so streams
never stall), then waiting prompts are pre-filled in chunks with what is left of the per-step token
budget. Every sequence holds a row of the paged KV cache (cache.py): blocks taken as it grows and
given back when it ends (for windowed models, as they leave the window). Requests wait FIFO for a
row and the blocks their prompt needs; when decoding sequences need more blocks than are free, the
newest is preempted (its blocks given back) and later re-fed, never failed.

Prefix caching: the full blocks of every sequence are published under the hash of their tokens and
all before them (engine/prefix.py), so a new prompt that starts like an earlier one (a chat's
history, a few-shot preamble) starts on those blocks and pre-fills only the rest.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Protocol

import torch

from ..args import ModelArgs
from ..cache import KVCache
from ..errors import InputError, Mistral7BError
from ..model import Transformer
from ..runner import Runner
from .prefix import extend_hashes
from ..sampling import apply_logit_bias, apply_penalties, greedy, sample
from ..speculative import SpeculativeConfig, verify
from ..structured import Grammars, mask_logits
from .request import Request, Sequence, SequenceOutput, TokenLogprob

log = logging.getLogger(__name__)


def check_prompts(prompts: list[list[int]], vocab_size: int) -> None:
    if not prompts:
        raise InputError("no prompts given")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise InputError(f"prompt {i} is empty")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise InputError(f"prompt {i} has token id(s) {bad[:5]} outside the vocabulary [0, {vocab_size})")


def context_limit(model: Transformer) -> int | None:
    """Longest sequence the model can run: unbounded for windowed models (the cache rolls)."""
    return None if model.args.sliding_window is not None else model.args.max_seq_len


class StepModel(Protocol):
    """What the engine needs of a model: a `Runner` (one process) or a tensor-parallel `Leader`."""

    args: ModelArgs
    device: torch.device
    cache_dtype: torch.dtype
    shares_blocks: bool  # whether sequences may start on cached blocks (prefix caching)

    def new_cache(self, max_seqs: int, max_len: int | None = None, n_blocks: int | None = None) -> KVCache: ...

    def preferred_chunk(self, cache: KVCache, row: int, remaining: int) -> int | None: ...

    def __call__(self, input_ids: torch.Tensor, seqlens: list[int], cache: KVCache | None = None, *,
                 rows: list[int] | None = None, output_rows: torch.Tensor | None = None) -> torch.Tensor: ...


def default_chunk_size(args: ModelArgs, prompt_tokens: int) -> int:
    """Pre-fill chunk when none is asked for: a window's worth for windowed models (a chunk then
    never attends past the keys it brings), else the whole prompt."""
    return args.sliding_window or prompt_tokens


class QueueFull(Mistral7BError):
    """The waiting queue is at its bound: the caller should retry later (HTTP 503)."""


class Engine:
    def __init__(self, model: Transformer | StepModel, tokenizer=None, *, max_num_seqs: int = 32,
                 max_model_len: int | None = None, max_tokens_per_step: int = 256,
                 chunk_size: int | None = None, max_queue: int = 1024, n_blocks: int | None = None,
                 prefix_caching: bool = True, speculative: SpeculativeConfig | None = None):
        """speculative: guess tokens and verify them in the decode steps (speculative.py)."""
        # The engine runs models through a Runner (routes, fused projections, native weights).
        self.model: StepModel = Runner(model) if isinstance(model, Transformer) else model
        self.tokenizer = tokenizer
        limit = context_limit(model)  # None for windowed models: their cache rolls
        if max_model_len is not None and limit is not None:
            max_model_len = min(max_model_len, limit)
        self.max_model_len = max_model_len or limit
        if self.max_model_len is None and model.args.sliding_window is None:
            raise InputError("the model's context length is unknown: pass max_model_len")
        pool = {"n_blocks": n_blocks} if n_blocks else {}
        self.cache = model.new_cache(max_num_seqs, self.max_model_len, **pool)
        self.prefix_caching = prefix_caching and self.model.shares_blocks
        if speculative is not None and not isinstance(self.model, Runner):
            raise InputError("speculative decoding runs in one process (not with --tp)")
        self.speculative = speculative
        if speculative is not None:  # rejected guesses are cut out again: keep that much past the window
            self.cache.rollback = speculative.num_tokens
            self._proposer = speculative.proposer(model.args, max_num_seqs, self.max_model_len)
        self.max_num_seqs = max_num_seqs
        self.chunk_size = chunk_size or default_chunk_size(model.args, max_tokens_per_step)
        self.max_tokens_per_step = max(max_tokens_per_step, max_num_seqs)
        self.max_queue = max_queue
        self.free_rows = list(range(max_num_seqs))
        self.waiting: deque[Request] = deque()
        self.preempted: deque[Sequence] = deque()  # lost their blocks; re-admitted before new requests
        self.running: list[Sequence] = []
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.prefix_queries_total = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits_total = 0  # of which found there
        self.preemptions_total = 0
        self.spec_proposed_total = 0  # guessed tokens fed to verification
        self.spec_accepted_total = 0  # of which the model agreed with
        self.spec_steps_total = 0  # verifications (sequence-steps with guesses)
        # Structured outputs: the compiler (its vocabulary is built with the first constraint, ~1 s).
        self.grammars = Grammars(tokenizer, self.model.args.vocab_size) if tokenizer is not None else None

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, request: Request) -> Request:
        """Validate and queue a request; raises InputError for bad ones, QueueFull when full."""
        self.validate(request)
        return self.enqueue(request)

    def enqueue(self, request: Request) -> Request:
        """Queue a request already validated (by `validate`); QueueFull when the queue is at its bound."""
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"the server is overloaded ({len(self.waiting)} requests waiting); retry later")
        self.waiting.append(request)
        return request

    def validate(self, request: Request) -> None:
        """Raise InputError for a request this engine can never run (reads no mutable state but
        the length of a continued row)."""
        check_prompts([request.prompt], self.model.args.vocab_size)
        request.params.check_vocabulary(self.model.args.vocab_size)
        if request.params.constraint is not None and request.grammar is None:
            if self.grammars is None:
                raise InputError("structured outputs need the model's tokenizer")
            request.grammar = self.grammars.compile(request.params.constraint)
        n = request.params.n
        if n > self.max_num_seqs:
            raise InputError(f"n={n} is more than this server runs at once ({self.max_num_seqs})")
        if request.row is not None and n != 1:
            raise InputError("a request that continues a cache row takes n=1")
        start = self.row_length(request.row) if request.row is not None else 0
        needed = start + len(request.prompt) + request.params.max_tokens
        most = self.cache.n_blocks * self.cache.block_size
        if min(needed, self.cache.slots + self.chunk_size) > most:
            raise InputError(f"{needed} tokens need more KV cache than it has ({most} slots): "
                             f"raise --kv-cache-gb or lower max_tokens")
        if self.max_model_len is not None and needed > self.max_model_len:
            raise InputError(f"this model's maximum context length is {self.max_model_len} tokens, but "
                             f"{start + len(request.prompt)} prompt tokens + {request.params.max_tokens} "
                             f"max_tokens = {needed} were requested")

    def abort(self, request_id: str) -> None:
        """Drop a request wherever it is (the client went away); its rows are freed at once."""
        self.waiting = deque(r for r in self.waiting if r.request_id != request_id)
        self.preempted = deque(s for s in self.preempted if s.request.request_id != request_id)
        for seq in self.running:
            if seq.request.request_id == request_id:
                seq.finish_reason = "abort"
                self._release(seq)
        self.running = [s for s in self.running if not s.finished]

    # -- reserved rows: a caller that continues one sequence across requests (chat) ----------
    def reserve_row(self) -> int:
        """Take a cache row out of the pool; requests with `row=` continue what it holds."""
        if not self.free_rows:
            raise QueueFull("no free cache row")
        return self.free_rows.pop(0)

    def release_row(self, row: int) -> None:
        """Forget a row and give it back to the pool (a reserved row once its caller is done)."""
        self.reset(row)
        self.free_rows.append(row)

    def reset(self, row: int) -> None:
        """Forget what a reserved row holds (a new conversation in the same row)."""
        self.cache.reset([row])

    def rewind(self, row: int, keep: int) -> bool:
        """Cut a reserved row back to its first `keep` tokens (to re-feed a changed tail). False when
        the rolling buffer has already evicted keys that needs: `reset` and re-feed then."""
        return self.cache.truncate(row, keep)

    def row_length(self, row: int) -> int:
        """How many tokens a row holds (its next position)."""
        return self.cache.lengths[row]

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.preempted)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len({s.request.request_id for s in self.preempted})

    @property
    def num_running(self) -> int:
        return len({s.request.request_id for s in self.running})

    @property
    def kv_usage(self) -> float:
        """Fraction of the cache's blocks held by sequences."""
        return self.cache.used_blocks / self.cache.n_blocks

    @property
    def cache_dtype(self) -> torch.dtype:
        """The KV cache's element type (the model's `cache_dtype` when the engine was made)."""
        return self.cache.k.dtype

    # -- one iteration ------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[SequenceOutput]:
        """Run one packed forward over the scheduled work; return what each sequence produced."""
        self._admit()
        batch = self._schedule()
        if not batch:
            return []
        pieces = [s.context[s.prefilled:s.prefilled + n] if s.prefilling else s.tokens[-1:] + s.drafts
                  for s, n in batch]
        seqlens = [len(p) for p in pieces]
        ends = torch.tensor(seqlens).cumsum(0).tolist()
        # Logits are needed at every position of a chunk whose prompt logprobs were asked for and of
        # a decode piece with guesses, else only at the last position of each piece.
        wanted = [torch.arange(e - n, e) if (s.prefilling and not s.tokens and s.params.prompt_logprobs is not None)
                  or (not s.prefilling and s.drafts) else torch.tensor([e - 1]) for (s, n), e in zip(batch, ends)]
        device = self.model.device
        logits = self.model(torch.tensor(sum(pieces, []), device=device), seqlens, self.cache,
                            rows=[s.row for s, _ in batch], output_rows=torch.cat(wanted).to(device))
        if self.prefix_caching:
            self._publish([s for s, _ in batch if s.request.row is None])
        outputs = self._process(batch, logits.split([len(w) for w in wanted]))
        self.running = [s for s in self.running if not s.finished]
        return outputs

    def _publish(self, seqs: list[Sequence]) -> None:
        """File each sequence's newly filled blocks in the prefix cache."""
        size = self.cache.block_size
        for seq in seqs:
            if self.cache.lengths[seq.row] // size > len(seq.block_hashes):
                first = len(seq.block_hashes)
                extend_hashes(seq.block_hashes, seq.context[:self.cache.lengths[seq.row]], size)
                for b in range(first, len(seq.block_hashes)):
                    self.cache.publish(seq.row, b, seq.block_hashes[b])

    def _admit(self) -> None:
        """Give rows to preempted sequences, then to waiting requests (FIFO), while rows are free and
        the blocks their context still needs fit what is free."""
        while self.preempted and self.free_rows:
            seq = self.preempted[0]
            if not self._fits(seq.context[:seq.prefill_end]):
                return
            self.preempted.popleft()
            self._start(seq)
        while self.waiting and not self.preempted:
            request = self.waiting[0]
            if request.row is None and (len(self.free_rows) < request.params.n or not self._fits(request.prompt)):
                return
            self.waiting.popleft()
            stop_ids = frozenset(request.params.stop_token_ids) | (
                frozenset() if request.params.ignore_eos or self.tokenizer is None else frozenset(self.tokenizer.stop_ids))
            for i in range(request.params.n):
                decoder = self.tokenizer.stream_decoder() if self.tokenizer is not None else None
                self._start(Sequence(request, i, decoder, stop_ids))
            self.prompt_tokens_total += len(request.prompt)

    def _fits(self, tokens: list[int]) -> bool:
        """Whether the free blocks hold a new sequence's first chunk of these tokens (an empty pool
        always does: `validate` refuses what could never fit)."""
        first_chunk = min(len(tokens), self.chunk_size, self.cache.slots)
        return self.cache.free_blocks >= -(-first_chunk // self.cache.block_size)

    def _start(self, seq: Sequence) -> None:
        """Give a sequence its row, starting on the longest cached prefix of its context."""
        if seq.request.row is not None:
            seq.row = seq.request.row
            self.running.append(seq)
            return
        seq.row = self.free_rows.pop(0)
        seq.prefilled, seq.block_hashes = 0, []
        # Prompt log-probabilities need the logits of every prompt position: no prefix for those.
        if self.prefix_caching and (seq.params.prompt_logprobs is None or seq.tokens):
            # Leave at least one token to feed: its logits give the next token.
            hashes = extend_hashes([], seq.context[:seq.prefill_end - 1], self.cache.block_size)
            first, blocks = self.cache.lookup(hashes)
            if blocks:
                seq.prefilled = self.cache.attach(seq.row, first, blocks)
                seq.block_hashes = hashes[:first + len(blocks)]
            if not seq.preempted:  # a first admission, not a preempted one coming back
                seq.cached_tokens = seq.prefilled
                self.prefix_queries_total += len(seq.prompt)
                self.prefix_hits_total += seq.prefilled
        self.running.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        """Take a running sequence's row and blocks (its published blocks stay cached): it comes back
        when blocks are free and re-feeds its context."""
        self.release_row(seq.row)
        seq.row, seq.preempted = None, True
        self.running.remove(seq)
        self.preempted.appendleft(seq)
        self.preemptions_total += 1

    def _schedule(self) -> list[tuple[Sequence, int]]:
        """Decodes first (one token each), then prompt chunks within the step's token budget and the
        free blocks. When the decodes alone need more blocks than are free, the newest sequences are
        preempted until they fit."""
        cache = self.cache
        while True:
            decoding = [s for s in self.running if not s.prefilling]
            if sum(cache.blocks_needed(s.row, 1) for s in decoding) <= cache.free_blocks:
                break
            victim = next((s for s in reversed(self.running) if s.request.row is None), None)
            if victim is None:  # only reserved rows: the forward's CacheFull says so
                break
            self._preempt(victim)
        free = cache.free_blocks - sum(cache.blocks_needed(s.row, 1) for s in decoding)
        for seq in decoding:
            seq.drafts = []
        if self.speculative is not None and 0 < len(decoding) <= self.speculative.max_batch:
            free = self._propose(decoding, free)
        batch = [(s, 1 + len(s.drafts)) for s in decoding]
        budget = self.max_tokens_per_step - sum(n for _, n in batch)
        for seq in self.running:
            if seq.prefilling and budget > 0:
                held_end = (cache.first[seq.row] + cache.held_blocks(seq.row) + free) * cache.block_size
                n = min(self.chunk_size, seq.prefill_end - seq.prefilled, budget, held_end - cache.lengths[seq.row])
                if n <= 0:
                    continue
                batch.append((seq, n))
                budget -= n
                free -= cache.blocks_needed(seq.row, n)
        victim = next((s for s in reversed(self.running) if s.request.row is None), None)
        if not batch and len(self.running) > 1 and victim:  # all pre-filling, no block left to grow into
            self._preempt(victim)
            return self._schedule()
        if len(batch) == 1 and batch[0][0].prefilling:  # a lone prompt: the runner may cut it finer
            seq, n = batch[0]
            batch = [(seq, self.model.preferred_chunk(self.cache, seq.row, n) or n)]
        return batch

    def _propose(self, decoding: list[Sequence], free: int) -> int:
        """Guess tokens for the decoding sequences that can use them (`seq.drafts`), within their
        max_tokens, the context and the free blocks; -> the blocks still free."""
        jobs = []
        for seq in decoding:
            p = seq.params
            if seq.matcher is not None or p.penalized or not seq.backoff.ready():
                continue
            # Every guess accepted still leaves room for the model's own token after them.
            # A piece longer than the window would cache only its last W positions: guesses stay within it.
            room = min(self.speculative.num_tokens, p.max_tokens - len(seq.tokens) - 1, self.cache.slots - 1)
            if self.max_model_len is not None:
                room = min(room, self.max_model_len - self.cache.lengths[seq.row] - 2)
            room = min(room, self._room_in_blocks(seq, free))
            if room > 0:
                jobs.append((seq, room))
        guesses = self._proposer.propose([(s.row, s.context, room) for s, room in jobs])
        for (seq, _), drafts in zip(jobs, guesses):
            extra = self.cache.blocks_needed(seq.row, 1 + len(drafts)) - self.cache.blocks_needed(seq.row, 1)
            if drafts and extra <= free:
                seq.drafts, free = drafts, free - extra
        return free

    def _room_in_blocks(self, seq: Sequence, free: int) -> int:
        """How many guesses beyond its newest token the free blocks leave a sequence room for."""
        size = self.cache.block_size
        held_end = (self.cache.first[seq.row] + self.cache.held_blocks(seq.row) + free) * size
        return held_end - self.cache.lengths[seq.row] - 1

    def _process(self, batch: list[tuple[Sequence, int]], logits: tuple[torch.Tensor, ...]) -> list[SequenceOutput]:
        outputs: list[SequenceOutput] = []
        to_sample: list[tuple[Sequence, torch.Tensor]] = []
        for (seq, n), rows in zip(batch, logits):
            if not seq.prefilling and seq.drafts:  # the newest token and guesses: keep what the model agrees with
                outputs.append(self._verify(seq, rows))
                continue
            if not seq.prefilling:  # a decode step fed the newest token
                seq.prefilled += 1
                to_sample.append((seq, rows[-1]))
                continue
            if seq.params.prompt_logprobs is not None and not seq.tokens:
                targets = seq.prompt[seq.prefilled + 1:seq.prefilled + n + 1]
                seq.prompt_logprobs += _logprobs(rows, targets, [seq.params.prompt_logprobs] * len(targets))
            seq.prefilled += n
            if seq.prefilling or seq.tokens:  # more to feed, or a preempted context re-fed: decode next
                continue
            if seq.params.max_tokens == 0:
                seq.finish_reason = "length"
                self._release(seq)
                outputs.append(self._output(seq, [], "", []))
            else:
                to_sample.append((seq, rows[-1]))
        if to_sample:
            outputs += self._sample([s for s, _ in to_sample], torch.stack([r for _, r in to_sample]))
        return outputs

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[SequenceOutput]:
        """logits [B, vocab] -> one new token per sequence, with stop and length checks."""
        apply_logit_bias(logits, [seq.params.logit_bias for seq in seqs])
        mask_logits(logits, [seq.matcher for seq in seqs])  # structured outputs
        tokens = greedy(logits).tolist()  # greedy rows need nothing else
        failures: dict[int, str] = {}
        for i, seq in enumerate(seqs):
            if seq.params.greedy and not seq.params.penalized:
                continue
            try:
                tokens[i] = _draw(seq, logits[i])
            except Exception as e:  # a bug one request's parameters hit must not end the whole batch
                log.exception("sampling failed for %s", seq.request.request_id)
                failures[i] = f"sampling failed: {e}"
        # Log-probabilities only for the sequences that asked (a log-softmax over the vocabulary each).
        asked = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None and i not in failures]
        entries: list[list[TokenLogprob]] = [[] for _ in seqs]
        if asked:
            scored = _logprobs(logits[asked], [tokens[i] for i in asked], [seqs[i].params.logprobs for i in asked])
            for i, entry in zip(asked, scored):
                entries[i] = [entry]
        outputs = []
        for i, (seq, token, entry) in enumerate(zip(seqs, tokens, entries)):
            if seq.matcher is not None and i not in failures and not seq.matcher.consume_token(token):
                failures[i] = f"the output's grammar rejected token {token}: {seq.matcher.get_error()}"
            if i in failures:
                outputs.append(self._fail(seq, failures[i]))
                continue
            outputs.append(self._emit(seq, [token], entry))
        return outputs

    def _verify(self, seq: Sequence, rows: torch.Tensor) -> SequenceOutput:
        """rows [1 + guesses, vocab]: the logits after the newest token and after each guess -> emit the
        guesses the model agrees with and its own next token; the rejected guesses leave the cache."""
        drafts = seq.drafts
        apply_logit_bias(rows, [seq.params.logit_bias] * len(rows))
        try:
            tokens = verify(rows, drafts, seq.params, seq.generator)
        except Exception as e:  # as in _sample: one request's failure ends it alone
            log.exception("sampling failed for %s", seq.request.request_id)
            return self._fail(seq, f"sampling failed: {e}")
        accepted = len(tokens) - 1  # the last is the model's own
        self.cache.truncate(seq.row, self.cache.lengths[seq.row] - (len(drafts) - accepted))
        seq.prefilled += 1 + accepted
        seq.backoff.record(accepted)
        self.spec_steps_total += 1
        self.spec_proposed_total += len(drafts)
        self.spec_accepted_total += accepted
        entries = []
        if seq.params.logprobs is not None:
            entries = _logprobs(rows, tokens, [seq.params.logprobs] * len(tokens))
        return self._emit(seq, tokens, entries)

    def _emit(self, seq: Sequence, tokens: list[int], entries: list[TokenLogprob]) -> SequenceOutput:
        """Append a step's tokens to a sequence, one at a time, with stop and length checks (the first
        that ends it drops the rest); -> what the step produced for it."""
        # The cache holds the context but its newest token: as if the tokens had come one per step.
        held = self.cache.lengths[seq.row] - len(tokens) + 1
        text, emitted = "", 0
        for token in tokens:
            seq.tokens.append(token)
            emitted += 1
            self.generation_tokens_total += 1
            if token in seq.stop_ids:
                seq.finish_reason = "stop"
            elif seq.decoder is not None:
                text += seq.stops.push(seq.decoder.push(token))
                if seq.stops.stopped:
                    seq.finish_reason = "stop"
            if seq.finish_reason is None and seq.matcher is not None and seq.matcher.is_stopped():
                seq.finish_reason = "stop"  # the grammar is complete: nothing may follow
            full = self.max_model_len is not None and held + emitted >= self.max_model_len
            if seq.finish_reason is None and (len(seq.tokens) >= seq.params.max_tokens or full):
                seq.finish_reason = "length"
            if seq.finished:
                break
        if seq.finished:
            if seq.decoder is not None and not seq.stops.stopped:
                text += seq.stops.push(seq.decoder.flush()) + seq.stops.flush()
            if emitted < len(tokens):  # ended inside a run of accepted guesses: a kept row holds no more
                self.cache.truncate(seq.row, held + emitted - 1)
            self._release(seq)
        seq.text += text
        return self._output(seq, tokens[:emitted], text, entries[:emitted])

    def _fail(self, seq: Sequence, error: str) -> SequenceOutput:
        """End one sequence with an error (its request fails, the batch goes on)."""
        seq.finish_reason = "error"
        self._release(seq)
        output = self._output(seq, [], "", [])
        output.error = error
        return output

    def _release(self, seq: Sequence) -> None:
        if seq.request.row is None and seq.row is not None:
            self.release_row(seq.row)
            seq.row = None

    def _output(self, seq: Sequence, tokens: list[int], text: str, logprobs: list[TokenLogprob]) -> SequenceOutput:
        first = len(seq.tokens) <= 1  # the step that finished the prompt
        return SequenceOutput(
            request_id=seq.request.request_id, index=seq.index, new_tokens=tokens, new_text=text,
            new_logprobs=logprobs, finish_reason=seq.finish_reason,
            prompt_logprobs=seq.prompt_logprobs if first and seq.params.prompt_logprobs is not None else None,
            arrival=seq.request.arrival, cached_tokens=seq.cached_tokens)


def _draw(seq: Sequence, logits: torch.Tensor) -> int:
    """logits [vocab] of one sequence -> its token under its penalties and sampling parameters."""
    p = seq.params
    row = apply_penalties(logits, p, seq.prompt, seq.tokens) if p.penalized else logits
    return int(sample(row[None], temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p,
                      generator=seq.generator)[0])


def _logprobs(logits: torch.Tensor, targets: list[int], ks: list[int]) -> list[TokenLogprob]:
    """logits [>= N, vocab], targets [N] -> each target's log-probability and its row's top ks[i]."""
    if not targets:
        return []
    log_probs = torch.log_softmax(logits[:len(targets)], dim=-1)
    chosen = log_probs.gather(1, torch.tensor(targets, device=logits.device)[:, None])  # [N, 1]
    ranks = ((log_probs > chosen).sum(dim=1) + 1).tolist()
    top = torch.topk(log_probs, max(ks), dim=-1) if max(ks) else None
    entries = []
    for i, (token, lp, k, rank) in enumerate(zip(targets, chosen.squeeze(1).tolist(), ks, ranks)):
        alternatives = list(zip(top.indices[i, :k].tolist(), top.values[i, :k].tolist())) if k else []
        entries.append(TokenLogprob(token, lp, alternatives, rank))
    return entries
