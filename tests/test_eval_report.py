"""Data loading and its errors, lm-eval's context/continuation split, seeded shots, the report."""

from __future__ import annotations

import json

import pytest

from _eval_fakes import FIXTURES
from mistral7b import InputError
from mistral7b.eval.__main__ import main
from mistral7b.eval.backends import encode_pair
from mistral7b.eval.data import load_split
from mistral7b.eval.fewshot import sample_shots
from mistral7b.eval import report


def test_jsonl_and_parquet_read_alike(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = load_split(FIXTURES, "arc_easy", "test", "allenai/ai2_arc")
    (tmp_path / "arc_easy").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "arc_easy" / "test-00000-of-00001.parquet")
    assert load_split(tmp_path, "arc_easy", "test", "allenai/ai2_arc") == rows


def test_missing_file_names_the_file_and_the_dataset(tmp_path, capsys):
    with pytest.raises(InputError, match=r"piqa/validation\.jsonl.*ybisk/piqa"):
        load_split(tmp_path, "piqa", "validation", "ybisk/piqa")
    assert main(["--tasks", "piqa", "--data-dir", str(tmp_path)]) == 2
    assert "ybisk/piqa" in capsys.readouterr().err
    assert main(["--tasks", "nope", "--data-dir", str(tmp_path)]) == 2
    assert "unknown task(s) nope" in capsys.readouterr().err


def test_encode_pair_splits_as_lm_eval():
    encode = lambda s: [ord(c) for c in s.replace(" ", "_")]  # noqa: E731  (a tokenizer that sees spaces)
    assert encode_pair(encode, 0, "Answer: ", "Paris") == (encode("Answer:"), encode(" Paris"))
    assert encode_pair(encode, 0, "Answer:", " Paris") == (encode("Answer:"), encode(" Paris"))
    assert encode_pair(encode, 7, "", " Paris") == ([7], encode(" Paris"))


def test_shots_are_seeded_per_document_and_never_the_document_itself():
    pool = [{"q": i} for i in range(10)]
    first = sample_shots(pool, 3, seed=1, key="a/0", exclude=pool[0])
    assert first == sample_shots(pool, 3, seed=1, key="a/0", exclude=pool[0]) and pool[0] not in first
    assert any(sample_shots(pool, 3, seed=s, key="a/0") != first for s in range(2, 6))
    assert sample_shots(pool, 0, seed=1, key="a/0") == []


def test_report_categories_table_json_and_chart(tmp_path):
    runs = {"A": {"arc_easy": {"acc": 0.5, "acc_norm": 0.25}, "boolq": {"acc": 1.0}, "piqa": {"acc": 0.0, "acc_norm": 0.75}},
            "B": {"arc_easy": {"acc": 1.0, "acc_norm": 1.0}, "boolq": {"acc": 0.0}, "piqa": {"acc": 1.0, "acc_norm": 0.5}}}
    # acc_norm is the primary metric of arc_easy and piqa: commonsense A = (0.25 + 0.75) / 2
    assert report.categories(runs["A"]) == {"commonsense_reasoning": 0.5, "reading_comprehension": 1.0}
    one = report.to_json({"A": runs["A"]}, {"seed": 1})
    assert one == {"results": runs["A"], "categories": report.categories(runs["A"]), "config": {"seed": 1}}
    two = report.to_json(runs, {})
    assert list(two["models"]) == ["A", "B"] and two["models"]["B"]["categories"]["reading_comprehension"] == 0.0
    lines = report.table(runs).splitlines()
    assert lines[0].split() == ["task", "metric", "A", "B"]
    assert lines[2].split() == ["arc_easy", "acc", "50.0", "100.0"]
    assert lines[-1].split()[-2:] == ["100.0", "0.0"]
    report.plot(runs, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"
    report.write_json(tmp_path / "r.json", two)
    assert json.loads((tmp_path / "r.json").read_text()) == two


def test_falls_back_to_the_datasets_cache(tmp_path, monkeypatch):
    """A split missing from --data-dir is read from the Arrow files `datasets.load_dataset` caches."""
    import pyarrow as pa

    from _eval_fakes import FakeBackend
    from mistral7b.eval import TASKS, evaluate

    rows = load_split(FIXTURES, "arc_easy", "test", "allenai/ai2_arc (ARC-Easy)")
    shard = tmp_path / "cache" / "allenai___ai2_arc" / "ARC-Easy" / "0.0.0" / "0123abcd" / "ai2_arc-test.arrow"
    shard.parent.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(shard), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    assert load_split(tmp_path / "empty", "arc_easy", "test", "allenai/ai2_arc (ARC-Easy)") == rows
    fake = FakeBackend(ll=lambda c, x: -len(x))
    assert evaluate(TASKS["arc_easy"], fake, tmp_path / "empty")[1] == 4
    with pytest.raises(InputError, match="ARC-Challenge"):
        load_split(tmp_path / "empty", "arc_challenge", "test", "allenai/ai2_arc (ARC-Challenge)")


def _eval_cli(*args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "mistral7b", "eval", *args], capture_output=True, text=True,
                          timeout=600)


def test_output_goes_to_a_new_folder_and_is_written_after_every_task(tmp_path):
    import shutil

    out = tmp_path / "does" / "not" / "exist" / "r.json"
    run = _eval_cli("--tasks", "arc_easy", "--data-dir", str(FIXTURES), "--limit", "2", "--output", str(out))
    assert run.returncode == 0, run.stderr
    assert json.loads(out.read_text())["config"]["examples"] == {"arc_easy": 2}
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    # A run that fails at its second task (boolq's files are missing) keeps the first task's scores.
    data = tmp_path / "data"
    shutil.copytree(FIXTURES / "arc_easy", data / "arc_easy")
    kept = tmp_path / "kept" / "r.json"
    run = _eval_cli("--tasks", "arc_easy,boolq", "--data-dir", str(data), "--limit", "2", "--output", str(kept))
    assert run.returncode == 2 and "boolq" in run.stderr and "Traceback" not in run.stderr
    report = json.loads(kept.read_text())
    assert list(report["results"]) == ["arc_easy"] and report["config"]["examples"] == {"arc_easy": 2}


def test_unwritable_output_fails_before_scoring(tmp_path):
    (tmp_path / "a-file").write_text("")
    run = _eval_cli("--tasks", "arc_easy", "--data-dir", str(FIXTURES), "--output", str(tmp_path / "a-file" / "r.json"))
    assert run.returncode == 2 and run.stderr.startswith("error: ") and "cannot be written" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "examples in" not in run.stderr  # nothing was scored
