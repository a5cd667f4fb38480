"""Real fp8 matmul (`_scaled_mm` with dynamic per-tensor activation scale) vs an fp64 reference."""
import pytest
import torch

from kontext_lowvram.optimizations import dequantize, quantize
from kontext_lowvram.optimizations import fp8_linear as fl
from kontext_lowvram.optimizations.ops import QuantLinear


def test_activation_quantization_is_per_tensor_absmax():
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 300  # FLUX activations reach 100s
    xq, scale = fl.quantize_activation_eager(x)
    assert xq.dtype == torch.float8_e4m3fn
    assert scale.item() == pytest.approx(x.abs().max().item() / 448, rel=1e-6)
    back = xq.float() * scale
    assert back.abs().max() <= x.abs().max() * (1 + 1e-6)  # nothing saturates
    # e4m3 keeps 3 mantissa bits: relative error per element <= 2^-4 (plus subnormal floor)
    assert ((back - x).abs() <= x.abs() / 16 + scale * 2 ** -9).all()


@pytest.mark.parametrize("scaled", [True, False])
def test_fp8_linear_matches_fp64_reference(scaled):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 256, generator=g) * 0.05
    b = torch.randn(96, generator=g) * 0.01
    x = (torch.randn(2, 40, 256, generator=g) * 20).to(torch.bfloat16)
    qw = quantize(w, "fp8_e4m3fn_scaled" if scaled else "fp8_e4m3fn")
    data, scale = qw.raw, qw.aux.get("scale")
    out = fl.fp8_linear(x, data, scale, b.to(torch.bfloat16))
    ref = x.double() @ dequantize(qw, torch.float64).T + b.double()
    assert out.dtype == torch.bfloat16 and out.shape == (2, 40, 96)
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    # activation rounding to e4m3 (<= 2^-4 per element, ~2^-6 RMS) is the only extra error
    assert rel < 0.03, rel
    upcast = QuantLinear(qw, b)(x)
    rel_upcast = ((upcast.double() - ref).norm() / ref.norm()).item()
    assert rel_upcast < rel  # the reference is not fooled: upcasting is the more exact path


def test_dispatch_rules(monkeypatch):
    w8 = torch.zeros(64, 128, dtype=torch.float8_e4m3fn)
    x = torch.zeros(32, 128, dtype=torch.bfloat16)
    assert not fl.use_fp8_matmul(w8, x)  # the CPU upcasts (its _scaled_mm is no faster)
    monkeypatch.setattr(fl, "fp8_matmul_supported", lambda device: True)
    assert fl.use_fp8_matmul(w8, x)
    assert not fl.use_fp8_matmul(w8.to(torch.float8_e5m2), x)        # e5m2 weights upcast
    assert not fl.use_fp8_matmul(w8, x[:1])                           # a single row (modulation) upcasts
    assert not fl.use_fp8_matmul(torch.zeros(64, 120, dtype=torch.float8_e4m3fn), x[:, :120])  # K % 16
    assert not fl.use_fp8_matmul(w8, x.float())                       # fp32 compute keeps full precision


def test_quant_linear_takes_fp8_path_when_dispatch_allows(monkeypatch):
    calls = []
    real = fl.fp8_linear
    import kontext_lowvram.optimizations.ops as ops
    monkeypatch.setattr(ops, "use_fp8_matmul", lambda w, x: True)
    monkeypatch.setattr(ops, "fp8_linear", lambda *a: calls.append(1) or real(*a))
    w = torch.randn(64, 128) * 0.05
    layer = QuantLinear(quantize(w, "fp8_e4m3fn_scaled"), fp8_matmul=True)
    x = torch.randn(32, 128).to(torch.bfloat16)
    out = layer(x)
    assert calls and out.shape == (32, 64)
    layer.fp8_matmul = False
    layer(x)
    assert len(calls) == 1  # the option turns it off
