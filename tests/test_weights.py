"""Reference and Hugging Face folders: loading, saving, round trips and bad input."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import mistral7b
from mistral7b.errors import CheckpointError, ConfigError


def test_reference_hf_reference_round_trip_is_bit_identical(tiny_model, tmp_path):
    mistral7b.save(tiny_model, tmp_path / "ref")
    mistral7b.save(mistral7b.load(tmp_path / "ref"), tmp_path / "hf", format="hf")
    mistral7b.save(mistral7b.load(tmp_path / "hf"), tmp_path / "ref2")
    first = load_file(tmp_path / "ref" / "consolidated.safetensors")
    second = load_file(tmp_path / "ref2" / "consolidated.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert json.loads((tmp_path / "ref" / "params.json").read_text()) == \
        json.loads((tmp_path / "ref2" / "params.json").read_text())


def test_hf_export_loads_in_transformers(tiny_model, tmp_path):
    from transformers import MistralForCausalLM

    mistral7b.save(tiny_model, tmp_path, format="hf")
    hf = MistralForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(0, tiny_model.args.vocab_size, (13,))
    with torch.no_grad():
        assert (hf(ids[None]).logits[0] - tiny_model(ids, [13])).abs().max() < 1e-4


def test_pth_and_sharded_checkpoints(tiny_model, tmp_path):
    ids = torch.randint(0, tiny_model.args.vocab_size, (9,))
    expected = tiny_model(ids, [9])
    # consolidated.00.pth
    (tmp_path / "pth").mkdir()
    (tmp_path / "pth" / "params.json").write_text(json.dumps(tiny_model.args.to_dict()))
    torch.save(tiny_model.state_dict(), tmp_path / "pth" / "consolidated.00.pth")
    assert torch.equal(mistral7b.load(tmp_path / "pth")(ids, [9]), expected)
    # HF sharded with an index
    mistral7b.save(tiny_model, tmp_path / "hf", format="hf")
    whole = load_file(tmp_path / "hf" / "model.safetensors")
    (tmp_path / "hf" / "model.safetensors").unlink()
    names = sorted(whole)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in shards.items():
        save_file({n: whole[n] for n in part}, tmp_path / "hf" / file)
        weight_map.update({n: file for n in part})
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert torch.equal(mistral7b.load(tmp_path / "hf")(ids, [9]), expected)


def test_dtype_and_v01_rope_default(tiny_model, tmp_path):
    mistral7b.save(tiny_model, tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    del params["rope_theta"]  # as in Mistral 7B v0.1's params.json
    (tmp_path / "params.json").write_text(json.dumps(params))
    model = mistral7b.load(tmp_path, dtype="bf16")
    assert model.args.rope_theta == 10000.0
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_presets():
    v1, v2, v3 = (mistral7b.PRESETS[f"mistral-7b-v0.{i}"] for i in (1, 2, 3))
    assert (v1.sliding_window, v1.rope_theta, v1.vocab_size) == (4096, 10000.0, 32000)
    assert (v2.sliding_window, v2.rope_theta) == (None, 1e6)
    assert (v3.sliding_window, v3.rope_theta, v3.vocab_size) == (None, 1e6, 32768)
    assert 7.2e9 < v1.n_params < 7.3e9


def test_loading_does_not_need_twice_the_weights(tmp_path):
    """Peak anonymous memory while loading stays near one copy of the weights (meta init + one tensor at a time)."""
    args = mistral7b.ModelArgs(dim=1024, n_layers=8, head_dim=64, hidden_dim=4096, n_heads=16, n_kv_heads=4,
                               norm_eps=1e-5, vocab_size=8000, sliding_window=64)
    with torch.device("meta"):
        size = sum(p.numel() * 4 for p in mistral7b.Transformer(args).parameters())
    state = {}
    for name, shape in mistral7b.weights.common.expected_shapes(args).items():
        state[name] = torch.randn(shape) * 0.02
    (tmp_path / "params.json").write_text(json.dumps(args.to_dict()))
    save_file(state, tmp_path / "consolidated.safetensors")
    del state

    def rss_anon() -> int:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0

    peak, done = [rss_anon()], threading.Event()
    base = peak[0]

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    model = mistral7b.load(tmp_path)
    done.set()
    watcher.join()
    assert sum(p.numel() for p in model.parameters()) * 4 == size
    assert peak[0] - base < 1.4 * size, (peak[0] - base) / size


@pytest.mark.parametrize("damage, message", [
    ("no_folder", "no such file"),
    ("empty_folder", "not a checkpoint"),
    ("missing_tensor", "missing tensor"),
    ("truncated", "truncated"),
    ("bad_shape", "has shape"),
    ("unknown_key", "unknown key"),
    ("missing_key", "missing required key"),
    ("bad_json", "not valid JSON"),
    ("no_weights", "no consolidated"),
])
def test_bad_checkpoints_give_clear_errors(tiny_model, tmp_path, damage, message):
    folder = tmp_path / "ckpt"
    mistral7b.save(tiny_model, folder)
    weights, params = folder / "consolidated.safetensors", folder / "params.json"
    if damage == "no_folder":
        folder = tmp_path / "nothing"
    elif damage == "empty_folder":
        folder = tmp_path / "empty"
        folder.mkdir()
    elif damage == "missing_tensor":
        state = load_file(weights)
        del state["layers.1.feed_forward.w2.weight"]
        save_file(state, weights)
    elif damage == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "bad_shape":
        p = json.loads(params.read_text())
        p["hidden_dim"] = 256
        params.write_text(json.dumps(p))
    elif damage == "unknown_key":
        params.write_text(json.dumps({**json.loads(params.read_text()), "dimm": 3}))
    elif damage == "missing_key":
        p = json.loads(params.read_text())
        del p["n_layers"]
        params.write_text(json.dumps(p))
    elif damage == "bad_json":
        params.write_text("{not json")
    elif damage == "no_weights":
        weights.unlink()
    with pytest.raises((CheckpointError, ConfigError), match=message) as info:
        mistral7b.load(folder)
    text = str(info.value)
    if damage not in ("no_folder", "empty_folder"):
        assert str(folder) in text  # names the file
    if damage == "missing_tensor":
        assert "layers.1.feed_forward.w2.weight" in text
    if damage == "bad_shape":
        assert "feed_forward" in text
