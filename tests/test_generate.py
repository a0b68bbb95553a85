"""The library's `generate`: tokens, logprobs, EOS, sampling, chunking and bad input."""

from __future__ import annotations

import pytest
import torch

import mistral7b
from mistral7b.errors import InputError


def prompts_for(model, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.args.vocab_size, (n,), generator=g).tolist() for n in lengths]


def test_max_tokens_zero_scores_the_text(tiny_model):
    (prompt,) = prompts_for(tiny_model, [17])
    tokens, logprobs = mistral7b.generate([prompt], tiny_model, max_tokens=0)
    assert tokens == [[]]
    expected = torch.log_softmax(tiny_model(torch.tensor(prompt), [17]), -1)[:-1].gather(
        1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(logprobs[0]), expected, atol=1e-5)


def test_logprobs_cover_prompt_and_generated_tokens(tiny_model):
    prompts = prompts_for(tiny_model, [5, 11, 2])
    tokens, logprobs = mistral7b.generate(prompts, tiny_model, max_tokens=7, chunk_size=3)
    for prompt, toks, lps in zip(prompts, tokens, logprobs):
        assert len(toks) == 7 and len(lps) == len(prompt) - 1 + 7
        full = torch.tensor(prompt + toks)
        ref = torch.log_softmax(tiny_model(full, [len(full)]), -1)[:-1].gather(1, full[1:, None]).squeeze(1)
        assert torch.allclose(torch.tensor(lps), ref, atol=1e-4)


def test_batch_equals_solo_and_chunk_size_does_not_matter(tiny_model):
    prompts = prompts_for(tiny_model, [3, 14, 9, 1], seed=4)
    batch, _ = mistral7b.generate(prompts, tiny_model, max_tokens=20)
    for prompt, toks in zip(prompts, batch):
        for chunk in (1, 5, None):
            solo, _ = mistral7b.generate([prompt], tiny_model, max_tokens=20, chunk_size=chunk)
            assert solo[0] == toks


def test_generation_stops_at_eos(tiny_model):
    prompts = prompts_for(tiny_model, [6, 6], seed=2)
    free, _ = mistral7b.generate(prompts, tiny_model, max_tokens=15)
    eos = free[0][4]  # pretend the 5th greedy token of prompt 0 is EOS
    tokens, logprobs = mistral7b.generate(prompts, tiny_model, max_tokens=15, eos_id=eos)
    cut = free[0].index(eos) + 1
    assert tokens[0] == free[0][:cut]  # EOS is the last token, nothing after it
    assert len(logprobs[0]) == 5 + cut
    other_cut = free[1].index(eos) + 1 if eos in free[1] else 15
    assert tokens[1] == free[1][:other_cut]


def test_seeded_sampling_is_reproducible(tiny_model):
    prompts = prompts_for(tiny_model, [4, 8], seed=3)
    a, _ = mistral7b.generate(prompts, tiny_model, max_tokens=25, temperature=1.0, top_p=0.9, seed=7)
    b, _ = mistral7b.generate(prompts, tiny_model, max_tokens=25, temperature=1.0, top_p=0.9, seed=7)
    c, _ = mistral7b.generate(prompts, tiny_model, max_tokens=25, temperature=1.0, top_p=0.9, seed=8)
    greedy, _ = mistral7b.generate(prompts, tiny_model, max_tokens=25)
    assert a == b
    assert a != c and a != greedy


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {mistral7b.sampling.sample(logits, temperature=1.0, top_p=0.7, generator=g).item() for _ in range(300)}
    assert seen == {0, 1}
    seen = {mistral7b.sampling.sample(logits, temperature=1.0, top_k=1, generator=g).item() for _ in range(50)}
    assert seen == {0}


@pytest.mark.parametrize("prompts, kwargs, message", [
    ([], {}, "no prompts"),
    ([[]], {}, "empty"),
    ([[1, 999]], {}, "outside the vocabulary"),
    ([[1, 2]], {"max_tokens": -1}, "max_tokens"),
    ([[1, 2]], {"temperature": -1.0}, "temperature"),
    ([[1, 2]], {"top_p": 0.0}, "top_p"),
])
def test_bad_requests(tiny_model, prompts, kwargs, message):
    with pytest.raises((InputError, ValueError), match=message):
        mistral7b.generate(prompts, tiny_model, **{"max_tokens": 3, **kwargs})


def test_prompt_longer_than_context_of_full_attention_model():
    args = mistral7b.ModelArgs(dim=32, n_layers=1, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2,
                               norm_eps=1e-5, vocab_size=50, max_seq_len=16)
    model = mistral7b.Transformer(args)
    with pytest.raises(InputError, match="maximum context length is 16"):
        mistral7b.generate([[1] * 12], model, max_tokens=5)
    # A windowed model has no such limit: its cache rolls.
    windowed = mistral7b.Transformer(mistral7b.ModelArgs(**{**args.__dict__, "sliding_window": 4}))
    tokens, _ = mistral7b.generate([[1] * 12], windowed, max_tokens=30)
    assert len(tokens[0]) == 30
