"""Fused small-batch matmul (triton_matmul) vs an fp64 matmul of the dequantized weight, and when ops take it.

The kernels run in Triton's interpreter on CPU tensors (no GPU needed; skipped without the `triton` package).
Reference: the weight dequantized by the torch code (gguf.py / nf4.py), rounded to x's dtype as the
dequantize-then-matmul path rounds it, times x in float64. The fused kernel sums in float32 in its own order, so the
bound is the output dtype's rounding (plus float32 summation for fp32).
"""
import pytest
import torch

from kontext_lowvram.optimizations import QTensor, QWeight, quantize
from kontext_lowvram.optimizations.ops import QuantLinear
from kontext_lowvram.optimizations.quant import dequantize_raw, nf4_parts_from_weight
from kontext_lowvram.optimizations.quant import gguf as gq
from kontext_lowvram.optimizations.quant import nf4 as nf4q
from kontext_lowvram.optimizations.quant import triton_dequant as td
from kontext_lowvram.optimizations.quant import triton_matmul as tm
from fixtures.gguf_blocks import random_blocks

TYPES = sorted(gq.BLOCK_TYPES_BY_NAME)
# normwise relative error allowed per output dtype: about one rounding of the output
REL = {torch.float32: 2e-6, torch.bfloat16: 6e-3, torch.float16: 8e-4}


@pytest.fixture(scope="module")
def triton():
    return pytest.importorskip("triton", reason="the Triton kernel tests need the `triton` package (pip install "
                                                "triton); they run in its interpreter, no GPU needed")


def _gguf(qtype, shape, seed):
    return random_blocks(qtype, shape, seed=seed, std=0.05), {"qtype": qtype}, {}


def _nf4(shape, seed, nested, blocksize=64):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.05
    return nf4_parts_from_weight(nf4q.quantize_nf4(w, blocksize=blocksize, double_quant=nested))


def _check(qformat, raw, meta, aux, shape, rows, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, shape[1], generator=g).to(dtype)
    b = (torch.randn(shape[0], generator=g) * 0.1) if bias else None
    got = tm.linear(x, QWeight(raw, qformat, shape, meta, aux), b)
    assert got.shape == (rows, shape[0]) and got.dtype == dtype
    w = dequantize_raw(QWeight(raw, qformat, shape, meta, aux), dtype)  # torch reference (CPU), rounded to x's dtype
    want = x.double() @ w.double().T + (b.to(dtype).double() if bias else 0)
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err <= REL[dtype], (qformat, meta, shape, rows, dtype, err)
    return got


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("qtype", TYPES)
def test_gguf_matches_fp64(triton, qtype, dtype):
    block = gq.BLOCK_TYPES_BY_NAME[qtype].block
    # output rows not a multiple of a program's tile; K of 1, 3 and 9 blocks (not a multiple of the K step)
    for i, (shape, rows, bias) in enumerate([((70, 3 * block), 1, True), ((19, block), 4, False),
                                             ((40, 9 * block), 2, True)]):
        _check("gguf", *_gguf(qtype, shape, i), shape, rows, dtype, bias, seed=i)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("blocksize", [64, 256])
def test_nf4_matches_fp64(triton, nested, blocksize):
    for i, (shape, rows, dtype) in enumerate([((37, 3 * blocksize), 1, torch.bfloat16),
                                              ((16, 5 * blocksize), 3, torch.float32),
                                              ((9, blocksize), 2, torch.float16)]):
        _check("nf4", *_nf4(shape, i, nested, blocksize), shape, rows, dtype, bias=i != 1, seed=i)


def test_batched_and_strided_input(triton):
    """x of shape (batch, tokens, K) and a non-contiguous x: same as the 2-D contiguous call."""
    shape = (24, 512)
    raw, meta, aux = _gguf("Q4_K", shape, 3)
    x = torch.randn(2, 1, 1024)[..., ::2]  # stride 2 along K
    got = tm.linear(x, QWeight(raw, "gguf", shape, meta, aux))
    assert got.shape == (2, 1, 24)
    assert torch.equal(got.reshape(2, 24), tm.linear(x.reshape(2, 512).contiguous(), QWeight(raw, "gguf", shape, meta, aux)))


def test_supports_rules():
    x1 = torch.zeros(1, 256, dtype=torch.bfloat16)
    assert tm.supports("gguf", {"qtype": "Q8_0"}, (8, 256), x1)
    assert tm.supports("gguf", {"qtype": int(gq.Q.Q6_K)}, (8, 256), torch.zeros(tm.MAX_ROWS, 256))
    assert not tm.supports("gguf", {"qtype": "Q8_0"}, (8, 256), torch.zeros(tm.MAX_ROWS + 1, 256))  # many rows
    assert not tm.supports("gguf", {"qtype": "Q8_0"}, (8, 256), torch.zeros(0, 256))
    assert not tm.supports("gguf", {"qtype": "F16"}, (8, 256), x1)                     # no kernel for the type
    assert not tm.supports("gguf", {"qtype": "Q8_0"}, (8, 256), x1.double())         # dtype
    assert not tm.supports("gguf", {"qtype": "Q8_0"}, (8, 128), x1)                  # K mismatch
    assert tm.supports("fp8", {}, (8, 96), torch.zeros(1, 96))                      # fp8: any K
    assert tm.supports("nf4", {"blocksize": 64}, (8, 256), x1)
    assert not tm.supports("nf4", {"blocksize": 64}, (8, 96), torch.zeros(1, 96))     # rows cross absmax blocks


# ----------------------------------------------------------------------------------------------------------------
# when the quantized ops take it

def _layer(fmt="Q8_0"):
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    return QuantLinear(quantize(w, fmt), torch.randn(48) * 0.1)


def _spy(monkeypatch):
    calls = []
    real = tm.linear
    monkeypatch.setattr(tm, "linear", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    return calls


@pytest.mark.parametrize("fmt", ["Q8_0", "fp8_e4m3fn_scaled"])
def test_ops_take_it_only_when_switched_on(triton, monkeypatch, fmt):
    monkeypatch.setattr(td, "available", lambda device: True)  # pretend CPU is a GPU: kernels run interpreted
    calls = _spy(monkeypatch)
    layer = _layer(fmt)
    layer.fp8_matmul = True  # fp8: its own fp8 matmul is for 16 rows or more; fewer take the fused kernel
    x = torch.randn(1, 2, 256).to(torch.bfloat16)
    monkeypatch.delenv(tm.ENV_ENABLE, raising=False)
    off = layer(x)
    assert calls == []                                          # default: off
    monkeypatch.setenv(tm.ENV_ENABLE, "1")
    on = layer(x)
    assert calls == [x.shape]
    assert ((on.double() - off.double()).norm() / off.double().norm()).item() < REL[torch.bfloat16]
    layer(torch.randn(tm.MAX_ROWS + 1, 256).to(torch.bfloat16))  # many rows: dequantize + matmul
    assert len(calls) == 1
    monkeypatch.setattr(td, "available", lambda device: False)   # no Triton on this device
    layer(x)
    assert len(calls) == 1


def test_ops_fused_with_lora(triton, monkeypatch):
    """A low-rank LoRA delta is added to the fused output; a weight function that needs the dense weight keeps the
    dequantize path."""
    from kontext_lowvram.optimizations.lora import LowRankDelta
    monkeypatch.setattr(td, "available", lambda device: True)
    monkeypatch.setenv(tm.ENV_ENABLE, "1")
    calls = _spy(monkeypatch)
    layer = _layer("nf4")
    g = torch.Generator().manual_seed(1)
    up, down = torch.randn(48, 4, generator=g) * 0.1, torch.randn(4, 256, generator=g) * 0.1
    x = torch.randn(2, 256, generator=g)
    base = layer(x)
    layer.weight_function = [LowRankDelta(up, down, 4.0, 0.5)]
    got = layer(x)
    assert len(calls) == 2
    want = base.double() + 0.5 * (x.double() @ (up.double() @ down.double()).T)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    layer.weight_function = [lambda w: w * 2]
    torch.testing.assert_close(layer(x), 2 * base - layer.bias, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn_scaled", "fp8_e5m2_scaled", "fp8_e4m3fn"])
def test_fp8_matches_fp64(triton, fmt):
    for i, (shape, rows, dtype, bias) in enumerate([((37, 96), 1, torch.bfloat16, True),
                                                    ((16, 600), 3, torch.float32, False),
                                                    ((9, 32), 4, torch.float16, True)]):
        w = torch.randn(shape, generator=torch.Generator().manual_seed(i)) * 0.05
        qw = quantize(w, fmt)
        assert isinstance(qw, QTensor) and qw.qformat == "fp8"
        assert tm.supports(qw.qformat, qw.meta, qw.qshape, torch.zeros(rows, shape[1], dtype=dtype))
        _check("fp8", qw.raw, qw.meta, qw.aux, shape, rows, dtype, bias, seed=i)


def test_fp8_decodes_every_byte(triton):
    """Each of the 256 byte values of e4m3fn and e5m2 (NaN, inf, subnormals, ±0) decodes as torch converts it: a
    256×1 weight of all bytes times x = [1]."""
    raw = torch.arange(256, dtype=torch.uint8).reshape(256, 1)
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        w = raw.view(dtype)
        got = tm.linear(torch.ones(1, 1), QWeight(w, "fp8", (256, 1), {}, {})).flatten()
        want = w.float().flatten()
        same = (got == want) | (got.isnan() & want.isnan())
        assert bool(same.all()), (dtype, (~same).nonzero().flatten()[:8].tolist())


@pytest.mark.parametrize("fmt", ["Q4_K", "nf4", "fp8_e4m3fn_scaled"])
def test_fused_paths_trace_without_graph_breaks(triton, monkeypatch, fmt):
    """torch.compile(fullgraph=True) through the fused small-batch matmul (1 row) and the one-pass LoRA merge
    (many rows): the dispatch (switches, support rules, stacked LoRA factors) and the custom ops trace as one graph."""
    from kontext_lowvram.optimizations.lora import LowRankDelta
    from kontext_lowvram.optimizations.quant import triton_lora as tlr
    monkeypatch.setattr(td, "available", lambda device: True)
    monkeypatch.setenv(tm.ENV_ENABLE, "1")
    monkeypatch.setenv(tlr.ENV_ENABLE, "1")
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    if fmt == "Q4_K":
        qw = QTensor(random_blocks("Q4_K", (32, 256), std=0.05), qformat="gguf", shape=(32, 256),
                     meta={"qtype": "Q4_K"})
    else:
        qw = quantize(torch.randn(32, 256, generator=g) * 0.05, fmt)
    layer = QuantLinear(qw)
    layer.weight_function = [LowRankDelta(torch.randn(32, 4, generator=g), torch.randn(4, 256, generator=g), 4.0,
                                          0.5)]
    graphs = []

    def backend(gm, example_inputs):  # eager, keeping the graph to look at
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    ops = {"Q4_K": ("gguf_matmul", "gguf_dequant_lora"), "nf4": ("nf4_matmul", "nf4_dequant_lora"),
           "fp8_e4m3fn_scaled": ("fp8_matmul_small", None)}[fmt]
    for rows, op in zip((1, 300), ops):  # fused matmul (+ LoRA on the output); dequant with the LoRA merged in
        x = torch.randn(rows, 256, generator=g)
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)
        if op is not None:
            targets = {str(n.target) for n in graphs[-1].graph.nodes if n.op == "call_function"}
            assert any(op in t for t in targets), (op, targets)
