"""Quantized linear vs an fp64 matmul of the dequantized weight (independent reference)."""
import pytest
import torch

from kontext_lowvram.optimizations import QTensor, dequantize, quantize
from kontext_lowvram.optimizations.ops import QuantLinear, is_quantized
from fixtures.gguf_blocks import random_blocks

FORMATS = ["Q8_0", "Q4_0", "fp8_e4m3fn_scaled", "fp8_e5m2_scaled", "nf4"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_quant_linear_matches_reference(fmt):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g) * 0.02
    b = torch.randn(96, generator=g) * 0.01
    x = torch.randn(3, 7, 256, generator=g)
    qw = quantize(w, fmt)
    assert isinstance(qw, QTensor) and qw.shape == w.shape
    layer = QuantLinear(qw, b)
    assert is_quantized(layer) and layer.weight.dtype in (torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2)
    ref = x.double() @ dequantize(qw, torch.float64).T + b.double()
    out = layer(x)
    assert out.shape == (3, 7, 96)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    out_bf16 = layer(x.to(torch.bfloat16))
    assert out_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf16.double(), ref, rtol=0.05, atol=0.02)
    # the quantized storage is what stays resident
    assert layer.weight.numel() * layer.weight.element_size() < w.numel() * 2


def test_aux_tensors_travel_with_the_module():
    layer = QuantLinear(quantize(torch.randn(64, 128), "nf4"))
    layer.to(torch.device("meta"))
    assert all(b.device.type == "meta" for b in layer.buffers())
    assert "klv_aux_absmax" not in layer.state_dict()  # statistics are not persistent state


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_K", "nf4", "fp8_e4m3fn_scaled"])
def test_quantized_forward_traces_without_graph_breaks(fmt):
    """torch.compile(fullgraph=True) fails on any graph break in the hot path (dequant + LoRA + matmul)."""
    from kontext_lowvram.optimizations.lora import LowRankDelta
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    if fmt == "Q4_K":
        qw = QTensor(random_blocks("Q4_K", (64, 256), std=0.02), qformat="gguf", shape=(64, 256), meta={"qtype": "Q4_K"})
    else:
        qw = quantize(torch.randn(64, 256, generator=g) * 0.02, fmt)
    layer = QuantLinear(qw)
    layer.weight_function = [LowRankDelta(torch.randn(64, 4, generator=g), torch.randn(4, 256, generator=g), 4.0, 0.5)]
    x = torch.randn(300, 256, generator=g)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)
