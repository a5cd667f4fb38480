"""LoRA on quantized weights as a low-rank product vs the merged-weight reference (ComfyUI's LoRA math)."""
from types import SimpleNamespace

import pytest
import torch

from kontext_lowvram.optimizations import dequantize, quantize
from kontext_lowvram.optimizations.lora import LowRankDelta, lora_adapter_factors, plan_low_rank
from kontext_lowvram.optimizations.ops import QuantLinear


def merged_reference(w, up, down, alpha, strength):
    """ComfyUI's LoRAAdapter.calculate_weight: W + strength * (alpha / rank) * up @ down (fp64 here)."""
    return w.double() + strength * (alpha / down.shape[0]) * (up.double() @ down.double())


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "nf4", "fp8_e4m3fn_scaled"])
def test_low_rank_lora_equals_merged_weight(fmt):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g) * 0.02
    up, down = torch.randn(96, 8, generator=g) * 0.1, torch.randn(8, 256, generator=g) * 0.1
    x = torch.randn(3, 5, 256, generator=g)
    qw = quantize(w, fmt)
    layer = QuantLinear(qw)
    layer.weight_function = [LowRankDelta(up, down, alpha=4.0, strength=0.7)]
    ref = x.double() @ merged_reference(dequantize(qw, torch.float64), up, down, 4.0, 0.7).T
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)
    assert layer.weight.dtype in (torch.uint8, torch.float8_e4m3fn)  # the base is never merged


def test_strength_change_reuses_cast_factors_and_base():
    up, down = torch.randn(32, 4), torch.randn(4, 64)
    d = LowRankDelta(up, down, alpha=None, strength=1.0)
    x = torch.randn(10, 64, dtype=torch.bfloat16)
    d.apply(x, torch.zeros(10, 32, dtype=torch.bfloat16))
    d2 = d.with_strength(-0.5)
    assert d2.factors(x.device, x.dtype)[0] is d.factors(x.device, x.dtype)[0]  # no re-cast
    out = d2.apply(x.float(), torch.zeros(10, 32))
    torch.testing.assert_close(out, -0.5 * (x.float() @ down.T @ up.T), rtol=1e-4, atol=1e-4)
    assert d.strength == 1.0


def test_offset_targets_a_slice_of_a_fused_weight():
    # diffusers-format FLUX LoRAs patch q, k, v separately into the fused qkv Linear: offset (0, start, len)
    g = torch.Generator().manual_seed(2)
    w = torch.randn(3 * 32, 64, generator=g) * 0.02
    up, down = torch.randn(32, 4, generator=g), torch.randn(4, 64, generator=g)
    d = LowRankDelta(up, down, alpha=2.0, strength=1.0, offset=(0, 32, 32))
    x = torch.randn(7, 64, generator=g)
    layer = QuantLinear(quantize(w, "Q8_0"))
    layer.weight_function = [d]
    merged = dequantize(quantize(w, "Q8_0"), torch.float64).clone()
    merged[32:64] += 0.5 * (up.double() @ down.double())
    torch.testing.assert_close(layer(x).double(), x.double() @ merged.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d(dequantize(quantize(w, "Q8_0"))).double(), merged, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        LowRankDelta(up, down, offset=(1, 0, 4))


def test_merge_fallback_for_dense_layers():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 8, dtype=torch.float64, generator=g)
    up, down = torch.randn(16, 2, generator=g), torch.randn(2, 8, generator=g)
    merged = LowRankDelta(up, down, alpha=1.0, strength=2.0)(w)
    assert merged.dtype == torch.float64
    # the delta is formed in float32 (as ComfyUI's LoRA math does by default), then added
    torch.testing.assert_close(merged, merged_reference(w, up, down, 1.0, 2.0), rtol=1e-6, atol=1e-6)


def test_plan_keeps_only_plain_lora_on_quantized_weights():
    up, down = torch.randn(16, 2), torch.randn(2, 8)
    lora = SimpleNamespace(name="lora", weights=(up, down, torch.tensor(2.0), None, None, None))
    dora = SimpleNamespace(name="lora", weights=(up, down, None, None, torch.ones(16, 1), None))
    loha = SimpleNamespace(name="loha", weights=(up, down))
    patches = {"q.weight": lora, "dense.weight": lora, "dora.weight": dora, "loha.weight": loha,
               ("fused.weight", (0, 8, 16)): lora, ("odd.weight", (1, 0, 4)): lora, "q.bias": ("diff", (up,))}
    low, rest = plan_low_rank(patches, lambda key: key != "dense.weight")
    assert set(low) == {"q.weight", "fused.weight"}
    assert low["fused.weight"][0].offset == (0, 8, 16)
    assert low["q.weight"][0].alpha_scale == pytest.approx(1.0)  # alpha 2 / rank 2
    assert set(rest) == {"dense.weight", "dora.weight", "loha.weight", ("odd.weight", (1, 0, 4)), "q.bias"}
    assert lora_adapter_factors(("lora", (up, down, None, None, None, None)))[2] is None


def test_move_to_reports_memory_and_drops_copies_on_unload():
    up, down = torch.randn(32, 4), torch.randn(4, 64)
    d = LowRankDelta(up, down)
    d.factors(torch.device("cpu"), torch.bfloat16)
    assert d.move_to(None) == 0
    assert d.move_to(torch.device("meta")) == up.nbytes + down.nbytes  # loading to an accelerator: counted
    assert not d._cast  # the cpu copy is not kept for a model living elsewhere
    d.factors(torch.device("cpu"), torch.bfloat16)
    assert d.move_to("cpu") == 0 and d._cast  # offloaded to the CPU: nothing held on a GPU


@pytest.mark.parametrize("rows", [4, 300])  # fewer rows than in_features: output path; more: merged path
def test_both_application_paths_equal_the_merged_reference(rows):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(48, 128, generator=g) * 0.02
    up, down = torch.randn(48, 4, generator=g) * 0.1, torch.randn(4, 128, generator=g) * 0.1
    x = torch.randn(rows, 128, generator=g)
    qw = quantize(w, "Q8_0")
    layer = QuantLinear(qw)
    layer.weight_function = [LowRankDelta(up, down, alpha=2.0, strength=1.5, offset=None)]
    before = layer.weight.clone()
    ref = x.double() @ merged_reference(dequantize(qw, torch.float64), up, down, 2.0, 1.5).T
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.weight, before)  # the stored quantized weight is untouched


def test_merge_never_writes_into_stored_float_weights():
    # GGUF F16 "dequantizes" to a view of its stored bytes: the merge must work on a copy
    from kontext_lowvram.optimizations import QTensor
    w = torch.randn(16, 8).to(torch.float16)
    qw = QTensor(w.view(torch.uint8), qformat="gguf", shape=(16, 8), meta={"qtype": "F16"})
    layer = QuantLinear(qw)
    layer.weight_function = [LowRankDelta(torch.ones(16, 1), torch.ones(1, 8))]
    before = layer.weight.clone()
    out = layer(torch.randn(20, 8).to(torch.float16))
    assert torch.equal(layer.weight, before) and torch.isfinite(out).all()


@pytest.mark.parametrize("rows", [4, 300])  # output path; merged path
def test_several_loras_take_one_pass(rows):
    """Two LoRAs on one layer equal the merged reference, and cost one addmm over the output / the dequantized
    weight (their factors stacked), not one per LoRA: each pass reads and writes the whole tensor."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(48, 128, generator=g) * 0.02
    loras = [(torch.randn(48, r, generator=g) * 0.1, torch.randn(r, 128, generator=g) * 0.1, a, s)
             for r, a, s in ((4, 2.0, 1.5), (8, 8.0, -0.6))]
    x = torch.randn(rows, 128, generator=g)
    qw = quantize(w, "Q8_0")
    layer = QuantLinear(qw)
    layer.weight_function = [LowRankDelta(up, down, alpha=a, strength=s) for up, down, a, s in loras]
    ref = dequantize(qw, torch.float64)
    for up, down, a, s in loras:
        ref = merged_reference(ref, up, down, a, s)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = layer(x)
    torch.testing.assert_close(out.double(), x.double() @ ref.T, rtol=1e-5, atol=1e-5)
    assert sum(e.count for e in prof.key_averages() if e.key == "aten::addmm_") == 1


class HostPatch:
    """Stands in for comfy.model_patcher.LowVramPatch: the host's per-forward LoRA (`key` into the patcher's
    `patches` dict of (strength, adapter, strength_model, offset, function) entries); called on a dense weight it
    merges in fp64 here, and counts its calls (the fallback path)."""

    def __init__(self, key, patches):
        self.key, self.patches, self.calls = key, patches, 0

    def __call__(self, weight):
        self.calls += 1
        out = weight.to(torch.float64, copy=True)
        for strength, adapter, _, offset, _ in self.patches[self.key]:
            up, down, alpha = adapter.weights[0], adapter.weights[1], adapter.weights[2]
            scale = alpha / down.shape[0] if alpha is not None else 1.0  # as LoRAAdapter.calculate_weight
            target = out if offset is None else out.narrow(0, offset[1], offset[2])
            target += strength * scale * (up.double() @ down.double())
        return out.to(weight.dtype)


def adapter(up, down, alpha):
    return SimpleNamespace(name="lora", weights=(up, down, alpha, None, None, None))


@pytest.mark.parametrize("rows", [4, 300])  # output path; merged path
@pytest.mark.parametrize("fmt", ["Q4_0", "nf4", "fp8_e4m3fn_scaled"])
def test_host_lora_patches_take_the_low_rank_path(fmt, rows):
    """A core LoRA loader's per-forward patch on a quantized layer is applied as low-rank deltas: the result equals
    the host's own merge (fp64 reference), the host's dense-weight call never runs, and the cast factors are kept
    for the next forward; adding an entry to the patch list is seen."""
    g = torch.Generator().manual_seed(6)
    w = torch.randn(96, 256, generator=g) * 0.02
    up1, down1 = torch.randn(96, 8, generator=g) * 0.1, torch.randn(8, 256, generator=g) * 0.1
    up2, down2 = torch.randn(32, 4, generator=g) * 0.1, torch.randn(4, 256, generator=g) * 0.1
    key = "blocks.0.qkv.weight"
    patches = {key: [(0.7, adapter(up1, down1, 4.0), 1.0, None, None),
                     (1.2, adapter(up2, down2, 2.0), 1.0, (0, 32, 32), None)]}  # an output slice (q, k or v)
    qw = quantize(w, fmt)
    layer = QuantLinear(qw)
    host = HostPatch(key, patches)
    layer.weight_function = [host]
    x = torch.randn(rows, 256, generator=g)
    base = dequantize(qw, torch.float64)
    ref = x.double() @ host(base).T
    host.calls = 0
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)
    deltas = host._klv_low_rank[2]
    layer(x)
    assert host.calls == 0 and host._klv_low_rank[2] is deltas  # converted once, factors kept
    patches[key].append((-0.5, adapter(up1, down1, None), 1.0, None, None))
    ref = x.double() @ host(base).T
    host.calls = 0
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)
    assert host.calls == 0 and len(host._klv_low_rank[2]) == 3


@pytest.mark.parametrize("entry", [
    (1.0, ("diff", (torch.ones(16, 8),)), 1.0, None, None),  # a full-weight diff
    (1.0, adapter(torch.ones(16, 2), torch.ones(2, 8), None), 0.5, None, None),  # model-merge strength
    (1.0, adapter(torch.ones(16, 2), torch.ones(2, 8), None), 1.0, None, torch.tanh),  # a function on the delta
    (1.0, SimpleNamespace(name="loha", weights=(torch.ones(16, 2), torch.ones(2, 8))), 1.0, None, None),
])
def test_host_patches_beyond_plain_lora_stay_with_the_host(entry):
    """Anything calculate_weight does that a low-rank delta cannot say goes through the host's own call."""
    from kontext_lowvram.optimizations.lora import split_low_rank
    lora = (1.0, adapter(torch.ones(16, 2), torch.ones(2, 8), None), 1.0, None, None)
    host = HostPatch("w", {"w": [lora, entry]})
    low, other = split_low_rank([host])
    assert low == [] and other == [host]


@pytest.mark.parametrize("rows", [4, 300])  # output path; merged path
def test_host_lora_patch_traces_without_graph_breaks(rows):
    """torch.compile(fullgraph=True) through a core LoRA loader's per-forward patch on a quantized layer (the
    deltas come from the patch's cache, as after the first step)."""
    g = torch.Generator().manual_seed(7)
    key = "blocks.0.qkv.weight"
    patches = {key: [(0.7, adapter(torch.randn(96, 8, generator=g) * 0.1, torch.randn(8, 256, generator=g) * 0.1,
                                   4.0), 1.0, None, None)]}
    layer = QuantLinear(quantize(torch.randn(96, 256, generator=g) * 0.02, "Q8_0"))
    layer.weight_function = [HostPatch(key, patches)]
    x = torch.randn(rows, 256, generator=g)
    eager = layer(x)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-5)
    assert layer.weight_function[0].calls == 0
