"""The continuous-batching engine on a tiny windowed model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import mistral7b
from mistral7b.engine import Engine, QueueFull, Request
from mistral7b.errors import InputError
from mistral7b.sampling import SamplingParams, SamplingError, apply_penalties, sample


def prompt(n: int, seed: int, vocab: int = 128) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(engine: Engine, requests: list[Request]) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    for r in requests:
        engine.add_request(r)
    while engine.has_work:
        for out in engine.step():
            tokens[out.request_id] += out.new_tokens
    return tokens


def test_greedy_output_is_batch_invariant(tiny_model):
    greedy = SamplingParams(max_tokens=24)
    alone = Request(prompt(9, 0), greedy)
    solo = run(Engine(tiny_model, max_num_seqs=1), [alone])[alone.request_id]
    crowd = [Request(prompt(3 + i % 13, 100 + i), greedy) for i in range(31)]
    mixed = [*crowd[:15], Request(list(alone.prompt), greedy), *crowd[15:]]
    out = run(Engine(tiny_model, max_num_seqs=32, max_tokens_per_step=40, chunk_size=3), mixed)
    assert out[mixed[15].request_id] == solo
    assert solo == mistral7b.generate([alone.prompt], tiny_model, max_tokens=24)[0][0]


def test_long_prompt_is_chunked_within_the_step_budget(tiny_model):
    engine = Engine(tiny_model, max_num_seqs=4, max_tokens_per_step=8, chunk_size=5)
    running = [engine.add_request(Request(prompt(3, i), SamplingParams(max_tokens=40))) for i in range(3)]
    while any(s.prefilling for s in engine.running) or engine.waiting:
        engine.step()  # the three short prompts are in (9 tokens: two steps of at most 8)
    engine.add_request(Request(prompt(60, 9), SamplingParams(max_tokens=2)))
    steps = 0
    while engine.waiting or any(s.prefilling for s in engine.running):
        scheduled = engine._schedule()
        assert sum(n for _, n in scheduled) <= 8
        decoding = {s.request.request_id for s, n in scheduled if not s.prefilling}
        assert decoding == {r.request_id for r in running}  # running streams advance every step
        engine.step()
        steps += 1
    assert steps >= 60 // 5


def test_rows_are_freed_and_requests_wait_fifo(tiny_model):
    engine = Engine(tiny_model, max_num_seqs=2, max_queue=5)
    reqs = [engine.add_request(Request(prompt(4, i), SamplingParams(max_tokens=3 + i))) for i in range(5)]
    with pytest.raises(QueueFull):
        engine.add_request(Request(prompt(4, 9), SamplingParams(max_tokens=1)))
    finished_order = []
    while engine.has_work:
        assert len(engine.running) <= 2
        finished_order += [o.request_id for o in engine.step() if o.finish_reason]
    assert finished_order == [r.request_id for r in reqs]
    assert sorted(engine.free_rows) == [0, 1] and engine.cache.used_blocks == 0


def test_windowed_model_serves_far_past_the_window_at_constant_memory(tiny_model):
    w = tiny_model.args.sliding_window
    engine = Engine(tiny_model, max_num_seqs=2)
    size = engine.cache.k.numel()
    r = Request(prompt(5, 1), SamplingParams(max_tokens=50 * w, ignore_eos=True))
    out = run(engine, [r])
    assert len(out[r.request_id]) == 50 * w
    assert engine.cache.k.numel() == size and engine.cache.slots == w


def test_reserved_row_continues_rewinds_and_resets(tiny_model):
    """A chat's row: kept across requests, cut back while the window still holds what that needs."""
    engine = Engine(tiny_model, max_num_seqs=1)
    row = engine.reserve_row()
    with pytest.raises(QueueFull):
        engine.reserve_row()
    start, tail = prompt(2, 1), prompt(1, 2)
    run(engine, [Request(list(start), SamplingParams(max_tokens=2), row=row)])
    assert engine.row_length(row) == 3  # the prompt and the first sampled token (the last is never fed)
    assert engine.rewind(row, 2) and engine.row_length(row) == 2
    # Long enough that the window leaves position 1's block behind (blocks of DEFAULT_BLOCK_SIZE).
    continued = Request(list(tail), SamplingParams(max_tokens=40, ignore_eos=True), row=row)
    fresh = Request(start + tail, SamplingParams(max_tokens=40, ignore_eos=True))
    assert run(engine, [continued])[continued.request_id] == run(Engine(tiny_model), [fresh])[fresh.request_id]
    assert engine.row_length(row) > tiny_model.args.sliding_window
    assert not engine.rewind(row, 1)  # the window's blocks no longer hold position 0's keys
    engine.reset(row)
    assert engine.row_length(row) == 0
    engine.release_row(row)
    assert engine.free_rows == [0] and engine.cache_dtype == torch.float32


def test_n_seeds_stops_and_abort(tiny_model):
    engine = Engine(tiny_model, max_num_seqs=8)
    params = SamplingParams(max_tokens=12, temperature=1.0, n=3, seed=5)

    def choices(request: Request) -> dict[int, list[int]]:
        outs: dict[int, list[int]] = {}
        engine.add_request(request)
        while engine.has_work:
            for o in engine.step():
                outs.setdefault(o.index, []).extend(o.new_tokens)
        return outs

    first = choices(Request(prompt(6, 2), params))
    assert len(first) == 3 and len({tuple(v) for v in first.values()}) > 1  # the n samples differ
    assert choices(Request(prompt(6, 2), params)) == first  # and reproduce with the same seed
    # A stop token ends the sequence with that token.
    greedy = run(engine, [g := Request(prompt(6, 3), SamplingParams(max_tokens=20))])[g.request_id]
    stop = greedy[5]
    stopped = run(engine, [s := Request(prompt(6, 3), SamplingParams(max_tokens=20, stop_token_ids=(stop,)))])
    assert stopped[s.request_id] == greedy[:greedy.index(stop) + 1]
    # Abort frees the rows at once.
    engine.add_request(long := Request(prompt(6, 4), SamplingParams(max_tokens=500, n=2)))
    engine.step()
    assert len(engine.free_rows) == 6
    engine.abort(long.request_id)
    assert len(engine.free_rows) == 8 and not engine.has_work


def test_prompt_longer_than_context_is_refused_with_both_numbers():
    args = mistral7b.ModelArgs(dim=32, n_layers=1, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2,
                               norm_eps=1e-5, vocab_size=50, max_seq_len=64)
    engine = Engine(mistral7b.Transformer(args), max_num_seqs=2)
    with pytest.raises(InputError, match="maximum context length is 64.*60 prompt tokens.*10 max_tokens"):
        engine.add_request(Request([1] * 60, SamplingParams(max_tokens=10)))


def test_penalties_and_min_p():
    logits = torch.tensor([2.0, 1.0, -1.0, 0.5])
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    out = apply_penalties(logits, p, prompt=[3], output=[0, 0, 2])
    # token 0: seen twice in the output -> 2 - 0.25*2 - 0.5 = 1.0, then /2 (positive) = 0.5
    # token 2: once -> -1 - 0.25 - 0.5 = -1.75, then *2 (negative) = -3.5
    # token 3: only in the prompt -> repetition only: 0.5 / 2 = 0.25
    assert out.tolist() == pytest.approx([0.5, 1.0, -3.5, 0.25])
    probs_logits = torch.log(torch.tensor([[0.6, 0.3, 0.08, 0.02]]))
    g = torch.Generator().manual_seed(0)
    seen = {sample(probs_logits, temperature=1.0, min_p=0.2, generator=g).item() for _ in range(300)}
    assert seen == {0, 1}
    with pytest.raises(SamplingError) as e:
        SamplingParams(min_p=2.0)
    assert e.value.param == "min_p"


def test_logprobs_only_when_asked_and_they_match_a_log_softmax(tiny_model):
    engine = Engine(tiny_model, max_num_seqs=2)
    plain, scored = Request(prompt(5, 7), SamplingParams(max_tokens=4)), Request(prompt(5, 7), SamplingParams(max_tokens=4, logprobs=3))
    for r in (plain, scored):
        engine.add_request(r)
    outs = {plain.request_id: [], scored.request_id: []}
    while engine.has_work:
        for o in engine.step():
            outs[o.request_id].append(o)
    assert all(o.new_logprobs == [] for o in outs[plain.request_id])
    entries = [e for o in outs[scored.request_id] for e in o.new_logprobs]
    tokens = [t for o in outs[scored.request_id] for t in o.new_tokens]
    assert [e.token for e in entries] == tokens == [t for o in outs[plain.request_id] for t in o.new_tokens]
    with torch.inference_mode():  # the first generated token's entry against the prompt's last logits
        expected = torch.log_softmax(tiny_model(torch.tensor(scored.prompt), [5])[-1], dim=-1)
    assert entries[0].logprob == pytest.approx(expected[tokens[0]].item(), abs=1e-5)
    assert [t for t, _ in entries[0].top] == expected.topk(3).indices.tolist()


def test_greedy_picks_the_first_maximum_like_torch():
    from mistral7b.sampling import greedy
    logits = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0))
    logits[2, [10, 500]] = 100.0  # a tie: the first index wins, as torch.argmax
    assert greedy(logits).tolist() == logits.argmax(dim=-1).tolist()
    assert greedy(logits)[2] == 10


def _greedy_outputs(engine: Engine, prompts: list[list[int]], max_tokens: int = 12) -> list[list[int]]:
    """Greedy tokens of each prompt; the first arrives alone, the rest while it is still running."""
    requests = [Request(list(p), SamplingParams(max_tokens=max_tokens, ignore_eos=True)) for p in prompts]
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    engine.add_request(requests[0])
    for step in range(10_000):
        if step == 8:
            for r in requests[1:]:
                engine.add_request(r)
        if step > 8 and not engine.has_work:
            break
        for out in engine.step():
            tokens[out.request_id] += out.new_tokens
    return [tokens[r.request_id] for r in requests]


@pytest.mark.parametrize("window", [4, None])
def test_prefix_cache_and_preemption_give_the_plain_engines_tokens(window):
    """Prompts sharing prefixes (one still running when the next arrives), long runs past 3W, and a
    block budget so small that sequences get preempted: every sequence's greedy tokens equal those
    of an engine without prefix caching and with room for all; every block comes back."""
    from conftest import make_tiny_model

    model = make_tiny_model(sliding_window=window)
    shared = prompt(70, 7)
    prompts = [shared + prompt(3 + i, 20 + i) for i in range(6)] + [prompt(9, 40), shared[:40]]
    max_len = None if window else 128
    plain = _greedy_outputs(Engine(model, max_num_seqs=8, max_model_len=max_len, prefix_caching=False), prompts, 20)
    for n_blocks in (None, 8):  # 8 blocks of 32: far less than 8 sequences of ~90 tokens need
        engine = Engine(model, max_num_seqs=8, max_model_len=max_len, n_blocks=n_blocks,
                        max_tokens_per_step=64, chunk_size=16)
        assert _greedy_outputs(engine, prompts, 20) == plain
        assert engine.prefix_hits_total > 0 and engine.cache.used_blocks == 0
        # Windowed sequences hold at most ceil(W / BS) + 1 blocks: only full-attention ones outgrow the pool.
        assert (engine.preemptions_total > 0) == (n_blocks is not None and window is None)


def test_second_request_prefills_only_what_is_not_cached(tiny_model):
    engine = Engine(tiny_model, max_num_seqs=2)
    history = prompt(100, 3)
    first = Request(list(history), SamplingParams(max_tokens=2))
    run(engine, [first])
    follow_up = Request(history + prompt(5, 4), SamplingParams(max_tokens=2))
    engine.add_request(follow_up)
    outs = []
    while engine.has_work:
        outs += engine.step()
    # A windowed model (W = 4) needs only the last blocks before the new tokens: 96 of 100 cached.
    assert outs[0].cached_tokens == 96 and engine.prefix_hits_total == 96
    assert engine.prefix_queries_total == 205
    # Prompt log-probabilities need every position's logits: those requests take no prefix.
    scored = Request(list(history), SamplingParams(max_tokens=1, prompt_logprobs=0))
    engine.add_request(scored)
    outs = []
    while engine.has_work:
        outs += engine.step()
    assert outs[0].cached_tokens == 0 and len(outs[0].prompt_logprobs) == 100


def test_prompts_that_outgrow_the_pool_together_still_finish():
    """Eight long prompts admitted at once into a pool that holds two of them: pre-fills that run out
    of blocks give way (preemption) instead of waiting on each other forever."""
    from conftest import make_tiny_model

    model = make_tiny_model(sliding_window=None)
    prompts = [prompt(90, 60 + i) for i in range(8)]
    requests = [Request(list(p), SamplingParams(max_tokens=4, ignore_eos=True)) for p in prompts]
    # A step budget for all eight first chunks: the pool fills with first chunks, then no pre-fill can grow.
    engine = Engine(model, max_num_seqs=8, max_model_len=128, n_blocks=7, max_tokens_per_step=256, chunk_size=32)
    out = run(engine, requests)
    plain = Engine(model, max_num_seqs=8, max_model_len=128, prefix_caching=False)
    assert [out[r.request_id] for r in requests] == _greedy_outputs(plain, prompts, 4)
    assert engine.preemptions_total > 0 and engine.cache.used_blocks == 0


_POOL_CHECK = """
import os, sys, time, torch
from mistral7b.engine.threaded import in_passing_thread
torch.set_num_threads(2)
threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()
work = lambda: (torch.ones(256, 256) @ torch.ones(256, 256)).sum().item()  # a parallel region
assert (work() if sys.argv[1] == "main" else in_passing_thread(work)) == 256 ** 3
# An ended thread's OS thread, and its pool's workers, leave /proc a moment after join() returns.
deadline = time.monotonic() + (5 if sys.argv[1] == "passing" else 0.5)
while threads() > before and time.monotonic() < deadline:
    time.sleep(0.02)
print(before, threads())
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="counts threads in Linux's /proc")
def test_in_passing_thread_takes_its_openmp_workers_with_it():
    """The server loads its model with in_passing_thread so that the engine thread's OpenMP pool is the
    only one (libgomp stops spinning at barriers once pools outnumber the cores: decode at half speed).
    Work done through it leaves no worker threads behind; the same work on the calling thread does."""
    def counts(where: str) -> tuple[int, int]:
        out = subprocess.run([sys.executable, "-c", _POOL_CHECK, where], capture_output=True, text=True, check=True)
        before, after = map(int, out.stdout.split())
        return before, after

    before, after = counts("passing")
    assert after == before
    before, after = counts("main")  # the calling thread ran a parallel region too: its pool stays
    assert after > before


def test_in_passing_thread_returns_and_raises():
    from mistral7b.engine.threaded import in_passing_thread

    assert in_passing_thread(lambda: 42) == 42
    with pytest.raises(InputError, match="bad flag"):
        in_passing_thread(lambda: (_ for _ in ()).throw(InputError("bad flag")))
