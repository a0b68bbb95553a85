"""LoRA layers and adapter files, against transformers + peft in fp32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mistral7b
from mistral7b.lora import (LoRAConfig, apply_lora, load_adapter, lora_modules, merge_and_unload, save_adapter,
                            set_merged)
from mistral7b.weights.hf import permute_to_hf

from conftest import saved_hf_model

peft = pytest.importorskip("peft")
ALL = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
HF_NAMES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
            "w1": "mlp.gate_proj", "w2": "mlp.down_proj", "w3": "mlp.up_proj"}
SEQLENS = [11, 6, 9]  # longer than the window (4) of config w4


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers model, folder of its HF checkpoint)."""
    return saved_hf_model(tmp_path_factory)


def _ours_with_lora(folder, config: LoRAConfig, seed: int = 0) -> mistral7b.Transformer:
    model = mistral7b.load(folder)
    torch.manual_seed(seed)
    apply_lora(model, config)
    with torch.no_grad():  # B starts at zero; make it non-zero so every gradient and the delta are non-trivial
        for m in lora_modules(model).values():
            m.lora_B.normal_(0, 0.1)
    return model


def _batch(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=g) for n in SEQLENS]


def _our_loss(model, seqs):
    logits = model(torch.cat(seqs), SEQLENS)  # [T, vocab]
    starts = torch.tensor([0, *SEQLENS[:-1]]).cumsum(0)
    rows = torch.cat([s + torch.arange(n - 1) for s, n in zip(starts.tolist(), SEQLENS)])
    return F.cross_entropy(logits[rows], torch.cat(seqs)[rows + 1])


def _peft_loss(model, seqs):
    # Padding-free: one sequence at a time, token losses summed then averaged over all targets.
    total = sum(F.cross_entropy(model(input_ids=s[None]).logits[0, :-1].float(), s[1:], reduction="sum") for s in seqs)
    return total / sum(n - 1 for n in SEQLENS)


def test_loss_and_grads_equal_peft(pair, tmp_path):
    hf, folder = pair
    ours = _ours_with_lora(folder, LoRAConfig(rank=4, alpha=8, targets=ALL))
    save_adapter(ours, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path, is_trainable=True)
    seqs = _batch(hf.config.vocab_size)
    loss, ref_loss = _our_loss(ours, seqs), _peft_loss(peft_model, seqs)
    loss.backward()
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    ref = {n.removeprefix("base_model.model.model."): p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    worst = 0.0
    for name, m in lora_modules(ours).items():
        _, i, _, target = name.split(".")
        prefix = f"layers.{i}.{HF_NAMES[target]}"
        grad_b = m.lora_B.grad
        if target in ("wq", "wk"):  # B's rows follow the weight's rows, which HF permutes
            grad_b = permute_to_hf(grad_b, hf.config.num_attention_heads if target == "wq" else hf.config.num_key_value_heads)
        worst = max(worst, (m.lora_A.grad - ref[f"{prefix}.lora_A.default.weight"]).abs().max().item(),
                    (grad_b - ref[f"{prefix}.lora_B.default.weight"]).abs().max().item())
    assert worst < 1e-5, worst
    print(f"loss diff {abs(loss.item() - ref_loss.item()):.2e}, max LoRA grad diff {worst:.2e}")
    peft_model.unload()


def test_peft_export_gives_peft_the_same_logits(pair, tmp_path):
    hf, folder = pair
    ours = _ours_with_lora(folder, LoRAConfig(rank=2, alpha=6, targets=("wq", "wk", "w2")), seed=3)
    save_adapter(ours, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path)
    seq = _batch(hf.config.vocab_size)[0]
    with torch.no_grad():
        diff = (ours(seq, [len(seq)]) - peft_model(input_ids=seq[None]).logits[0]).abs().max().item()
    peft_model.unload()
    assert diff < 1e-5, diff


def test_peft_adapter_loads_into_ours(pair, tmp_path):
    hf, folder = pair
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "up_proj"],
                             init_lora_weights=False)  # random B: a non-zero delta
    torch.manual_seed(5)
    peft_model = peft.get_peft_model(hf, config)
    peft_model.save_pretrained(tmp_path)
    seq = _batch(hf.config.vocab_size)[1]
    with torch.no_grad():
        expected = peft_model(input_ids=seq[None]).logits[0]
    peft_model.unload()
    ours = load_adapter(mistral7b.load(folder), tmp_path)
    assert set(lora_modules(ours)) == {f"layers.{i}.{p}" for i in range(2) for p in
                                       ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w3")}
    with torch.no_grad():
        assert (ours(seq, [len(seq)]) - expected).abs().max().item() < 1e-5


def test_merge_unmerge_and_round_trip(pair, tmp_path):
    _, folder = pair
    ours = _ours_with_lora(folder, LoRAConfig(rank=3, alpha=5, targets=("wo", "w1")))
    seq = _batch(ours.args.vocab_size)[0]
    base_wo = lora_modules(ours)["layers.0.attention.wo"].weight.clone()
    with torch.no_grad():
        adapted = ours(seq, [len(seq)])
        set_merged(ours, True)
        assert (ours(seq, [len(seq)]) - adapted).abs().max() < 1e-5
        set_merged(ours, False)
        assert torch.allclose(lora_modules(ours)["layers.0.attention.wo"].weight, base_wo, atol=1e-6)
        save_adapter(ours, tmp_path / "adapter")
        reloaded = load_adapter(mistral7b.load(folder), tmp_path / "adapter")
        assert torch.equal(reloaded(seq, [len(seq)]), adapted)
        merged = merge_and_unload(ours)
        assert not lora_modules(merged) and set(merged.state_dict()) == set(mistral7b.load(folder).state_dict())
        mistral7b.save(merged, tmp_path / "merged")
        assert (mistral7b.load(tmp_path / "merged")(seq, [len(seq)]) - adapted).abs().max() < 1e-5


def test_only_lora_factors_train(pair):
    _, folder = pair
    ours = _ours_with_lora(folder, LoRAConfig(rank=2, targets=("wv",)))
    trainable = sorted(n for n, p in ours.named_parameters() if p.requires_grad)
    assert trainable == [f"layers.{i}.attention.wv.lora_{ab}" for i in range(2) for ab in "AB"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "rank"), (dict(targets=("wx",)), "targets"), (dict(dropout=1.0), "dropout")])
def test_bad_config(kwargs, message):
    with pytest.raises(mistral7b.ConfigError, match=message):
        LoRAConfig(**kwargs)


def test_bad_adapter_folders(pair, tmp_path):
    _, folder = pair
    with pytest.raises(mistral7b.CheckpointError, match="not a LoRA adapter"):
        load_adapter(mistral7b.load(folder), tmp_path)
    (tmp_path / "lora.json").write_text('{"rank": 2, "alpha": 4, "targets": ["wq"]}')
    with pytest.raises(mistral7b.CheckpointError, match="lora.safetensors are missing"):
        load_adapter(mistral7b.load(folder), tmp_path)
