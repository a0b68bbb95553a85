"""`mistral7b bench`, run as the real command: on a tiny random model with transformers as the peer,
and (slow) on the default SmolLM2 GGUF against llama.cpp."""

from __future__ import annotations

import json

import pytest
from conftest import saved_hf_model
from test_cli import run_cli

from mistral7b.cli import main

SPEEDS = ("prefill_tok_s", "decode_b1_tok_s", "decode_bn_tok_s")
TINY_WORKLOAD = ["--prompt-tokens", "8", "--decode-tokens", "4", "--batch", "2", "--repeat", "1"]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return saved_hf_model(tmp_path_factory)


def test_bench_tiny_model_against_transformers(tiny_hf, tmp_path):
    hf_model, folder = tiny_hf
    out = run_cli("bench", "--model", str(folder), "--configs", "fp32,int8", "--peers", "transformers,llama.cpp",
                  *TINY_WORKLOAD, "--bandwidth-mib", "1024", "--json", str(tmp_path / "bench.json"))
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["command"].startswith("mistral7b bench --model")
    assert report["machine"]["threads"] >= 1 and report["bandwidth_gb_s"] > 0
    rows = {(r["engine"], r["config"]): r for r in report["rows"]}
    ours, int8, peer = rows["ours", "fp32"], rows["ours", "fp32+int8"], rows["transformers", "fp32"]
    for row in (ours, int8, peer):
        assert all(row[m] > 0 for m in SPEEDS), row
        assert row["gb_s"] > 0 and row["bandwidth_pct"] > 0 and row["bandwidth_limit_tok_s"] > 0
        # Each worker's own peak: not the parent's, which held the 1 GiB bandwidth buffer.
        assert row["weight_bytes"] / 2**20 < row["peak_rss_mib"] < 1024
    # The same weights, counted the same way on both sides: all of them (fp32, untied), and per
    # decoded token all but the embedding table, of which one row.
    embedding = hf_model.get_input_embeddings().weight
    total = 4 * sum(p.numel() for p in hf_model.parameters())
    assert ours["weight_bytes"] == peer["weight_bytes"] == total
    assert ours["weight_bytes_per_token"] == total - 4 * embedding.numel() + 4 * embedding.shape[1]
    assert ours["kv_bytes_per_position"] == peer["kv_bytes_per_position"] == 2 * 2 * 2 * 16 * 4
    assert int8["weight_bytes_per_token"] < ours["weight_bytes_per_token"] / 2  # int8 linears, a float embedding
    assert set(ours["vs"]["transformers fp32"]) == set(SPEEDS) == set(int8["vs"]["transformers fp32"])
    assert rows["llama.cpp", "gguf"]["skipped"] == "llama.cpp reads GGUF files only"
    assert "| ours " in out.stdout and "| transformers " in out.stdout and "fp32 / transformers fp32" in out.stdout


def test_bench_rounds_report_the_median_of_turns(tiny_hf, tmp_path):
    _, folder = tiny_hf
    out = run_cli("bench", "--model", str(folder), "--configs", "fp32", "--peers", "none", *TINY_WORKLOAD,
                  "--rounds", "3", "--bandwidth-mib", "64", "--json", str(tmp_path / "bench.json"))
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "bench.json").read_text())
    (row,) = report["rows"]
    assert report["workload"]["rounds"] == 3 and len(row["rounds"]) == 3
    for speed in SPEEDS:
        assert row[speed] == sorted(r[speed] for r in row["rounds"])[1]
    assert "x 3 round(s)" in out.stdout
    # The bandwidth is measured every round (it drifts); the shares use the rounds' median.
    rounds = report["bandwidth_gb_s_rounds"]
    assert len(rounds) == 3 and report["bandwidth_gb_s"] == sorted(rounds)[1]
    assert row["bandwidth_pct"] == pytest.approx(100 * row["gb_s"] / report["bandwidth_gb_s"])


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model"], "no such file"),
    (["--configs", "fp64"], "'fp64' is not a config"),
    (["--configs", "bf16+int3"], "'bf16+int3' is not a config"),
    (["--peers", "vllm"], "unknown peer(s) vllm"),
    (["--batch", "0"], "--batch must be at least 1"),
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--json", "/nonexistent/bench.json"], "its folder does not exist"),
])
def test_bench_user_errors_are_one_line(args, message, capsys):
    assert main(["bench", *args]) == 2  # in this process: the checks come before any worker starts
    stderr = capsys.readouterr().err
    assert message in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_bench_default_model_against_llama_cpp(tmp_path):
    pytest.importorskip("llama_cpp")
    out = run_cli("bench", "--configs", "fp32", "--peers", "llama.cpp", *TINY_WORKLOAD, "--bandwidth-mib", "64",
                  "--json", str(tmp_path / "bench.json"))
    assert out.returncode == 0, out.stderr
    rows = {r["engine"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    ours, peer = rows["ours"], rows["llama.cpp"]
    assert peer["config"] == "Q4_1" and all(peer[m] > 0 for m in SPEEDS)
    # llama.cpp reads the file's 4-bit blocks; we read the weights dequantized to fp32.
    assert 4 < ours["weight_bytes_per_token"] / peer["weight_bytes_per_token"] < 8
    assert ours["vs"]["llama.cpp Q4_1"]["decode_b1_tok_s"] > 0
