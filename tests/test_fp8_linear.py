"""Real fp8 matmul (`_scaled_mm` with a dynamic per-tensor or per-row activation scale) vs an fp64 reference, and
the Triton activation-quantization kernels (in Triton's interpreter) vs the eager torch code."""
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


def test_rowwise_activation_quantization_scales_each_row_by_its_absmax():
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(2)) * torch.logspace(-2, 3, 8)[:, None]
    x[3] = 0  # an all-zero row (padding tokens) gets the floor scale, not a division by zero
    xq, scale = fl.quantize_activation_eager(x, rowwise=True)
    assert xq.dtype == torch.float8_e4m3fn and scale.shape == (8, 1)
    want = (x.abs().amax(dim=1, keepdim=True) / 448).clamp(min=1e-12)
    assert torch.allclose(scale, want, rtol=1e-6, atol=0)
    back = xq.float() * scale
    assert torch.equal(back[3], torch.zeros(128))
    # every row uses the whole e4m3 range: relative error <= 2^-4 per element (plus the subnormal floor)
    assert ((back - x).abs() <= x.abs() / 16 + scale * 2 ** -9).all()


def _rows_of_different_magnitude(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(96, 256, generator=g) * 0.05
    # Tokens whose magnitudes span 10^6 (an outlier token among ordinary ones): under one scale the small ones fall
    # into e4m3's subnormal range (below 2^-6 of the scale), per row each keeps its 3 mantissa bits.
    x = (torch.randn(2, 40, 256, generator=g) * torch.logspace(-2, 4, 40)[None, :, None]).to(torch.bfloat16)
    return w, x


def test_rowwise_fp8_linear_matches_fp64_reference_and_beats_per_tensor_scaling():
    w, x = _rows_of_different_magnitude(3)
    b = torch.randn(96, generator=torch.Generator().manual_seed(4)) * 0.01
    qw = quantize(w, "fp8_e4m3fn_scaled")
    ref = x.double() @ dequantize(qw, torch.float64).T + b.double()
    out_row = fl.fp8_linear(x, qw.raw, qw.aux["scale"], b.to(torch.bfloat16), rowwise=True)
    out_tensor = fl.fp8_linear(x, qw.raw, qw.aux["scale"], b.to(torch.bfloat16), rowwise=False)
    assert out_row.dtype == torch.bfloat16 and out_row.shape == (2, 40, 96)

    def row_rel(out):  # error of each token's output relative to that token's output
        return ((out.double() - ref).norm(dim=-1) / ref.norm(dim=-1)).flatten()

    err_row, err_tensor = row_rel(out_row), row_rel(out_tensor)
    assert err_row.max() < 0.04, err_row.max()  # every token at e4m3 precision
    assert err_tensor[:10].mean() > 4 * err_row[:10].mean(), (err_tensor[:10].mean(), err_row[:10].mean())


def test_rowwise_is_opt_in_and_bf16_only(monkeypatch):
    x = torch.zeros(4, 16, dtype=torch.bfloat16)
    monkeypatch.delenv(fl.ENV_ROWWISE, raising=False)
    assert not fl.rowwise_enabled(x)
    monkeypatch.setenv(fl.ENV_ROWWISE, "1")
    assert fl.rowwise_enabled(x)
    assert not fl.rowwise_enabled(x.half())  # the row-wise _scaled_mm writes bf16 only
    calls = []
    real = fl.quantize_activation
    monkeypatch.setattr(fl, "quantize_activation", lambda x2, rowwise=False: calls.append(rowwise) or real(x2, rowwise))
    w, xb = _rows_of_different_magnitude(5)
    qw = quantize(w, "fp8_e4m3fn_scaled")
    fl.fp8_linear(xb, qw.raw, qw.aux["scale"])
    fl.fp8_linear(xb.half(), qw.raw, qw.aux["scale"])
    assert calls == [True, False]


def _e4m3_edge_values():
    """Every e4m3 value, the midpoints between neighbours (ties, rounded to even), and just either side of them."""
    codes = torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448, no NaN
    mid = (codes[1:] + codes[:-1]) / 2
    vals = torch.cat([codes, mid, torch.nextafter(mid, codes[1:]), torch.nextafter(mid, codes[:-1])])
    return torch.cat([vals, -vals])


@pytest.mark.parametrize("whole_row_max", [16384, 1024])  # rows held in registers / rows swept twice
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_activation_kernels_equal_the_eager_code(dtype, whole_row_max, monkeypatch):
    pytest.importorskip("triton", reason="the Triton kernel tests need the `triton` package (pip install triton); "
                                         "they run in its interpreter, no GPU needed")
    from kontext_lowvram.optimizations import fp8_triton
    monkeypatch.setattr(fp8_triton, "WHOLE_ROW_MAX", whole_row_max)
    monkeypatch.setattr(fp8_triton, "ROW_BLOCK", 512)
    assert fp8_triton.row_tile(3000)[1] == (whole_row_max >= 3000)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(21, 3000, generator=g) * torch.logspace(-4, 4, 21)[:, None]  # rows longer than a row step
    x[4] = 0
    x[5, :5] = torch.tensor([1e-30, -0.0, 0.0, 3.0, -7.0])
    x = x.to(dtype)
    for rowwise in (False, True):
        got, got_scale = (fp8_triton.quantize_per_row if rowwise else fp8_triton.quantize_per_tensor)(x, 448.0)
        want, want_scale = fl.quantize_activation_eager(x, rowwise)
        assert got.dtype == torch.float8_e4m3fn and got_scale.shape == want_scale.shape
        assert torch.equal(got_scale, want_scale)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    # the rounding itself, at every tie and either side of it: one tensor whose amax is 448 (scale exactly 1)
    edges = _e4m3_edge_values()[None]
    got, scale = fp8_triton.quantize_per_tensor(edges, 448.0)
    assert scale.item() == 1.0
    assert torch.equal(got.view(torch.uint8), edges.to(torch.float8_e4m3fn).view(torch.uint8))


@pytest.mark.parametrize("rowwise", [False, True])
def test_fp8_path_traces_as_one_graph(rowwise, monkeypatch):
    """torch.compile(fullgraph=True) through QuantLinear's fp8 tensor-core path: the activation quantization is one
    custom op (per tensor or per row) next to _scaled_mm, and the compiled layer computes what the eager one does."""
    pytest.importorskip("triton", reason="the Triton kernel tests need the `triton` package (pip install triton); "
                                         "they run in its interpreter, no GPU needed")
    import kontext_lowvram.optimizations.ops as ops
    from kontext_lowvram.optimizations.quant import triton_dequant as td
    monkeypatch.setattr(td, "available", lambda device: True)  # the interpreted kernels stand in for the GPU's
    monkeypatch.setattr(ops, "use_fp8_matmul", lambda w, x: True)
    monkeypatch.setenv(fl.ENV_ROWWISE, "1" if rowwise else "0")
    torch._dynamo.reset()
    w, x = _rows_of_different_magnitude(7)
    layer = QuantLinear(quantize(w, "fp8_e4m3fn_scaled"), torch.randn(96) * 0.01, fp8_matmul=True)
    graphs = []

    def backend(gm, example_inputs):  # eager, keeping the graph to look at
        graphs.append(gm)
        return gm.forward

    got = torch.compile(layer, fullgraph=True, backend=backend)(x)
    assert torch.equal(got, layer(x))
    code = graphs[0].code
    assert ("fp8_act_quant_rows" if rowwise else "fp8_act_quant_tensor") in code and "_scaled_mm" in code
    assert len(graphs) == 1
