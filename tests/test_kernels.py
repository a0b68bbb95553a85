"""mistral7b.kernels: formats, native kernels against the pure-torch reference, GGUF layout, compile, grads.

Tolerance of the quantized GEMVs: the int4 GEMV quantizes the activations per 32-block to int8 (a
relative error of up to 1/254 per element, random in sign), so its outputs differ from dequantize +
F.linear by ~0.6% (relative Frobenius norm) on random data; we allow 2%. The int8 GEMV quantizes them
to int16 (~2e-5 measured); we allow 1e-4. bf16 outputs add their own rounding (0.4%).
"""

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch.utils.cpp_extension

from mistral7b import kernels
from mistral7b.kernels import formats, native

needs_native = pytest.mark.skipif(not kernels.native_available(), reason="native kernels unavailable")
QUANT_RTOL = 2e-2
INT8_RTOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def weight(n, k, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / math.sqrt(k)


@pytest.mark.parametrize("group", [None, 32, 96])
def test_int8_roundtrip_error_is_at_most_half_a_step(group):
    w = weight(64, 576)
    q, s = kernels.quantize_int8(w, group)
    g = group or 576
    assert q.dtype == torch.int8 and q.shape == w.shape and s.shape == (64, 576 // g)
    assert q.abs().max() <= 127
    err = (kernels.dequantize_int8(q, s) - w).abs().reshape(64, -1, g)
    assert (err <= s[..., None] / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_roundtrip_error_is_at_most_half_a_step(group):
    w = weight(64, 1536)
    q, s, m = kernels.quantize_int4(w, group)
    assert q.dtype == torch.uint8 and q.shape == (64, 768) and s.shape == m.shape == (64, 1536 // group)
    err = (kernels.dequantize_int4(q, s, m) - w).abs().reshape(64, -1, group)
    assert (err <= s[..., None] / 2 * (1 + 1e-5) + 1e-7).all()


def test_bad_group_size_is_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        kernels.quantize_int4(weight(8, 576), 48)
    with pytest.raises(ValueError, match="dividing K"):
        kernels.quantize_int8(weight(8, 576), 128)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_gguf_q4_bytes_are_our_int4_layout(kind):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    qtype = GGMLQuantizationType[kind]
    w = weight(16, 576).numpy()
    raw = quantize(w, qtype)  # per 32-block: d fp16, (Q4_1: m fp16), 16 bytes of nibbles
    blocks = torch.from_numpy(raw.reshape(16, 576 // 32, -1).copy())
    halves = blocks[..., :-16].contiguous().view(torch.float16).float()  # [16, K/32, 1 or 2]
    scales = halves[..., 0]
    mins = halves[..., 1] if kind == "Q4_1" else -8 * scales  # Q4_0: w = (q - 8) d
    qweight = blocks[..., -16:].reshape(16, -1)
    expected = torch.from_numpy(dequantize(raw, qtype).reshape(16, 576))
    assert torch.equal(formats.dequantize_int4(qweight, scales, mins), expected)
    assert torch.equal(kernels.dequantize_int4(qweight, scales, mins), expected)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_dequantize_equals_reference(dtype):
    w = weight(48, 1536)
    q8, s8 = kernels.quantize_int8(w, 64)
    q4, s4, m4 = kernels.quantize_int4(w, 128)
    assert torch.equal(kernels.dequantize_int8(q8, s8, dtype), formats.dequantize_int8(q8, s8, dtype))
    assert torch.equal(kernels.dequantize_int4(q4, s4, m4, dtype), formats.dequantize_int4(q4, s4, m4, dtype))


CASES = [(576, 32), (576, 64), (1536, 128)]  # K not a power of two, G = 32, 64, 128


@needs_native
@pytest.mark.parametrize("rows", [1, 2, 5, 17, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,group", CASES)
def test_int4_linear_matches_reference(k, group, dtype, rows):
    q, s, m = kernels.quantize_int4(weight(96, k), group)
    x = torch.randn(rows, k).to(dtype)
    y = kernels.int4_linear(x, q, s, m)
    assert y.dtype == dtype and y.shape == (rows, 96)
    assert rel_err(y, F.linear(x.float(), formats.dequantize_int4(q, s, m))) < QUANT_RTOL


@needs_native
def test_int8_gemv_takes_minus_128():  # GGUF Q8_0 may hold it; |-128| is 128 as maddubs' unsigned byte
    q = torch.full((4, 64), -128, dtype=torch.int8)
    q[:, ::3] = 127
    g = torch.Generator().manual_seed(0)
    s, x = torch.rand(4, 1, generator=g), torch.randn(1, 64, generator=g)
    w = formats.dequantize_int8(q, s)
    # Relative to the terms' magnitude: these rows' sums nearly cancel for some x, which makes an error
    # relative to the output itself as large as 4e-3 (a seed in 300) though each term is exact to 1e-5.
    err = (kernels.int8_linear(x, q, s) - F.linear(x, w)).abs() / (x.abs() @ w.abs().T)
    assert err.max() < INT8_RTOL[torch.float32]


@needs_native
@pytest.mark.parametrize("rows", [1, 2, 5, 17, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,group", [(576, None), (1536, 32)])  # per channel, grouped
def test_int8_linear_matches_reference(k, group, dtype, rows):
    q, s = kernels.quantize_int8(weight(96, k), group)
    x = torch.randn(rows, k).to(dtype)
    y = kernels.int8_linear(x, q, s)
    assert y.dtype == dtype and y.shape == (rows, 96)
    assert rel_err(y, F.linear(x.float(), formats.dequantize_int8(q, s))) < INT8_RTOL[dtype]


@needs_native
def test_leading_dims_and_fp16_activations():
    q, s, m = kernels.quantize_int4(weight(40, 576))
    x = torch.randn(2, 3, 576)
    y = kernels.int4_linear(x.half(), q, s, m)
    assert y.dtype == torch.float16 and y.shape == (2, 3, 40)
    assert rel_err(y, F.linear(x, formats.dequantize_int4(q, s, m))) < QUANT_RTOL


@needs_native
def test_prefill_path_tiles_rows(monkeypatch):
    monkeypatch.setattr(kernels, "TILE_ELEMENTS", 16 * 576)  # 16 rows a tile: 40 rows make 3 tiles
    w = weight(40, 576)
    x = torch.randn(2, 20, 576)
    q4, s4, m4 = kernels.quantize_int4(w)
    q8, s8 = kernels.quantize_int8(w)
    y4, y8 = kernels.int4_linear(x, q4, s4, m4), kernels.int8_linear(x, q8, s8)
    assert y4.shape == y8.shape == (2, 20, 40) and y4.is_contiguous()
    torch.testing.assert_close(y4, F.linear(x, formats.dequantize_int4(q4, s4, m4)))
    torch.testing.assert_close(y8, F.linear(x, formats.dequantize_int8(q8, s8)))


def test_float64_activations_take_the_pure_torch_path():
    w = weight(8, 64).double()
    q, s, m = kernels.quantize_int4(w)
    x = torch.randn(2, 64, dtype=torch.float64)
    assert torch.equal(kernels.int4_linear(x, q, s, m), F.linear(x, formats.dequantize_int4(q, s, m, x.dtype)))


@needs_native
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 64])
@pytest.mark.parametrize("k", [576, 100])
def test_float_linear_matches_f_linear(k, rows, wdtype):
    w = weight(72, k).to(wdtype)
    x = torch.randn(rows, k)
    torch.testing.assert_close(kernels.float_linear(x, w), F.linear(x, w.float()), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.ops.mistral7b.float_gemv(x, w), F.linear(x, w.float()), rtol=1e-4, atol=1e-5)


def test_fallback_is_the_reference(monkeypatch):
    monkeypatch.setattr(native, "ENABLED", False)
    assert not kernels.native_available()
    w = weight(32, 576)
    x = torch.randn(3, 576)
    q4, s4, m4 = kernels.quantize_int4(w)
    q8, s8 = kernels.quantize_int8(w)
    assert torch.equal(kernels.int4_linear(x, q4, s4, m4), F.linear(x, formats.dequantize_int4(q4, s4, m4)))
    assert torch.equal(kernels.int8_linear(x, q8, s8), F.linear(x, formats.dequantize_int8(q8, s8)))
    assert torch.equal(kernels.float_linear(x, w), F.linear(x, w))


def test_a_failed_build_warns_and_falls_back(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setenv("MISTRAL7B_KERNELS_DIR", str(tmp_path))  # nothing built there: a build is tried
    monkeypatch.setattr(torch.utils.cpp_extension, "load", broken)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with pytest.warns(UserWarning, match="native build failed"):
        assert native._build() is False
    assert [p.suffix for p in tmp_path.iterdir()] == [".lock"]  # no half-built folder left behind


CHECK = "from mistral7b.kernels import native; assert native.native_available(); print(native.__file__)"


def _python(code: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=600)


@needs_native
def test_a_second_checkout_loads_the_built_kernels_without_compiling(tmp_path):
    """Two installs of the same sources share one build: torch's load() by name rebuilt it at every
    switch (its build.ninja names the sources by absolute path)."""
    checkout = tmp_path / "checkout"
    shutil.copytree(Path(native.__file__).parents[1], checkout / "mistral7b",
                    ignore=shutil.ignore_patterns("__pycache__"))
    library = native.library_path()
    before = library.stat().st_mtime_ns
    run = _python(CHECK, checkout)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(str(checkout)) and "compiling" not in run.stderr
    assert library.stat().st_mtime_ns == before


@pytest.mark.slow
def test_a_fresh_cache_compiles_once_for_concurrent_processes(tmp_path):
    """Two processes start on an empty cache: one compiles (and says so), the other waits for it; a
    third loads the library as it is."""
    cache = tmp_path / "cache"
    env = {**os.environ, "MISTRAL7B_KERNELS_DIR": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", CHECK], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    stderr = "".join(p.communicate(timeout=600)[1] for p in procs)
    assert [p.returncode for p in procs] == [0, 0], stderr
    assert stderr.count("mistral7b: compiling native kernels (once") == 1, stderr
    assert stderr.count("mistral7b: native kernels compiled in ") == 1, stderr
    [folder] = [p for p in cache.iterdir() if p.is_dir()]  # no temporary build folder left
    mtime = (folder / native.LIBRARY).stat().st_mtime_ns
    again = _python(CHECK, tmp_path, MISTRAL7B_KERNELS_DIR=str(cache))
    assert again.returncode == 0 and again.stderr == "", again.stderr
    assert (folder / native.LIBRARY).stat().st_mtime_ns == mtime


def test_int8_linear_gradients_are_those_of_the_dequantized_weight():
    q, s = kernels.quantize_int8(weight(48, 576))
    x = torch.randn(4, 576, requires_grad=True)
    kernels.int8_linear(x, q, s).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    F.linear(x_ref, formats.dequantize_int8(q, s)).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_int4_linear_under_torch_compile():
    q, s, m = kernels.quantize_int4(weight(64, 576))

    def f(x):
        return kernels.int4_linear(x, q, s, m).relu() * 2

    compiled = torch.compile(f, fullgraph=True)
    for rows in (1, 64):
        x = torch.randn(rows, 576)
        torch.testing.assert_close(compiled(x), f(x))


def test_doctor_prints_one_line_per_check_and_builds_the_kernels():
    run = subprocess.run([sys.executable, "-m", "mistral7b", "doctor"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    lines = {line[6:21].strip(): line for line in run.stdout.splitlines()}
    assert list(lines) == ["torch", "threads", "cpu", "compiler", "native kernels", "default model"], run.stdout
    assert all(line.split()[0] in ("ok", "warn") for line in lines.values())
    if native.cpu_supported() and native.ENABLED:
        assert lines["native kernels"].startswith("ok") and native.is_built(), run.stdout
