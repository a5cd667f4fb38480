"""Fused Triton dequant kernels vs the torch reference, and the dispatch between them.

The kernel tests run the real kernels in Triton's interpreter on CPU tensors (triton_dequant picks the interpreter
for non-CUDA tensors by itself, whatever TRITON_INTERPRET says), so they need the `triton` package but no GPU; they
are skipped where triton is not installed. On a CUDA machine the same tests also run the compiled kernels.
The dispatch tests need neither. tests/gpu/kernel_check.py checks the compiled kernels at full FLUX sizes.
"""
import gguf
import pytest
import torch

from kontext_lowvram.optimizations.quant import (dequantize_raw, nf4_parts_from_weight, QuantDataError,
                                                 triton_dequant as td)
from kontext_lowvram.optimizations.qtensor import QWeight
from kontext_lowvram.optimizations.quant import gguf as gq
from kontext_lowvram.optimizations.quant import nf4
from fixtures.gguf_blocks import random_blocks

TYPES = sorted(gq.BLOCK_TYPES_BY_NAME)
DTYPES = list(td.OUT_DTYPES)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and td.available("cuda") else [])


@pytest.fixture(scope="module")
def triton():
    return pytest.importorskip("triton", reason="the Triton kernel tests need the `triton` package (pip install "
                                                "triton); they run in its interpreter, no GPU needed")


def _block_size(qtype):
    return gq.GGML_QUANT_SIZES[gq.qtype_of(qtype)][0]


def _shapes(qtype):
    b = _block_size(qtype)
    return [
        (1, b),          # a single block
        (3, 3 * b),      # rows not a multiple of the blocks per program
        (37, 512),       # several programs, a partial last one
    ]


# ----------------------------------------------------------------------------------------------------------------
# GGUF kernels: exact vs gguf.dequantize

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("qtype", TYPES)
def test_gguf_exact(triton, qtype, dtype, device):
    for i, shape in enumerate(_shapes(qtype)):
        raw = random_blocks(qtype, shape, seed=i, device=device)
        got = td.dequantize_gguf(raw, qtype, shape, dtype)
        want = gq.dequantize(raw, qtype, shape, dtype)
        assert got.shape == want.shape == shape and got.dtype == dtype and got.device == raw.device
        assert torch.equal(got, want), (qtype, shape, dtype)


@pytest.mark.parametrize("qtype", TYPES)
def test_gguf_exact_flux_rows(triton, qtype):
    """A FLUX row count (3072 rows, as every FLUX linear has on one side), bf16 like the model runs."""
    shape = (3072, _block_size(qtype))
    raw = random_blocks(qtype, shape, seed=7)
    assert torch.equal(td.dequantize_gguf(raw, qtype, shape, torch.bfloat16),
                       gq.dequantize(raw, qtype, shape, torch.bfloat16))


@pytest.mark.parametrize("qtype", TYPES)
def test_gguf_any_scale_bits(triton, qtype):
    """Every byte random, the fp16 scale fields included: subnormal, huge, inf and NaN scales. Values (and fp16
    overflow to inf) still agree exactly; NaN compares equal to NaN."""
    b = _block_size(qtype)
    _, type_size = gq.GGML_QUANT_SIZES[gq.qtype_of(qtype)]
    g = torch.Generator().manual_seed(3)
    raw = torch.randint(0, 256, (64, type_size), dtype=torch.uint8, generator=g)
    shape = (8, 8 * b)
    for dtype in DTYPES:
        torch.testing.assert_close(td.dequantize_gguf(raw, qtype, shape, dtype), gq.dequantize(raw, qtype, shape, dtype),
                                   rtol=0, atol=0, equal_nan=True)


def test_gguf_raw_layouts(triton):
    """Flat, (rows, bytes) and int8 storage give the same values; empty tensors work."""
    shape = (4, 512)
    raw = random_blocks("Q4_K", shape, seed=1)
    want = gq.dequantize(raw, "Q4_K", shape, torch.bfloat16)
    for r in (raw, raw.reshape(-1), raw.view(torch.int8)):
        assert torch.equal(td.dequantize_gguf(r, "Q4_K", shape, torch.bfloat16), want)
    # a non-contiguous view of the bytes (every other row of a bigger tensor)
    big = random_blocks("Q8_0", (8, 64), seed=2)
    assert torch.equal(td.dequantize_gguf(big[::2], "Q8_0", (4, 64), torch.float32),
                       gq.dequantize(big[::2].contiguous(), "Q8_0", (4, 64), torch.float32))
    empty = td.dequantize_gguf(torch.empty(0, 0, dtype=torch.uint8), "Q6_K", (0, 256), torch.float16)
    assert empty.shape == (0, 256) and empty.dtype == torch.float16


def test_gguf_errors_and_fallbacks(triton):
    raw = random_blocks("Q4_K", (2, 256), seed=0)
    with pytest.raises(QuantDataError, match="expected 288 bytes"):
        td.dequantize_gguf(raw[:1], "Q4_K", (2, 256), torch.float32)
    with pytest.raises(QuantDataError, match="not a multiple"):
        td.dequantize_gguf(raw, "Q4_K", (2, 100), torch.float32)
    # No kernel for the type or the dtype: the torch reference answers.
    f16 = (torch.randn(2, 256, generator=torch.Generator().manual_seed(0))).half().view(torch.uint8)
    assert td.block_row("F16") is None  # every block type has a kernel; float types do not
    assert torch.equal(td.dequantize_gguf(f16, "F16", (2, 256), torch.bfloat16),
                       gq.dequantize(f16, "F16", (2, 256), torch.bfloat16))
    assert torch.equal(td.dequantize_gguf(raw, "Q4_K", (2, 256), torch.float64),
                       gq.dequantize(raw, "Q4_K", (2, 256), torch.float64))


def test_registry_rows_and_unknown_ids():
    """One row per block type: unique Triton decoder ids, geometry from gguf-py; an id with no row is refused
    by name in Python and fails in the kernel instead of decoding as another type."""
    rows = list(gq.BLOCK_TYPES.values())
    assert sorted(r.kernel for r in rows) == list(range(len(rows)))
    for r in rows:
        assert (r.block, r.type_size) == gguf.GGML_QUANT_SIZES[r.qtype]
        assert r.sub * r.width == r.block and gq.block_type(r.name) is r is gq.block_type(int(r.qtype))
    with pytest.raises(gq.UnsupportedQuantType, match="9999"):
        gq.block_type(9999)
    assert td.block_row(9999) is None and td.block_row("Q9_9") is None
    kernels = td._kernels(interpret=True)
    raw, out = torch.zeros(34, dtype=torch.uint8), torch.empty(32)
    with pytest.raises(Exception, match="no decoder for this quant type id"):
        td._launch(kernels.dequant_gguf, True, (1,), raw, out, 1, QT=len(rows), BLOCK=32, TS=34, S=1, W=32, NB=1,
                   BF16_BITS=False, num_warps=1)


# ----------------------------------------------------------------------------------------------------------------
# NF4 kernel: exact vs nf4.dequantize_nf4

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_nf4_exact(triton, blocksize, nested, device):
    g = torch.Generator().manual_seed(blocksize + nested)
    for shape in [(7, 13), (96, 64), (300, 256)]:  # odd element count; whole blocks; > 256 absmax blocks (nested)
        w = (torch.randn(shape, generator=g) * 0.02).to(device)
        q = nf4.quantize_nf4(w, blocksize=blocksize, double_quant=nested)
        for dtype in DTYPES:
            got = td.dequantize_nf4(q, dtype=dtype)
            want = nf4.dequantize_nf4(q, dtype=dtype)
            assert got.shape == shape and got.dtype == dtype
            assert torch.equal(got, want), (shape, blocksize, nested, dtype)


def test_nf4_other_storage_and_device_arg(triton):
    """Params4bit(quant_storage=...) bytes under another dtype; the `device` argument; float64 falls back."""
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    q = nf4.quantize_nf4(w, blocksize=64, double_quant=True)
    want = nf4.dequantize_nf4(q, dtype=torch.bfloat16)
    q16 = nf4.NF4Weight(**{**q.__dict__, "packed": q.packed.reshape(-1).view(torch.int16)})
    assert torch.equal(td.dequantize_nf4(q16, dtype=torch.bfloat16, device="cpu"), want)
    assert torch.equal(td.dequantize_nf4(q, dtype=torch.float64), nf4.dequantize_nf4(q, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------------------
# torch.compile: one custom op, no graph break

def test_compile_no_graph_break(triton, monkeypatch):
    """dequantize_raw -> Triton op -> matmul traces as one graph. On CPU the interpreted kernels run eagerly, so the
    backend is 'eager' (tests/gpu/kernel_check.py compiles the real thing with Inductor on CUDA)."""
    monkeypatch.setattr(td, "available", lambda device: True)
    shape = (8, 512)
    raw = random_blocks("Q4_K", shape, seed=0)
    q = nf4.quantize_nf4(torch.randn(shape, generator=torch.Generator().manual_seed(0)), double_quant=True)
    nraw, nmeta, naux = nf4_parts_from_weight(q)
    x = torch.randn(3, 512, dtype=torch.bfloat16)

    def f(x, raw, nraw, naux):
        w1 = dequantize_raw(QWeight(raw, "gguf", shape, {"qtype": "Q4_K"}, {}), x.dtype)
        w2 = dequantize_raw(QWeight(nraw, "nf4", shape, nmeta, naux), x.dtype)
        return x @ w1.T + x @ w2.T

    torch._dynamo.reset()
    explain = torch._dynamo.explain(f)(x, raw, nraw, naux)
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
    compiled = torch.compile(f, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x, raw, nraw, naux), f(x, raw, nraw, naux))
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------------------
# fp8: exact vs fp8.dequantize_fp8 for every byte value

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_fp8_exact_every_byte(triton, fp8, device):
    from kontext_lowvram.optimizations.quant.fp8 import dequantize_fp8
    data = torch.arange(256, dtype=torch.uint8, device=device).repeat(37).view(fp8).reshape(37, 256)
    for scale in (None, torch.tensor(0.0123), torch.tensor([3.5e4])):  # fp16 output overflows to inf with the last
        for dtype in DTYPES:
            got, want = td.dequantize_fp8(data, scale, dtype), dequantize_fp8(data, scale, dtype)
            assert got.shape == want.shape and got.dtype == dtype and got.device == data.device
            same = (got == want) | (got.isnan() & want.isnan())
            assert bool(same.all()), (fp8, scale, dtype, (~same).nonzero()[:4].tolist())
    assert td.dequantize_fp8(data, None, torch.float64).dtype == torch.float64  # other dtypes: torch reference


# ----------------------------------------------------------------------------------------------------------------
# dispatch (no triton needed)

def _forbid(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the Triton path must not be taken here")
    monkeypatch.setattr(td, "dequantize_gguf", boom)
    monkeypatch.setattr(td, "dequantize_nf4", boom)
    monkeypatch.setattr(td, "dequantize_fp8", boom)


def _nf4_parts(shape=(4, 64)):
    q = nf4.quantize_nf4(torch.randn(shape, generator=torch.Generator().manual_seed(0)), double_quant=True)
    return q, *nf4_parts_from_weight(q)


def test_dispatch_cpu_uses_torch(monkeypatch):
    monkeypatch.delenv(td.ENV_DISABLE, raising=False)
    assert not td.available("cpu") and not td.available(torch.device("cpu"))
    _forbid(monkeypatch)
    raw = random_blocks("Q4_K", (2, 256))
    assert torch.equal(dequantize_raw(QWeight(raw, "gguf", (2, 256), {"qtype": "Q4_K"}, {}), torch.bfloat16),
                       gq.dequantize(raw, "Q4_K", (2, 256), torch.bfloat16))
    q, nraw, meta, aux = _nf4_parts()
    assert torch.equal(dequantize_raw(QWeight(nraw, "nf4", q.shape, meta, aux), torch.float16),
                       nf4.dequantize_nf4(q, dtype=torch.float16))
    data = torch.randn(4, 32).to(torch.float8_e4m3fn)
    assert torch.equal(dequantize_raw(QWeight(data, "fp8", (4, 32), {}, {"scale": torch.tensor(0.5)}), torch.bfloat16),
                       (data.float() * 0.5).to(torch.bfloat16))


def test_available_rules(monkeypatch):
    """CUDA + triton importable -> True; KLV_NO_TRITON=1, no triton, or another device type -> False."""
    monkeypatch.setattr(td, "_TRITON_IMPORTABLE", True)
    monkeypatch.setattr(td, "_device_ok", lambda device: True)
    monkeypatch.delenv(td.ENV_DISABLE, raising=False)
    assert td.available("cuda") and td.available(torch.device("cuda", 0))
    assert not td.available("cpu") and not td.available("meta")
    for off in ("1", "true", "yes"):
        monkeypatch.setenv(td.ENV_DISABLE, off)
        assert not td.available("cuda")
    monkeypatch.setenv(td.ENV_DISABLE, "0")
    assert td.available("cuda")
    # triton not importable (as on CI): the cached probe says no
    monkeypatch.setattr(td, "_TRITON_IMPORTABLE", None)
    monkeypatch.setitem(__import__("sys").modules, "triton", None)
    assert not td.available("cuda")


def test_dispatch_chooses_triton_when_available(monkeypatch):
    """Supported GGUF types / NF4 in bf16/fp16/fp32 go to the kernels; other types and dtypes stay on torch."""
    calls = []
    monkeypatch.setattr(td, "available", lambda device: True)
    monkeypatch.setattr(td, "dequantize_gguf", lambda raw, qtype, shape, dtype: calls.append(("gguf", qtype, dtype))
                        or torch.zeros(shape, dtype=dtype))
    monkeypatch.setattr(td, "dequantize_nf4", lambda q, dtype, device: calls.append(("nf4", q.blocksize, dtype))
                        or torch.zeros(q.shape, dtype=dtype))
    for qtype in TYPES:
        shape = (2, _block_size(qtype))
        raw = random_blocks(qtype, shape)
        dequantize_raw(QWeight(raw, "gguf", shape, {"qtype": qtype}, {}), torch.bfloat16)
    raw = random_blocks("Q4_K", (2, 256))
    dequantize_raw(QWeight(raw, "gguf", (2, 256), {"qtype": int(gq.Q.Q4_K)}, {}), torch.float32)  # type id works too
    assert calls == [("gguf", t, torch.bfloat16) for t in TYPES] + [("gguf", int(gq.Q.Q4_K), torch.float32)]
    calls.clear()
    assert {"IQ4_NL", "IQ4_XS", "Q2_K", "Q8_0"} <= set(TYPES)  # every block type has a kernel
    # no kernel: float64 output
    raw = random_blocks("Q8_0", (2, 256))
    dequantize_raw(QWeight(raw, "gguf", (2, 256), {"qtype": "Q8_0"}, {}), torch.float64)
    assert calls == []
    q, nraw, meta, aux = _nf4_parts()
    dequantize_raw(QWeight(nraw, "nf4", q.shape, meta, aux), torch.bfloat16)
    assert calls == [("nf4", 64, torch.bfloat16)]
    assert dequantize_raw(QWeight(nraw, "nf4", q.shape, meta, aux), torch.float64).dtype == torch.float64
    assert len(calls) == 1
    monkeypatch.setattr(td, "dequantize_fp8", lambda data, scale, dtype: calls.append(("fp8", data.dtype, dtype))
                        or torch.zeros(data.shape, dtype=dtype))
    data = torch.zeros(2, 16, dtype=torch.float8_e5m2)
    dequantize_raw(QWeight(data, "fp8", (2, 16), {}, {}), torch.float16)
    dequantize_raw(QWeight(data, "fp8", (2, 16), {}, {}), torch.float64)  # no kernel for float64 output
    assert calls[1:] == [("fp8", torch.float8_e5m2, torch.float16)]


def test_supports_gguf():
    assert all(td.supports_gguf(t, torch.bfloat16) for t in TYPES)
    assert td.supports_gguf(gq.Q.Q6_K, torch.float16) and td.supports_gguf(int(gq.Q.Q8_0), torch.float32)
    assert td.supports_gguf("IQ4_XS", torch.bfloat16) and td.supports_gguf("IQ4_NL", torch.float32)
    assert not td.supports_gguf("BF16", torch.bfloat16)  # float types are not dequantized by a kernel
    assert not td.supports_gguf("Q4_K", torch.float64)
    assert not td.supports_gguf("F16", torch.float16)
    assert not td.supports_gguf("nonsense", torch.float16)


def test_register_op_without_triton_returns_the_plain_function(monkeypatch):
    """Without triton the ops could never run: no registration, so torch logs no "Triton not available" line per
    op when ComfyUI imports the pack on a machine without it."""
    import importlib.util

    def impl(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    assert td.register_op("klv_test_op_without_triton", impl) is impl
    assert not hasattr(torch.ops.kontext_lowvram, "klv_test_op_without_triton")
