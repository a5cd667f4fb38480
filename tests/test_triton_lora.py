"""One-pass dequantize + LoRA merge (triton_lora) vs the exact W + U·D, and when the quantized ops take it.

Kernels run in Triton's interpreter on CPU tensors (no GPU; skipped without the `triton` package). Reference:
the torch dequantization in float32 plus U·D in float64, rounded once to the output dtype. The kernel also rounds
once, so bf16/fp16 results equal that rounding except where float32 accumulation lands on a rounding tie; the
two-step path (dequantize to bf16, then addmm) rounds twice and is the bound it must never exceed.
"""
import pytest
import torch

from kontext_lowvram.optimizations import QWeight, quantize
from kontext_lowvram.optimizations.lora import LowRankDelta, stacked_factors
from kontext_lowvram.optimizations.ops import QuantLinear, dequantize_module_weight
from kontext_lowvram.optimizations.quant import dequantize_raw, nf4_parts_from_weight
from kontext_lowvram.optimizations.quant import gguf as gq
from kontext_lowvram.optimizations.quant import nf4 as nf4q
from kontext_lowvram.optimizations.quant import triton_dequant as td
from kontext_lowvram.optimizations.quant import triton_lora as tlr
from fixtures.gguf_blocks import random_blocks

TYPES = sorted(gq.BLOCK_TYPES_BY_NAME)


@pytest.fixture(scope="module")
def triton():
    return pytest.importorskip("triton", reason="the Triton kernel tests need the `triton` package (pip install "
                                                "triton); they run in its interpreter, no GPU needed")


def _check(qformat, raw, meta, aux, shape, dtype, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    up = (torch.randn(shape[0], rank, generator=g) * 0.05).to(dtype)
    down = (torch.randn(rank, shape[1], generator=g) * 0.05).to(dtype)
    q = QWeight(raw, qformat, shape, meta, aux)
    got = tlr.dequantize_with_lora(q, dtype, up, down)
    assert got.shape == shape and got.dtype == dtype
    exact = dequantize_raw(q, torch.float32).double() + up.double() @ down.double()
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), exact, rtol=1e-6, atol=1e-7)
        return
    two_step = dequantize_raw(q, dtype).addmm_(up, down)
    assert (got == exact.to(dtype)).double().mean().item() >= 0.999, (qformat, meta, dtype, rank)
    assert (got.double() - exact).abs().max() <= (two_step.double() - exact).abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("qtype", TYPES)
def test_gguf_lora_merge(triton, qtype, dtype):
    block = gq.BLOCK_TYPES_BY_NAME[qtype].block
    # rows not a multiple of the tile, K of 1 and 9 blocks; ranks below 16, between 16 and 32, above 32
    for i, (shape, rank) in enumerate([((37, 9 * block), 8), ((16, block), 20), ((21, 3 * block), 48)]):
        raw = random_blocks(qtype, shape, seed=i, std=0.05)
        _check("gguf", raw, {"qtype": qtype}, {}, shape, dtype, rank, seed=i)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("blocksize", [64, 256])
def test_nf4_lora_merge(triton, nested, blocksize):
    for i, (shape, rank, dtype) in enumerate([((33, 3 * blocksize), 32, torch.bfloat16),
                                              ((16, blocksize), 4, torch.float32),
                                              ((20, 5 * blocksize), 40, torch.float16)]):
        w = torch.randn(shape, generator=torch.Generator().manual_seed(i)) * 0.05
        raw, meta, aux = nf4_parts_from_weight(nf4q.quantize_nf4(w, blocksize=blocksize, double_quant=nested))
        _check("nf4", raw, meta, aux, shape, dtype, rank, seed=i)


def test_supports_rules():
    assert tlr.supports("gguf", {"qtype": "Q4_K"}, (8, 256), torch.bfloat16, 32)
    assert tlr.supports("gguf", {"qtype": "IQ4_NL"}, (8, 256), torch.bfloat16, 32)
    assert not tlr.supports("gguf", {"qtype": "F16"}, (8, 256), torch.bfloat16, 32)  # no kernel for the type
    assert not tlr.supports("gguf", {"qtype": "Q4_K"}, (8, 256), torch.float64, 32)
    assert not tlr.supports("gguf", {"qtype": "Q4_K"}, (8, 256), torch.bfloat16, tlr.MAX_RANK + 1)
    assert not tlr.supports("fp8", {}, (8, 256), torch.bfloat16, 4)
    assert tlr.supports("nf4", {"blocksize": 64}, (8, 128), torch.float16, 4)
    assert not tlr.supports("nf4", {"blocksize": 64}, (8, 96), torch.float16, 4)


def test_stacked_factors():
    g = torch.Generator().manual_seed(0)
    a = LowRankDelta(torch.randn(12, 4, generator=g), torch.randn(4, 8, generator=g), alpha=2.0, strength=0.5)
    b = LowRankDelta(torch.randn(12, 2, generator=g), torch.randn(2, 8, generator=g), strength=-1.5)
    up, down = stacked_factors([a, b], "cpu", torch.float64)
    want = a.scale * a.up.double() @ a.down.double() + b.scale * b.up.double() @ b.down.double()
    torch.testing.assert_close(up @ down, want)
    assert stacked_factors([a], "cpu", torch.float32)[0].shape == (12, 4)
    c = LowRankDelta(torch.randn(4, 2, generator=g), torch.randn(2, 8, generator=g), offset=(0, 4, 4))
    assert stacked_factors([a, c], "cpu", torch.float32) is None   # a slice of the output rows: not stacked


# ----------------------------------------------------------------------------------------------------------------
# when the quantized ops take it

def _lora_layer(fmt, offset=None):
    g = torch.Generator().manual_seed(0)
    layer = QuantLinear(quantize(torch.randn(32, 128, generator=g) * 0.05, fmt), torch.randn(32, generator=g) * 0.1)
    n = offset[2] if offset else 32
    deltas = [LowRankDelta(torch.randn(n, 8, generator=g) * 0.1, torch.randn(8, 128, generator=g) * 0.1, 16.0, 0.7,
                           offset),
              LowRankDelta(torch.randn(n, 4, generator=g) * 0.1, torch.randn(4, 128, generator=g) * 0.1, None, 1.0,
                           offset)]
    return layer, deltas


def _spy(monkeypatch):
    calls = []
    real = tlr.dequantize_with_lora
    monkeypatch.setattr(tlr, "dequantize_with_lora", lambda *a, **k: calls.append(a[-2].shape) or real(*a, **k))
    return calls


@pytest.mark.parametrize("fmt", ["Q8_0", "nf4"])
def test_ops_merge_in_the_kernel_when_switched_on(triton, monkeypatch, fmt):
    monkeypatch.setattr(td, "available", lambda device: True)  # pretend CPU is a GPU: kernels run interpreted
    calls = _spy(monkeypatch)
    layer, deltas = _lora_layer(fmt)
    layer.weight_function = deltas
    x = torch.randn(200, 128, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)  # rows > in_features
    monkeypatch.delenv(tlr.ENV_ENABLE, raising=False)
    two_step = layer(x)
    assert calls == []                                          # default: off
    monkeypatch.setenv(tlr.ENV_ENABLE, "1")
    fused = layer(x)
    assert calls == [(32, 12)]                                  # both LoRAs stacked: rank 8 + 4
    w = layer.weight_function
    exact = (x.double() @ (dequantize_module_weight(layer, layer.weight, torch.float32).double()
                           + sum(d.scale * d.up.double() @ d.down.double() for d in w)).T + layer.bias.double())
    for out in (fused, two_step):
        assert ((out.double() - exact).norm() / exact.norm()).item() < 5e-3
    layer(x[:4])                                                # few rows: LoRA goes on the output, no merge
    assert len(calls) == 1


def test_ops_keep_two_step_merge_for_offsets(triton, monkeypatch):
    monkeypatch.setattr(td, "available", lambda device: True)
    monkeypatch.setenv(tlr.ENV_ENABLE, "1")
    calls = _spy(monkeypatch)
    layer, deltas = _lora_layer("Q8_0", offset=(0, 8, 16))
    layer.weight_function = deltas
    x = torch.randn(200, 128)
    out = layer(x)
    assert calls == []
    layer.weight_function = []
    plain = layer(x)
    assert torch.allclose(out[:, :8], plain[:, :8]) and torch.allclose(out[:, 24:], plain[:, 24:])
    assert not torch.allclose(out[:, 8:24], plain[:, 8:24])
