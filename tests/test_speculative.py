"""Speculative decoding (prompt lookup): the same greedy tokens as plain decoding, the same distribution
when sampling, and a cache left as plain decoding leaves it."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

import mistral7b
from conftest import make_tiny_model
from mistral7b.engine import Engine, Request
from mistral7b.sampling import SamplingParams
from mistral7b.speculative import Backoff, SpeculativeConfig, propose_ngram, verify

NGRAM = SpeculativeConfig(num_tokens=5, ngram_min=1, ngram_max=3)


def run(model, prompts, params, speculative=None, tokenizer=None, rows=False):
    """-> (each prompt's generated tokens, the engine). A small vocabulary repeats itself, so guesses come."""
    engine = Engine(model, tokenizer, max_num_seqs=len(prompts), max_model_len=None if model.args.sliding_window
                    else 1024, speculative=speculative, prefix_caching=False)
    reserved = [engine.reserve_row() for _ in prompts] if rows else [None] * len(prompts)
    requests = [engine.add_request(Request(list(p), params, row=r)) for p, r in zip(prompts, reserved)]
    out = {r.request_id: [] for r in requests}
    while engine.has_work:
        for o in engine.step():
            out[o.request_id] += o.new_tokens
    return [out[r.request_id] for r in requests], engine


def prompts_for(vocab: int, lengths=(5, 11, 19)):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def test_propose_ngram():
    assert propose_ngram([1, 2, 3, 4, 9, 1, 2, 3], 3, 1, 3) == [4, 9, 1]  # the 3-gram [1, 2, 3] seen before
    assert propose_ngram([5, 6, 7, 5, 6, 8, 5, 6], 2, 2, 2) == [8, 5]  # the latest occurrence wins
    assert propose_ngram([1, 2, 3, 4], 4, 1, 3) == []
    assert propose_ngram([7, 7], 3, 1, 1) == [7]


@pytest.mark.parametrize("window, k", [(4, 1), (4, 5), (8, 3), (None, 6)])
def test_greedy_equals_plain_decoding_past_the_window(window, k):
    """Mixed lengths in one batch, generating past 3W through the rolling window."""
    model = make_tiny_model(vocab_size=16, sliding_window=window)
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    plain, _ = run(model, prompts_for(16), params)
    spec, engine = run(model, prompts_for(16), params, SpeculativeConfig(num_tokens=k, ngram_min=1, ngram_max=3))
    assert spec == plain
    assert engine.spec_accepted_total > 0 and engine.spec_proposed_total > engine.spec_accepted_total
    assert engine.cache.used_blocks == 0


def test_stops_and_max_tokens_inside_an_accepted_run():
    model = make_tiny_model(vocab_size=16, sliding_window=4)
    for params in (SamplingParams(max_tokens=n, ignore_eos=True) for n in (1, 2, 7, 13, 23)):
        assert run(model, prompts_for(16), params, NGRAM)[0] == run(model, prompts_for(16), params)[0]
    plain, _ = run(model, prompts_for(16), SamplingParams(max_tokens=40, ignore_eos=True))
    stop = plain[1][9]  # a token the second sequence emits mid-run
    params = SamplingParams(max_tokens=40, ignore_eos=True, stop_token_ids=(stop,))
    assert run(model, prompts_for(16), params, NGRAM)[0] == run(model, prompts_for(16), params)[0]


def test_stop_strings_on_the_default_model():
    model, tokenizer = mistral7b.load(None, quantize="int4"), mistral7b.load_tokenizer(None)
    text = "one two three four five six seven eight nine ten " * 3
    prompt = tokenizer.encode_chat([{"role": "user", "content": f"Repeat exactly: {text}"}])
    for stop in ((), ("ten one",), ("seven",)):
        params = SamplingParams(max_tokens=30, stop=stop)
        plain, a = run(model, [prompt], params, tokenizer=tokenizer, rows=True)
        spec, b = run(model, [prompt], params, NGRAM, tokenizer=tokenizer, rows=True)
        assert spec == plain
        assert a.cache.lengths == b.cache.lengths  # a stop inside a run of accepted guesses cuts the run
    assert b.spec_accepted_total > 0


def test_rollback_leaves_the_cache_as_plain_decoding_does():
    """Reserved rows keep their cache after the request: the positions held and their keys/values."""
    model = make_tiny_model(vocab_size=16, sliding_window=8)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    (plain, a), (spec, b) = (run(model, prompts_for(16), params, s, rows=True) for s in (None, NGRAM))
    assert spec == plain and b.spec_accepted_total > 0
    assert_same_cache(a, b)


def assert_same_cache(a: Engine, b: Engine) -> None:
    for row in range(3):
        assert a.cache.lengths[row] == b.cache.lengths[row]
        length, first = a.cache.lengths[row], max(0, a.cache.lengths[row] - 8)  # the window's positions
        for pos in range(first, length):
            sa, sb = a.cache._flat_slot(row, pos), b.cache._flat_slot(row, pos)
            ka, kb = a.cache.k.flatten(1, 2)[:, sa], b.cache.k.flatten(1, 2)[:, sb]
            torch.testing.assert_close(kb, ka, atol=1e-5, rtol=1e-5)


def test_rejection_sampling_keeps_the_distribution():
    """The first emitted token is distributed as p0, and after an accepted guess the next as p1
    (chi-square against the exact probabilities)."""
    vocab, trials = 6, 4000
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 0.3], [0.1, 1.5, -0.5, 0.7, 0.0, 1.0], [0.0] * 6])
    probs = torch.softmax(logits, -1)
    params = SamplingParams(temperature=1.0)
    g = torch.Generator().manual_seed(0)
    first, second = torch.zeros(vocab), torch.zeros(vocab)
    for _ in range(trials):
        out = verify(logits, [1, 3], params, g)
        first[out[0]] += 1
        if out[0] == 1:
            second[out[1]] += 1
    assert chisquare(first, probs[0] * trials).pvalue > 1e-3
    assert chisquare(second, probs[1] * second.sum()).pvalue > 1e-3
    # top-k: the guess outside the top 2 is never kept, and the draw stays inside them.
    params = SamplingParams(temperature=1.0, top_k=2)
    assert all(verify(logits, [4], params, g)[0] in (0, 1) for _ in range(200))


def test_sampled_outputs_keep_their_distribution_in_the_engine():
    """Whole sequences of a tiny model, plain vs speculative: the frequencies of their first three
    generated tokens agree (chi-square on the outcomes seen often enough)."""
    model = make_tiny_model(vocab_size=4, sliding_window=4)
    prompt = [1, 2, 1, 2, 1, 2, 1]
    counts = []
    for spec in (None, SpeculativeConfig(num_tokens=3, ngram_min=1, ngram_max=2, max_batch=32)):
        tally: dict[tuple, int] = {}
        engine = None
        for rep in range(20):
            params = SamplingParams(max_tokens=3, temperature=1.0, seed=1000 * rep + 7, n=32, ignore_eos=True)
            engine = Engine(model, None, max_num_seqs=32, speculative=spec, prefix_caching=False)
            engine.add_request(Request(list(prompt), params))
            out: dict[int, list[int]] = {}
            while engine.has_work:
                for o in engine.step():
                    out.setdefault(o.index, []).extend(o.new_tokens)
            for tokens in out.values():
                tally[tuple(tokens)] = tally.get(tuple(tokens), 0) + 1
        counts.append(tally)
    assert engine.spec_proposed_total > 0
    keys = [k for k in counts[0] if counts[0][k] >= 15]
    observed = torch.tensor([counts[1].get(k, 0) for k in keys], dtype=torch.float64)
    expected = torch.tensor([counts[0][k] for k in keys], dtype=torch.float64)
    expected *= observed.sum() / expected.sum()
    assert chisquare(observed, expected).pvalue > 1e-3


def test_backoff_waits_longer_after_each_rejection():
    b = Backoff()
    waits = []
    for _ in range(4):
        b.record(0)
        skipped = 0
        while not b.ready():
            skipped += 1
        waits.append(skipped)
    b.record(2)
    assert waits == [1, 2, 4, 8] and b.ready()


def test_bad_configs():
    for kwargs in (dict(num_tokens=0), dict(ngram_min=3, ngram_max=2), dict(method="draft")):
        with pytest.raises(ValueError):
            SpeculativeConfig(**kwargs)


@pytest.mark.parametrize("window", [4, None])
def test_draft_model_greedy_equals_plain_decoding(window):
    """A draft model's guesses: the target's own weights are always right; another model's guesses
    still leave the target's output unchanged."""
    model = make_tiny_model(vocab_size=16, sliding_window=window)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    plain, _ = run(model, prompts_for(16), params)
    same, engine = run(model, prompts_for(16), params, SpeculativeConfig("draft", num_tokens=3, draft_model=model))
    assert same == plain and engine.spec_accepted_total == engine.spec_proposed_total > 0
    torch.manual_seed(5)
    other = make_tiny_model(vocab_size=16, sliding_window=window, n_layers=1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    spec, engine = run(model, prompts_for(16), params, SpeculativeConfig("draft", num_tokens=4, draft_model=other))
    assert spec == plain and engine.spec_proposed_total > engine.spec_accepted_total


def test_draft_model_needs_the_same_vocabulary():
    with pytest.raises(ValueError, match="vocabulary"):
        Engine(make_tiny_model(vocab_size=16), None, max_num_seqs=1,
               speculative=SpeculativeConfig("draft", draft_model=make_tiny_model(vocab_size=32)))
