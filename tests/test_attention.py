"""Attention backends (optimizations/attention.py) and the LowVRAMAttention node, without ComfyUI.

Numerics: every backend against a float64 math reference on FLUX-shaped q/k/v (head dim 128, 24 heads, shorter
sequence). sdpa and split run on CPU here; flash_attn / sage_attention / xformers cases are generated only where
the library imports and CUDA exists (so nothing is reported as skipped on a CPU runner). Their layout glue and the
selection logic are exercised on CPU through stand-in modules.
"""
import copy
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from kontext_lowvram.optimizations import attention as A

HEADS, HEAD_DIM = 24, 128  # FLUX.1
LQ = 320                   # FLUX Kontext has 4096 + 4096 + 512 tokens; the math does not depend on the length

#: rel-L2 bound vs the float64 reference, per (backend, dtype). Measured on CPU (torch 2.13): sdpa fp32 ~5e-7,
#: split fp32 ~5e-7, sdpa bf16 ~3e-3, split bf16 ~3e-3 (half outputs are bounded by their own rounding, 2^-8 / 2^-11).
BOUNDS = {
    ("sdpa", torch.float32): 1e-5, ("split", torch.float32): 1e-5,
    ("sdpa", torch.bfloat16): 1e-2, ("split", torch.bfloat16): 1e-2,
    ("sdpa", torch.float16): 2e-3, ("split", torch.float16): 2e-3,
    ("flash_attn", torch.bfloat16): 1e-2, ("flash_attn", torch.float16): 2e-3,
    ("xformers", torch.bfloat16): 1e-2, ("xformers", torch.float16): 2e-3, ("xformers", torch.float32): 1e-3,
    # SageAttention quantizes q and k to int8 (per block) and may keep P in fp8/fp16: a coarser bound
    ("sage_attention", torch.bfloat16): 6e-2, ("sage_attention", torch.float16): 6e-2,
}


def _cases():
    cases = [("sdpa", "cpu", torch.float32), ("split", "cpu", torch.float32),
             ("sdpa", "cpu", torch.bfloat16), ("split", "cpu", torch.bfloat16)]
    if torch.cuda.is_available():
        cases += [("sdpa", "cuda", torch.bfloat16), ("split", "cuda", torch.bfloat16)]
        for name in ("flash_attn", "sage_attention", "xformers"):
            try:
                A.import_backend_module(name)
            except ImportError:
                continue
            cases += [(name, "cuda", torch.bfloat16), (name, "cuda", torch.float16)]
    return cases


CASES = _cases()


def qkv(b=1, h=HEADS, lq=LQ, lk=None, d=HEAD_DIM, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    lk = lq if lk is None else lk
    q = torch.randn(b, h, lq, d, generator=g)
    k = torch.randn(b, h, lk, d, generator=g)
    v = torch.randn(b, h, lk, d, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def rel_l2(out, ref):
    out = out.detach().to("cpu", torch.float64)
    ref = ref.to("cpu", torch.float64)
    return ((out - ref).norm() / ref.norm()).item()


def run(name, *args, **kwargs):
    return A.FUNCTIONS[name](*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# numerics
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,device,dtype", CASES, ids=[f"{n}-{d}-{str(t)[6:]}" for n, d, t in CASES])
def test_backend_vs_float64_reference(name, device, dtype):
    """FLUX call: ``optimized_attention(q, k, v, heads, skip_reshape=True, mask=None)`` -> (B, L, H*D)."""
    q, k, v = qkv(b=2, dtype=dtype, device=device)
    out = run(name, q, k, v, HEADS, skip_reshape=True)
    assert out.shape == (2, LQ, HEADS * HEAD_DIM) and out.dtype == dtype and out.device.type == device
    err = rel_l2(out, A.attention_reference(q, k, v, HEADS, skip_reshape=True))
    assert err <= BOUNDS[(name, dtype)], f"{name} {dtype}: rel-L2 {err:.3g}"


@pytest.mark.parametrize("name,device,dtype", CASES, ids=[f"{n}-{d}-{str(t)[6:]}" for n, d, t in CASES])
def test_layouts_match(name, device, dtype):
    """(B, L, H*D) inputs, and skip_output_reshape, give the same numbers as the FLUX layout."""
    q, k, v = qkv(lq=64, lk=96, dtype=dtype, device=device, seed=1)   # cross-attention lengths too
    flat = [t.transpose(1, 2).reshape(1, t.shape[2], HEADS * HEAD_DIM) for t in (q, k, v)]
    a = run(name, q, k, v, HEADS, skip_reshape=True)
    b = run(name, *flat, HEADS)
    c = run(name, q, k, v, HEADS, skip_reshape=True, skip_output_reshape=True)
    d = run(name, *flat, HEADS, skip_output_reshape=True)
    assert a.shape == b.shape == (1, 64, HEADS * HEAD_DIM)
    assert c.shape == d.shape == (1, HEADS, 64, HEAD_DIM)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(c.transpose(1, 2).reshape(a.shape), a, rtol=0, atol=0)
    torch.testing.assert_close(d, c, rtol=0, atol=0)
    ref = A.attention_reference(q, k, v, HEADS, skip_reshape=True, skip_output_reshape=True)
    assert rel_l2(c, ref) <= BOUNDS[(name, dtype)]


def _masks(b, lq, lk, seed=3):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(lq, lk, generator=g) > 0.3
    keep[:, 0] = True                                     # no fully-masked query row
    pad = torch.ones(b, 1, 1, lk, dtype=torch.bool)
    pad[-1, ..., lk - lk // 4:] = False                   # key padding on the last batch item
    return {
        "bool_2d": keep,                                                    # (Lq, Lk)
        "bool_pad_4d": pad,                                                 # (B, 1, 1, Lk), broadcast over q rows
        "float_3d": torch.randn(b, lq, lk, generator=g) * 2.0,              # additive (B, Lq, Lk)
        "float_4d": torch.randn(1, HEADS, lq, lk, generator=g),             # additive (1, H, Lq, Lk)
    }


@pytest.mark.parametrize("mask_kind", ["bool_2d", "bool_pad_4d", "float_3d", "float_4d"])
@pytest.mark.parametrize("name", ["sdpa", "split"])
def test_masks(name, mask_kind):
    b, lq, lk = 2, 96, 160
    q, k, v = qkv(b=b, lq=lq, lk=lk, seed=4)
    mask = _masks(b, lq, lk)[mask_kind]
    ref = A.attention_reference(q, k, v, HEADS, mask=mask, skip_reshape=True)
    # a tiny split budget so masks are sliced across several chunks of every kind
    kw = {"budget_bytes": 8 * HEADS * lk * 4} if name == "split" else {}
    out = run(name, q, k, v, HEADS, mask=mask, skip_reshape=True, **kw)
    assert rel_l2(out, ref) <= 1e-5
    # the mask really changed the result
    assert rel_l2(out, A.attention_reference(q, k, v, HEADS, skip_reshape=True)) > 1e-2


def test_reference_matches_torch_math():
    """The float64 reference itself agrees with torch's math SDPA in float64."""
    q, k, v = qkv(lq=32, d=64, h=4, dtype=torch.float64)
    mask = torch.rand(32, 32) > 0.3
    mask[:, 0] = True
    ref = A.attention_reference(q, k, v, 4, mask=mask, skip_reshape=True, skip_output_reshape=True)
    torch.testing.assert_close(ref, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=1e-12, atol=1e-12)


def test_scale_is_honoured():
    q, k, v = qkv(lq=40, h=2)
    for name in ("sdpa", "split"):
        out = run(name, q, k, v, 2, skip_reshape=True, scale=0.05)
        assert rel_l2(out, A.attention_reference(q, k, v, 2, skip_reshape=True, scale=0.05)) <= 1e-5


# ----------------------------------------------------------------------------------------------------------------
# split: memory bound
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 24, 8704, 8704), (2, 24, 4096, 4608), (1, 24, 100, 50), (4, 3, 1, 7),
                                   (1, 24, 8704, 8704 * 64)])
@pytest.mark.parametrize("budget_mib", [1, 16, 256, 4096])
@pytest.mark.parametrize("itemsize", [2, 4, 8])
def test_split_plan_respects_budget(shape, budget_mib, itemsize):
    b, h, lq, lk = shape
    budget = budget_mib * 2 ** 20
    bc, hc, qc = A.split_plan(b, h, lq, lk, itemsize, budget)
    assert 1 <= bc <= b and 1 <= hc <= h and 1 <= qc <= lq
    chunk = bc * hc * qc * lk * itemsize
    assert chunk <= max(budget, lk * itemsize)   # one row of one head is the floor
    if chunk <= budget:
        assert bc * hc * qc * lk * itemsize <= budget
    # never needlessly small: the whole thing, or one more query row per chunk would exceed the budget
    assert (bc, hc, qc) == (b, h, lq) or bc * hc * (qc + 1) * lk * itemsize > budget or qc == lq


def test_split_flux_kontext_default_budget():
    """FLUX Kontext at 1024^2: 4096 + 4096 + 512 tokens; the full fp32 score matrix is 7.3 GB."""
    b, h, n = 1, 24, 8704
    full = b * h * n * n * 4
    bc, hc, qc = A.split_plan(b, h, n, n, 4, A.DEFAULT_SPLIT_BYTES)
    assert (bc, hc) == (1, 24) and qc == A.DEFAULT_SPLIT_BYTES // (24 * n * 4)
    assert bc * hc * qc * n * 4 <= A.DEFAULT_SPLIT_BYTES < full / 25


@pytest.mark.parametrize("budget", [8 * 24 * 200 * 4, 3 * 200 * 4, 1])  # rows over all heads / fewer heads / floor
def test_split_chunks_stay_under_budget_and_exact(budget):
    q, k, v = qkv(b=2, lq=150, lk=200, seed=5)
    stats = {}
    out = A.attention_split(q, k, v, HEADS, skip_reshape=True, budget_bytes=budget, stats=stats)
    assert stats["max_score_bytes"] <= max(budget, 200 * 4)
    bc, hc, qc = stats["plan"]
    assert stats["chunks"] == -(-2 // bc) * -(-HEADS // hc) * -(-150 // qc)
    assert rel_l2(out, A.attention_reference(q, k, v, HEADS, skip_reshape=True)) <= 1e-5


def _allocations(fn):
    """(largest single allocation, peak of live allocations) in bytes made by torch's CPU allocator while ``fn``
    runs, from the profiler's memory events (no tracemalloc)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    largest = live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        m = e.self_cpu_memory_usage
        largest = max(largest, m)
        live += m
        peak = max(peak, live)
    return largest, peak


def test_split_peak_memory_measured():
    """Measured allocations on CPU, FLUX heads/head dim at 1024 tokens, fp32:
    full score matrix 96 MiB, output 12 MiB; split with a 16 MiB budget allocates no block over 16 MiB and peaks at
    ~ budget + output; the math path allocates the full matrix (which proves the measurement sees it);
    CPU sdpa (a flash-style kernel here) needs no score matrix either."""
    b, h, n, d = 1, HEADS, 1024, HEAD_DIM
    q, k, v = qkv(b=b, h=h, lq=n, d=d, seed=6)
    full, out_bytes, budget = b * h * n * n * 4, b * h * n * d * 4, 16 * 2 ** 20
    big_split, peak_split = _allocations(lambda: A.attention_split(q, k, v, h, skip_reshape=True, budget_bytes=budget))
    big_math, peak_math = _allocations(lambda: torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5, -1) @ v)
    big_sdpa, peak_sdpa = _allocations(lambda: A.attention_sdpa(q, k, v, h, skip_reshape=True))
    print(f"\nfull scores {full / 2**20:.1f} MiB | split(16 MiB): largest {big_split / 2**20:.1f}, "
          f"peak {peak_split / 2**20:.1f} | math: largest {big_math / 2**20:.1f}, peak {peak_math / 2**20:.1f} | "
          f"sdpa: largest {big_sdpa / 2**20:.1f}, peak {peak_sdpa / 2**20:.1f} MiB")
    assert big_math >= full                      # the measurement does see a full score matrix
    assert big_split <= budget                   # no score chunk (nor anything else) above the budget
    assert peak_split <= budget + out_bytes + 2 * 2 ** 20 < full / 3


# ----------------------------------------------------------------------------------------------------------------
# selection / probe
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,pip", [("flash_attn", "pip install flash-attn --no-build-isolation"),
                                      ("sage_attention", "pip install sageattention"),
                                      ("xformers", "pip install xformers")])
def test_explicit_library_backend_on_cpu_raises_with_pip_command(name, pip):
    with pytest.raises(A.AttentionBackendUnavailable) as e:
        A.select_backend(name, "cpu", torch.float32, 128)
    msg = str(e.value)
    assert pip in msg and name in msg and A.PACKAGES[name][0] in msg


@pytest.mark.parametrize("name", ["sdpa", "split"])
def test_explicit_torch_backends_always_select(name):
    for dtype in (torch.float32, torch.bfloat16):
        assert A.select_backend(name, "cpu", dtype, 128) == (name, [])


def test_auto_on_cpu_picks_sdpa_and_says_why(caplog):
    with caplog.at_level("INFO", logger="kontext_lowvram.attention"):
        chosen, notes = A.select_backend("auto", "cpu", torch.float32, 128)
    assert chosen == "sdpa"
    assert [n.split(":")[0] for n in notes] == ["sage_attention", "flash_attn", "xformers"]
    assert "auto picked 'sdpa'" in caplog.text


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown attention backend"):
        A.select_backend("magic", "cpu", torch.float32)


class _StandIns:
    """Stand-in modules with the libraries' call conventions, computed with torch SDPA on CPU, to exercise the
    layout glue and the auto fallback without a GPU."""

    @staticmethod
    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):  # (B, L, H, D)
        assert q.shape[2] == k.shape[2] and not causal and dropout_p == 0.0
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           scale=softmax_scale)
        return o.transpose(1, 2)

    @staticmethod
    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None):
        assert tensor_layout == "HND"
        return F.scaled_dot_product_attention(q, k, v, scale=sm_scale)

    @staticmethod
    def memory_efficient_attention(query, key, value, attn_bias=None, p=0.0, scale=None):  # (B, M, H, K)
        assert query.is_contiguous() and attn_bias is None
        return _StandIns.flash_attn_func(query, key, value, softmax_scale=scale)


@pytest.fixture
def stand_in_libraries(monkeypatch):
    """Pretend flash_attn / sageattention / xformers import and accept the CPU; returns the module table."""
    mods = {"flash_attn": types.SimpleNamespace(flash_attn_func=_StandIns.flash_attn_func),
            "sageattention": types.SimpleNamespace(sageattn=_StandIns.sageattn),
            "xformers": types.SimpleNamespace(memory_efficient_attention=_StandIns.memory_efficient_attention)}
    monkeypatch.setattr(A, "_IMPORTS", dict(mods))
    monkeypatch.setattr(A, "library_unsupported", lambda *a, **k: None)
    return mods


@pytest.mark.parametrize("name", ["flash_attn", "sage_attention", "xformers"])
def test_library_glue_with_stand_ins(stand_in_libraries, name):
    q, k, v = qkv(lq=48, lk=80, seed=7)
    ref = A.attention_reference(q, k, v, HEADS, skip_reshape=True)
    flat = [t.transpose(1, 2).reshape(1, t.shape[2], -1) for t in (q, k, v)]
    assert rel_l2(run(name, q, k, v, HEADS, skip_reshape=True), ref) <= 1e-5
    assert rel_l2(run(name, *flat, HEADS), ref) <= 1e-5
    o = run(name, q, k, v, HEADS, skip_reshape=True, skip_output_reshape=True)
    assert o.shape == (1, HEADS, 48, HEAD_DIM) and rel_l2(o.transpose(1, 2).reshape(1, 48, -1), ref) <= 1e-5
    # a mask is handed to sdpa, which honours it
    mask = torch.rand(48, 80) > 0.5
    mask[:, 0] = True
    out = run(name, q, k, v, HEADS, mask=mask, skip_reshape=True)
    assert rel_l2(out, A.attention_reference(q, k, v, HEADS, mask=mask, skip_reshape=True)) <= 1e-5
    assert A.select_backend(name, "cpu", torch.float32, 128) == (name, [])


def test_auto_falls_back_past_broken_and_wrong_libraries(stand_in_libraries, monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("no kernel image is available for execution on the device")

    stand_in_libraries["sageattention"].sageattn = broken                     # raises
    stand_in_libraries["flash_attn"].flash_attn_func = lambda q, k, v, **kw: torch.zeros_like(q)  # wrong numbers
    with caplog.at_level("INFO", logger="kontext_lowvram.attention"):
        chosen, notes = A.select_backend("auto", "cpu", torch.float32, 128)
    assert chosen == "xformers"
    assert "no kernel image" in notes[0] and "max error" in notes[1]
    assert "auto picked 'xformers'" in caplog.text
    with pytest.raises(A.AttentionBackendUnavailable, match="pip install sageattention.*|no kernel image"):
        A.select_backend("sage_attention", "cpu", torch.float32, 128)


def test_not_installed_library_message(monkeypatch):
    monkeypatch.setattr(A, "_IMPORTS", {})
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # import raises ImportError
    with pytest.raises(A.AttentionBackendUnavailable, match="not installed.*pip install flash-attn --no-build-isolation"):
        A.probe("flash_attn", "cpu", torch.bfloat16)


def test_library_requirements():
    cuda = torch.device("cuda")
    assert "CUDA" in A.library_unsupported("flash_attn", "cpu", torch.bfloat16, 128)
    assert "float16/bfloat16" in A.library_unsupported("flash_attn", cuda, torch.float32, 128)
    assert A.library_unsupported("flash_attn", cuda, torch.bfloat16, 128) is None
    assert "head dims" in A.library_unsupported("sage_attention", cuda, torch.float16, 80)
    assert A.library_unsupported("sage_attention", cuda, torch.bfloat16, 128) is None
    assert A.library_unsupported("xformers", cuda, torch.float32, 128) is None


# ----------------------------------------------------------------------------------------------------------------
# the override object, called the way ComfyUI's wrap_attn calls it
# ----------------------------------------------------------------------------------------------------------------

class _Original:
    def __init__(self):
        self.calls = 0

    def __call__(self, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                 **kwargs):
        self.calls += 1
        return "original"


@pytest.mark.parametrize("backend", ["sdpa", "split"])
def test_override_runs_backend_for_flux_calls(backend):
    q, k, v = qkv(lq=64, seed=8)
    ov, orig = A.AttentionOverride(backend, split_budget_bytes=2 ** 20), _Original()
    opts = {"patches": {}}
    # FLUX (comfy/ldm/flux/math.py): optimized_attention(q, k, v, heads, skip_reshape=True, mask=..., transformer_options=...)
    out = ov(orig, q, k, v, q.shape[1], skip_reshape=True, mask=None, transformer_options=opts,
             _inside_attn_wrapper=True)
    assert orig.calls == 0 and ov.calls == 1
    assert rel_l2(out, A.attention_reference(q, k, v, HEADS, skip_reshape=True)) <= 1e-5
    # positional mask / attn_precision / skip flags, and scale
    mask = torch.rand(64, 64) > 0.4
    mask[:, 0] = True
    out = ov(orig, q, k, v, HEADS, mask, None, True, True, scale=0.1, transformer_options=opts)
    ref = A.attention_reference(q, k, v, HEADS, mask=mask, skip_reshape=True, skip_output_reshape=True, scale=0.1)
    assert out.shape == (1, HEADS, 64, HEAD_DIM) and rel_l2(out, ref) <= 1e-5 and orig.calls == 0


def test_override_delegates_what_it_cannot_represent():
    q, k, v = qkv(lq=16, h=4, d=32, seed=9)
    ov, orig = A.AttentionOverride("split"), _Original()
    assert ov(orig, q, k, v, 4, skip_reshape=True, enable_gqa=True) == "original"   # unknown option set
    assert ov(orig, q, k[:, :2], v[:, :2], 4, skip_reshape=True) == "original"       # grouped-query k/v
    assert orig.calls == 2 and ov.calls == 0 and ov.delegated == 2
    ov(orig, q, k, v, 4, skip_reshape=True, enable_gqa=False, attn_precision=torch.float32)  # defaults: ours
    assert orig.calls == 2 and ov.calls == 1


def test_override_survives_model_options_copies():
    """ModelPatcher.clone() deep-copies model_options (v0.3.64: copy.deepcopy; v0.29: dict/list copy)."""
    ov = A.AttentionOverride("split", 123 * 2 ** 20)
    opts = {"transformer_options": {"optimized_attention_override": ov}}
    c = copy.deepcopy(opts)
    assert c["transformer_options"]["optimized_attention_override"] is ov
    assert "split" in repr(ov) and "123 MiB" in repr(ov)
    with pytest.raises(ValueError):
        A.AttentionOverride("auto")  # the node resolves auto before building the override


# ----------------------------------------------------------------------------------------------------------------
# the node, with a stand-in ModelPatcher
# ----------------------------------------------------------------------------------------------------------------

class _FakeInner:
    manual_cast_dtype = None

    def __init__(self, dtype):
        self._dtype = dtype
        self.model_config = types.SimpleNamespace(unet_config={"hidden_size": 3072, "num_heads": 24})

    def get_dtype(self):
        return self._dtype


class _FakePatcher:
    def __init__(self, dtype=torch.float32):
        self.model = _FakeInner(dtype)
        self.load_device = torch.device("cpu")
        self.model_options = {"transformer_options": {}}

    def model_dtype(self):
        return self.model.get_dtype()

    def clone(self):
        n = _FakePatcher.__new__(_FakePatcher)
        n.model, n.load_device = self.model, self.load_device
        n.model_options = copy.deepcopy(self.model_options)
        return n


def test_node_installs_override_on_a_clone_only():
    from kontext_lowvram.host.attention import model_attention_params
    from kontext_lowvram.nodes.attention import LowVRAMAttention

    base = _FakePatcher()
    assert model_attention_params(base) == (torch.device("cpu"), torch.float32, 128)
    (m,) = LowVRAMAttention().apply(base, "split", 64)
    ov = m.model_options["transformer_options"]["optimized_attention_override"]
    assert isinstance(ov, A.AttentionOverride) and ov.backend == "split" and ov.split_budget_bytes == 64 * 2 ** 20
    assert base.model_options == {"transformer_options": {}} and m is not base
    (m2,) = LowVRAMAttention().apply(base, "auto")
    assert m2.model_options["transformer_options"]["optimized_attention_override"].backend == "sdpa"
    assert "optimized_attention_override" not in base.model_options["transformer_options"]


def test_node_fp8_storage_probes_a_compute_dtype():
    from kontext_lowvram.host.attention import model_attention_params

    assert model_attention_params(_FakePatcher(torch.float8_e4m3fn))[1] == torch.bfloat16


def test_node_explicit_unavailable_backend_raises_clear_error():
    from kontext_lowvram.nodes.attention import LowVRAMAttention

    with pytest.raises(A.AttentionBackendUnavailable, match="pip install flash-attn --no-build-isolation"):
        LowVRAMAttention().apply(_FakePatcher(), "flash_attn")
    choices = LowVRAMAttention.INPUT_TYPES()["required"]["backend"][0]
    assert choices == ["auto", "sdpa", "flash_attn", "sage_attention", "xformers", "split"]
