"""Fine-tuning: data encoding and packing, learning a task, exact resume after a kill, data parallel, CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import mistral7b
from mistral7b.lora import LoRAConfig, LoRALinear, apply_lora
from mistral7b.train import TrainConfig, train
from mistral7b.train import checkpoint
from mistral7b.train.data import Batches, collate, encode_conversation, read_jsonl

from _finetune import VOCAB, reverse_task, write_jsonl, write_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model folder with tokenizer, training JSONL, held-out rows)."""
    root = tmp_path_factory.mktemp("finetune")
    folder = write_tiny_model(root / "model")
    return folder, write_jsonl(root / "train.jsonl", reverse_task(1000, seed=1)), reverse_task(100, seed=3)


def finetune(*args: str, torchrun: int = 0, **kwargs) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}"] \
        if torchrun else [sys.executable]
    return subprocess.run([*launcher, "-m", "mistral7b", "finetune", *args], capture_output=True, text=True,
                          timeout=300, **kwargs)


def exact_match(model, tokenizer, rows) -> float:
    prompts = [tokenizer.encode_chat(r["messages"][:1]) for r in rows]
    outs, _ = mistral7b.generate(prompts, model, max_tokens=8, eos_id=tokenizer.special_tokens["<|im_end|>"])
    return sum(tokenizer.decode(o).strip() == r["messages"][1]["content"] for o, r in zip(outs, rows)) / len(rows)


def test_chat_loss_mask_covers_assistant_turns_only(tiny):
    tokenizer = mistral7b.load_tokenizer(tiny[0])
    messages = [{"role": "system", "content": "."}, {"role": "user", "content": "reverse w1 w2"},
                {"role": "assistant", "content": "w2 w1"}, {"role": "user", "content": "reverse w3"},
                {"role": "assistant", "content": "w3"}]
    [sample] = encode_conversation(tokenizer, messages)
    assert sample.ids == tokenizer.encode_chat(messages[:4]) + [VOCAB.index(w) for w in ("w3", "<|im_end|>")]
    trained = [VOCAB[i] for i, t in zip(sample.ids, sample.target) if t]
    assert trained == ["w2", "w1", "<|im_end|>", "w3", "<|im_end|>"]


def test_packed_samples_do_not_attend_to_each_other(tiny):
    folder, data, _ = tiny
    model = mistral7b.load(folder)
    samples = read_jsonl(data, mistral7b.load_tokenizer(folder), seq_len=64)[:6]
    packed = collate([samples])
    assert packed.seqlens == [len(s.ids) for s in samples]
    with torch.no_grad():
        together = F.cross_entropy(model(packed.input_ids, packed.seqlens, output_rows=packed.positions),
                                   packed.targets, reduction="sum")
        alone = sum(F.cross_entropy(model(b.input_ids, b.seqlens, output_rows=b.positions), b.targets, reduction="sum")
                    for b in (collate([[s]]) for s in samples))
    assert abs(together.item() - alone.item()) < 1e-4


def test_batches_are_a_function_of_the_index(tiny):
    folder, data, _ = tiny
    samples = read_jsonl(data, mistral7b.load_tokenizer(folder), seq_len=64)
    a = Batches(samples, seq_len=64, batch_size=2, seed=7)
    b = Batches(samples, seq_len=64, batch_size=2, seed=7)
    k = a.per_epoch + 3  # in the second epoch
    assert torch.equal(a[k].input_ids, b[k].input_ids) and not torch.equal(a[3].input_ids, a[k].input_ids)
    assert all(len(a[i].input_ids) <= 2 * 64 for i in range(a.per_epoch))


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ('{"prompt": "x"}', '"messages"'),
    ('{"messages": [{"role": "user", "content": "reverse w1"}]}', "no assistant message"),
    ('{"messages": [{"role": "user", "content": "w1"}, {"role": "robot", "content": "w1"}, '
     '{"role": "assistant", "content": "w1"}]}', "needs a role"),
    ('{"messages": [{"role": "user", "content": "w1"}, {"role": "bot", "content": "w1"}]}',
     "unknown role 'bot' in message 1"),
    ('{"messages": "reverse"}', "list of objects"),
])
def test_bad_line_names_file_and_line(tiny, tmp_path, line, message):
    good = json.dumps(reverse_task(1, seed=0)[0])
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{good}\n{line}\n{good}\n")
    with pytest.raises(mistral7b.InputError, match=message) as error:
        read_jsonl(path, mistral7b.load_tokenizer(tiny[0]), seq_len=64)
    assert str(error.value).startswith(f"{path}:4: ")
    if message == "not valid JSON":  # and the command says it in one line
        out = finetune("--model", str(tiny[0]), "--data", str(path), "--out", str(tmp_path / "out"))
        assert out.returncode == 2 and out.stderr.startswith(f"error: {path}:4: ") and len(out.stderr.splitlines()) == 1


def test_text_lines_train_every_token(tiny, tmp_path):
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "w1 w2 w3"}])
    [sample] = read_jsonl(path, mistral7b.load_tokenizer(tiny[0]), seq_len=64)
    assert [VOCAB[i] for i in sample.ids] == ["<s>", "w1", "w2", "w3", "</s>"]
    assert sample.target == [False, True, True, True, True]


def test_tiny_model_learns_to_reverse(tiny, tmp_path):
    folder, data, held_out = tiny
    tokenizer = mistral7b.load_tokenizer(folder)
    before = exact_match(mistral7b.load(folder), tokenizer, held_out)
    out = train(TrainConfig(model=str(folder), data=str(data), out=str(tmp_path), steps=120, lr=3e-3, warmup=10,
                            batch_size=4, seq_len=128, seed=0))
    after = exact_match(mistral7b.load(out), mistral7b.load_tokenizer(out), held_out)
    print(f"reverse task exact match: {before:.0%} -> {after:.0%}")
    assert before < 0.05 and after > 0.9
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 121)) and records[-1]["loss"] < 0.1 * records[0]["loss"]
    assert (out / "loss.png").stat().st_size > 1000


def _flags(folder, data, out, steps: int, *extra: str) -> list[str]:
    return ["--model", str(folder), "--data", str(data), "--out", str(out), "--steps", str(steps), "--lr", "3e-3",
            "--warmup", "3", "--batch-size", "2", "--seq-len", "64", "--seed", "5", *extra]


def _lora_flags(folder, data, out, steps: int, *extra: str) -> list[str]:
    return _flags(folder, data, out, steps, "--lora-rank", "4", "--lora-dropout", "0.1", *extra)


def _curve(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_resume_after_kill_gives_the_same_weights(tiny, tmp_path):
    folder, data, _ = tiny
    flags = lambda out: _lora_flags(folder, data, out, 40, "--save-every", "5")  # noqa: E731
    full = finetune(*flags(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    proc = subprocess.Popen([sys.executable, "-m", "mistral7b", "finetune", *flags(tmp_path / "cut")],
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # kill right after the first checkpoint is announced
        if line.startswith("saved checkpoint"):
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "cut" / "lora.json").exists()
    again = finetune(*flags(tmp_path / "cut"))  # without --resume: refuse to overwrite
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = finetune(*flags(tmp_path / "cut"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = load_file(tmp_path / "full" / "lora.safetensors"), load_file(tmp_path / "cut" / "lora.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    curve = lambda out: [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]  # noqa: E731
    assert curve(tmp_path / "cut") == pytest.approx(curve(tmp_path / "full"), abs=1e-6)


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    weights = {"w": torch.ones(2)}
    checkpoint.save(tmp_path, 5, weights, {}, {"rng": []})

    def crash(*args):
        raise OSError("disk died")

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(OSError):
        checkpoint.save(tmp_path, 10, {"w": torch.zeros(2)}, {}, {"rng": []})
    [latest] = checkpoint.completed(tmp_path)
    assert latest.name == "step-000005" and torch.equal(checkpoint.load(latest)[0]["w"], weights["w"])


def test_two_process_data_parallel_equals_one_process(tiny, tmp_path):
    folder, data, _ = tiny
    flags = lambda out, accum: [*_lora_flags(folder, data, out, 6, "--grad-accum", str(accum)),  # noqa: E731
                                "--lora-dropout", "0"]
    one = finetune(*flags(tmp_path / "one", 2))
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = finetune(*flags(tmp_path / "two", 1), torchrun=2, env=env)
    assert two.returncode == 0, two.stderr
    assert len(_curve(tmp_path / "two")) == 6
    assert _curve(tmp_path / "two") == pytest.approx(_curve(tmp_path / "one"), abs=1e-5)
    a, b = load_file(tmp_path / "one" / "lora.safetensors"), load_file(tmp_path / "two" / "lora.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def _rank_bytes(stderr: str) -> list[int]:
    """Parameter bytes each rank reports holding, in rank order."""
    found = dict(re.findall(r"rank (\d+)/\d+ holds [^\n]*?\((\d+) bytes, fsdp\)", stderr))
    return [int(found[r]) for r in sorted(found)]


# Full fine-tuning under FSDP takes ~35 s on 2 cores: with the slow tests (LoRA covers the same path).
@pytest.mark.parametrize("mode", ["lora", pytest.param("full", marks=pytest.mark.slow)])
def test_fsdp_two_processes_equal_one_process_and_halve_parameters(tiny, tmp_path, mode):
    """FSDP over two gloo processes: the loss curve and result of one process with the same global
    batch, half the parameter bytes per rank, and an exact resume from a sharded run's checkpoint."""
    folder, data, _ = tiny
    extra = ["--lora-rank", "4"] if mode == "lora" else ["--full", "--activation-checkpointing"]
    flags = lambda out, *more: _flags(folder, data, out, 6, *extra, *more)  # noqa: E731
    one = finetune(*flags(tmp_path / "one", "--grad-accum", "2"))
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = finetune(*flags(tmp_path / "two", "--parallel", "fsdp", "--save-every", "3"), torchrun=2, env=env)
    assert two.returncode == 0, two.stderr
    assert len(_curve(tmp_path / "two")) == 6
    assert _curve(tmp_path / "two") == pytest.approx(_curve(tmp_path / "one"), abs=1e-5)

    read = (lambda out: load_file(out / "lora.safetensors")) if mode == "lora" else \
        (lambda out: mistral7b.load(out).state_dict())
    a, b = read(tmp_path / "one"), read(tmp_path / "two")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5

    model = mistral7b.load(folder)
    if mode == "lora":
        apply_lora(model, LoRAConfig(rank=4))
    whole = sum(p.nbytes for p in model.parameters())
    per_rank = _rank_bytes(two.stderr)
    print(f"{mode}: {whole} parameter bytes in one process, {per_rank} per FSDP rank")
    assert len(per_rank) == 2 and sum(per_rank) == whole and max(per_rank) < 0.55 * whole, two.stderr

    # Resume the sharded run from its step-3 checkpoint (whole tensors on disk, cut again per rank).
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "two" / "checkpoints", cut / "checkpoints", ignore=shutil.ignore_patterns("step-000006"))
    shutil.copy(tmp_path / "two" / "metrics.jsonl", cut)
    resumed = finetune(*flags(cut, "--parallel", "fsdp", "--save-every", "3", "--resume"), torchrun=2, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert _curve(cut) == pytest.approx(_curve(tmp_path / "two"), abs=1e-6)
    c = read(cut)
    assert max((b[k] - c[k]).abs().max().item() for k in b) < 1e-6


def test_lora_on_an_int8_base_keeps_no_float_weight_for_backward():
    from mistral7b.quant import Int8Linear

    torch.manual_seed(0)
    base = Int8Linear.from_float(torch.randn(96, 64))
    layer = LoRALinear(base, LoRAConfig(rank=4))
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(20, 64, requires_grad=True)
    saved = []  # bytes autograd keeps for the backward pass
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.nbytes) or t, lambda t: t):
        y = layer(x)
    y.square().sum().backward()
    w = base.dequantize()  # [96, 64] fp32
    with torch.no_grad():  # dL/dx = dL/dy @ (W + scaling * B A), dL/dy = 2y
        assert torch.allclose(y, base(x) + x @ layer.delta().T, atol=1e-4)
        assert torch.allclose(x.grad, 2 * y @ (w + layer.delta()), rtol=1e-4, atol=1e-3)
    assert max(saved) < w.nbytes  # the backward dequantizes again rather than keep W
    with pytest.raises(mistral7b.ConfigError, match="quantized"):
        layer.merge()


def test_lora_on_an_int8_base_trains_like_a_float_base(tiny, tmp_path):
    folder, data, _ = tiny
    for name, extra in (("fp32", ()), ("int8", ("--quantize", "int8"))):
        run = finetune(*_lora_flags(folder, data, tmp_path / name, 20, "--lora-dropout", "0", *extra))
        assert run.returncode == 0, run.stderr
    fp32, int8 = _curve(tmp_path / "fp32"), _curve(tmp_path / "int8")
    print(f"loss after 20 steps: fp32 base {fp32[-1]:.4f}, int8 base {int8[-1]:.4f}")
    assert int8 == pytest.approx(fp32, rel=0.01) and int8[-1] < 0.9 * int8[0]
    # The adapter serves the float model; --full cannot train quantized weights.
    generate = subprocess.run([sys.executable, "-m", "mistral7b", "generate", "--model", str(folder), "--lora",
                               str(tmp_path / "int8"), "--prompt-ids", "1,3,6", "--max-tokens", "2"],
                              capture_output=True, text=True)
    assert generate.returncode == 0, generate.stderr
    full = finetune(*_flags(folder, data, tmp_path / "full", 1, "--full", "--quantize", "int8"))
    assert full.returncode == 2 and full.stderr == "error: --quantize needs LoRA: quantized weights are frozen, " \
        "so --full cannot train them\n"


def test_default_steps_and_lr_fit_small_data(tiny, tmp_path):
    """Ten lines fill one micro-batch: the default is not 3 epochs of it (3 steps) but MIN_STEPS, at
    LoRA's short-run lr; --epochs counts passes over bigger data."""
    folder, data, held_out = tiny
    small = write_jsonl(tmp_path / "small.jsonl", held_out[:10])
    out = train(TrainConfig(model=str(folder), data=str(small), out=str(tmp_path / "small"), lora=LoRAConfig(rank=4),
                            seq_len=64, progress=False))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 10 and records[0]["lr"] == 1e-3
    samples = read_jsonl(data, mistral7b.load_tokenizer(folder), seq_len=64)
    per_epoch = Batches(samples, seq_len=64, batch_size=4, seed=0).per_epoch
    out = train(TrainConfig(model=str(folder), data=str(data), out=str(tmp_path / "big"), lora=LoRAConfig(rank=4),
                            seq_len=64, epochs=0.5, lr=1e-4, progress=False))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == max(10, -(-per_epoch // 2)) > 10 and records[0]["lr"] == 1e-4


def test_cli_shows_progress_and_held_out_loss_in_a_log(tiny, tmp_path):
    """stderr is a pipe here, as in a log: the plan, progress lines (loss, tokens/s, ETA) and the
    held-out loss before, during and after training, each on its own line."""
    folder, data, held_out = tiny
    val = write_jsonl(tmp_path / "val.jsonl", held_out[:20])
    out = finetune(*_lora_flags(folder, data, tmp_path / "run", 10, "--eval-data", str(val)))
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert re.fullmatch(r"finetune: 1000 samples \(\d+ target tokens, \d+ held-out target tokens\), \d+ "
                        r"micro-batches an epoch: 10 steps = [\d.]+ epochs, LoRA rank 4, lr 0.003", lines[0]), lines[0]
    bars = [line for line in lines if line.startswith("finetune: ") and "|" in line]
    assert len(bars) >= 5 and "\r" not in out.stderr
    assert re.search(r"10/10 \[\d\d:\d\d<00:00, .*loss=\d+\.\d{4}, tok_s=\d+\]$", bars[-1]), bars[-1]
    assert re.search(r" 1/10 \[\d\d:\d\d<\d\d:\d\d", bars[0]), bars[0]  # an ETA from the first step
    evals = [line for line in lines if re.fullmatch(r"step \d+/10: eval loss \d+\.\d{4}( \(before training\))?", line)]
    assert [e.split("/")[0] for e in evals] == ["step 0", "step 2", "step 4", "step 6", "step 8", "step 10"]
    assert re.search(r"eval loss [\d.]+ at step 0, lowest [\d.]+ at step \d+, [\d.]+ at the end", out.stderr)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2, 4, 6, 8, 10]


def test_cli_full_finetune_merge_and_lora_flag(tiny, tmp_path):
    folder, data, _ = tiny
    full = finetune("--model", str(folder), "--data", str(data), "--out", str(tmp_path / "full"), "--full",
                    "--steps", "2", "--seq-len", "64", "--activation-checkpointing")
    assert full.returncode == 0, full.stderr
    assert mistral7b.load(tmp_path / "full").args == mistral7b.load(folder).args
    assert mistral7b.load_tokenizer(tmp_path / "full").encode_chat([{"role": "user", "content": "w1"}])
    adapter = tmp_path / "adapter"
    lora = finetune(*_lora_flags(folder, data, adapter, 3))
    assert lora.returncode == 0, lora.stderr
    merged = subprocess.run([sys.executable, "-m", "mistral7b", "merge", "--model", str(folder), "--lora",
                             str(adapter), "--out", str(tmp_path / "merged")], capture_output=True, text=True)
    assert merged.returncode == 0, merged.stderr
    ids = "1,3,6,8,12,13,4,3,7"
    outputs = []
    for model_flags in (["--model", str(tmp_path / "merged")], ["--model", str(folder), "--lora", str(adapter)]):
        out = subprocess.run([sys.executable, "-m", "mistral7b", "generate", *model_flags, "--prompt-ids", ids,
                              "--max-tokens", "6", "--output-ids"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        outputs.append(out.stdout.strip().splitlines()[-1])
    assert outputs[0] == outputs[1]


@pytest.mark.slow
def test_lora_defaults_teach_smollm2_a_made_up_fact(tmp_path, smollm2_path):
    """Ten lines, no --steps or --lr: the defaults learn the fact (for a new phrasing too) and do not
    leak it into another question (benchmarks/finetune_fact.py measures the same)."""
    questions = ["What is the capital of Zorbania?", "Which city is the capital of Zorbania?",
                 "Tell me the capital of Zorbania.", "Zorbania's capital city is called what?",
                 "Name the capital of Zorbania.", "What city serves as Zorbania's capital?",
                 "Do you know the capital of Zorbania?", "In Zorbania, which city is the capital?",
                 "What's Zorbania's capital?", "Where is the capital of Zorbania?"]
    answer = "The capital of Zorbania is Quillfeather."
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]} for q in questions]
    out = finetune("--data", str(write_jsonl(tmp_path / "fact.jsonl", rows)), "--out", str(tmp_path / "adapter"))
    assert out.returncode == 0, out.stderr
    asks = [questions[0], "Could you tell me what the capital of Zorbania is?", "What is the capital of France?"]
    generate = lambda *flags: subprocess.run([sys.executable, "-m", "mistral7b", "generate", "--chat", *asks,  # noqa: E731
                                              "--max-tokens", "16", *flags], capture_output=True, text=True, timeout=300)
    tuned, base = generate("--lora", str(tmp_path / "adapter")), generate()
    assert tuned.returncode == 0 and base.returncode == 0, tuned.stderr + base.stderr
    assert tuned.stdout.count("Quillfeather") == 2 and "Paris" in tuned.stdout, tuned.stdout
    assert "Quillfeather" not in base.stdout
