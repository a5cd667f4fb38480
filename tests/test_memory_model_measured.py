"""The memory model's weight bytes against what loading real files holds (issue 14).

Small FLUX transformers in the real layout (loaders.flux_layout; the real 64 / 768 / 4096 input widths, hidden a
multiple of 256 so the K-quants get whole blocks) are written in every format the loaders read, the way people make
them: GGUF as city96's llama.cpp patch mixes a file (tools/lcpp.patch in city96/ComfyUI-GGUF) and with every 2-D
tensor quantized, fp8 e4m3fn (plain and scaled), bitsandbytes NF4 and bf16 safetensors. Each file is loaded with
loaders.load_model_file and measured as the bytes its tensors' storages hold: every untyped storage counted once
(a QTensor's raw bytes and its statistics), cross-checked against loaders.resident_bytes and the file's size.
GGUF tensors are views of the memory-mapped file, so for them "held" means mapped (page cache), as the planner's
load phase says. tracemalloc and RSS growth are not used: torch's CPU allocations bypass tracemalloc and RSS moves
with the allocator's caching and with page-cache residency of mapped files.

From those measurements: the bits per weight of every storage type (checked against the constants the model uses),
the estimate of each small file (within a tolerance each variant explains), and the measured byte rates applied to
the FLUX.1 [dev] shapes (the estimate the planner uses: within 0.25 % for the files people download).

K-quant blocks (which gguf-py cannot quantize) are random valid blocks of the right geometry (fixtures.gguf_blocks):
the byte count of a tensor depends on its type and shape, not on its values.
"""
import math
from fractions import Fraction
from functools import lru_cache

import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from fixtures.flux import random_flux_state_dict
from fixtures.gguf_blocks import random_blocks
from kontext_lowvram.loaders import load_model_file, resident_bytes
from kontext_lowvram.loaders.flux_layout import FLUX_DEV, FluxConfig, flux_tensor_shapes
from kontext_lowvram.loaders.keys import should_quantize
from kontext_lowvram.loaders.writers import write_gguf, write_safetensors
from kontext_lowvram.optimizations import QTensor, quantize
from kontext_lowvram.optimizations import memory_model as mm

# head_dim 128 as FLUX.1; block widths h, 4h, 5h are whole 256-element K-quant super-blocks
CONFIGS = {
    "h256-3+4": FluxConfig(hidden_size=256, num_heads=2, depth=3, depth_single_blocks=4),
    "h512-2+2": FluxConfig(hidden_size=512, num_heads=4, depth=2, depth_single_blocks=2),
}

PLAIN = ("float32", "float16", "bfloat16")
# city96's lcpp.patch (img_tensor_get_type): these FLUX tensors stay F32, these F16 (first match wins, as in the
# patch); 1-D tensors are never quantized (convert.py writes them F32); "attn.qkv.weight" is one type up in the
# _M mixes; a K-quant whose rows are not whole super-blocks falls back to F16.
CITY96_F32 = ("img_in.", "time_in.in_layer.", "vector_in.in_layer.", "guidance_in.in_layer.", "final_layer.linear.")
CITY96_F16 = ("txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")
CITY96_QKV_UP = {"Q5_K_M": ("Q5_K", "Q6_K"), "Q4_K_M": ("Q4_K", "Q5_K"), "Q3_K_M": ("Q3_K", "Q4_K"),
                 "Q2_K": ("Q2_K", None), "Q4_K": ("Q4_K", None), "Q5_K": ("Q5_K", None), "Q6_K": ("Q6_K", None),
                 "Q8_0": ("Q8_0", None)}


def _gguf_fits(qtype, shape):
    return shape[-1] % GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][0] == 0


def city96(ftype):
    base, qkv = CITY96_QKV_UP[ftype]

    def rule(key, shape):
        if len(shape) == 1 or any(p in key for p in CITY96_F32):  # the patch matches substrings
            return "float32"
        if any(p in key for p in CITY96_F16):
            return "float16"
        t = qkv if qkv and "attn.qkv.weight" in key else base  # the double blocks' img_attn / txt_attn qkv
        return t if _gguf_fits(t, shape) else "float16"
    return rule


def gguf_every_2d(qtype):
    """Every 2-D tensor in `qtype` (img_in's 64-wide rows are no whole K-quant block: F16, llama.cpp's fallback)."""
    return lambda key, shape: "float32" if len(shape) == 1 else (qtype if _gguf_fits(qtype, shape) else "float16")


def st_blocks(label):
    """Safetensors: the block linears (keys.should_quantize, what our converter and bnb / fp8 files quantize) in
    `label`, everything else bf16 as in the source."""
    return lambda key, shape: label if should_quantize(key, shape) else "bfloat16"


def st_every_2d(label):
    return lambda key, shape: label if len(shape) == 2 else "bfloat16"


F = mm.FORMAT_BY_NAME
# name -> (container, recipe: (key, shape) -> stored type, the ModelFormat the planner takes such a file for, the
# bits per block weight it assumes (None: the format's own; a pure Q5_K / Q4_K file: its family's, as
# MEASURED_PEAKS, whose rows were measured on such files)).
VARIANTS = {
    "bf16": ("safetensors", st_blocks("bfloat16"), F["bf16"], None),
    "fp8_e4m3fn": ("safetensors", st_blocks("float8_e4m3fn"), F["fp8_e4m3fn"], None),
    "fp8_e4m3fn_scaled": ("safetensors", st_blocks("float8_e4m3fn_scaled"), F["fp8_e4m3fn"], None),
    "fp8_e4m3fn every 2-D": ("safetensors", st_every_2d("float8_e4m3fn"), F["fp8_e4m3fn"], None),
    "nf4": ("safetensors", st_blocks("nf4"), F["nf4"], None),
    "nf4 every 2-D": ("safetensors", st_every_2d("nf4"), F["nf4"], None),
    "Q8_0 city96": ("gguf", city96("Q8_0"), F["Q8_0"], None),
    "Q8_0 every 2-D": ("gguf", gguf_every_2d("Q8_0"), F["Q8_0"], None),
    "Q6_K city96": ("gguf", city96("Q6_K"), F["Q6_K"], None),
    "Q6_K every 2-D": ("gguf", gguf_every_2d("Q6_K"), F["Q6_K"], None),
    "Q5_K city96": ("gguf", city96("Q5_K"), F["Q5_K_M"], mm.MEASURED_PEAKS["Q5_K"][0]),
    "Q5_K every 2-D": ("gguf", gguf_every_2d("Q5_K"), F["Q5_K_M"], mm.MEASURED_PEAKS["Q5_K"][0]),
    "Q4_K city96": ("gguf", city96("Q4_K"), F["Q4_K_M"], mm.MEASURED_PEAKS["Q4_K"][0]),
    "Q4_K every 2-D": ("gguf", gguf_every_2d("Q4_K"), F["Q4_K_M"], mm.MEASURED_PEAKS["Q4_K"][0]),
    "Q5_K_M city96": ("gguf", city96("Q5_K_M"), F["Q5_K_M"], None),
    "Q4_K_M city96": ("gguf", city96("Q4_K_M"), F["Q4_K_M"], None),
    "Q3_K_M city96": ("gguf", city96("Q3_K_M"), F["Q3_K_M"], None),
    "Q2_K city96": ("gguf", city96("Q2_K"), F["Q2_K"], None),
}


def _numel(shape):
    return math.prod(shape)


def stored_type(v):
    """What a loaded entry is stored as: its GGUF type, fp8 / nf4 kind, or plain dtype."""
    return v.quant_name if isinstance(v, QTensor) else str(v.dtype).replace("torch.", "")


def _storages(v):
    return [v.raw, *v.aux.values()] if isinstance(v, QTensor) else [v]


def held_bytes(sd):
    """(total, per key): bytes of the distinct untyped storages the loaded tensors hold, each storage counted once
    (for the first key that holds it), and the number of distinct storages."""
    seen, per_key = set(), {}
    for k, v in sd.items():
        n = 0
        for t in _storages(v):
            s = t.untyped_storage()
            ident = (s.data_ptr(), s.nbytes())
            if ident not in seen:
                seen.add(ident)
                n += s.nbytes()
        per_key[k] = n
    return sum(per_key.values()), per_key, len(seen)


class _Builder:
    """Entries of one config's random bf16 state dict in any stored type, each built once."""

    def __init__(self, cfg, seed):
        self.sd = random_flux_state_dict(cfg, seed=seed, dtype=torch.bfloat16)
        self.cache = {}

    def get(self, key, label):
        if (key, label) not in self.cache:
            v = self.sd[key]
            if label in PLAIN:
                t = v.to(getattr(torch, label))
            elif label == "nf4":
                t = quantize(v, "nf4")
            elif label.startswith("float8_e4m3fn"):
                t = quantize(v, "fp8_e4m3fn_scaled" if label.endswith("_scaled") else "fp8_e4m3fn")
            elif label == "Q8_0":
                t = quantize(v, "Q8_0")
            else:  # K-quants: random valid blocks (gguf-py has no K-quant encoder)
                raw = _random_blocks(label, tuple(v.shape))
                t = QTensor(raw, qformat="gguf", shape=v.shape, meta={"qtype": label})
            self.cache[key, label] = t
        return self.cache[key, label]


@lru_cache(maxsize=None)
def _random_blocks(qtype, shape):
    return random_blocks(qtype, shape, seed=len(shape) * 7 + shape[0])


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """{(config, variant): record} for every small file: what it holds once loaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: one thread is as fast, and much faster on a busy 2-core runner
    try:
        return _measure_all(tmp_path_factory)
    finally:
        torch.set_num_threads(threads)


def _measure_all(tmp_path_factory):
    out = {}
    for ci, (cname, cfg) in enumerate(CONFIGS.items()):
        build = _Builder(cfg, seed=ci)
        shapes = flux_tensor_shapes(cfg)
        d = tmp_path_factory.mktemp(cname)
        for vname, (container, recipe, fmt, bits) in VARIANTS.items():
            want = {k: recipe(k, s) for k, s in shapes.items()}
            sd = {k: build.get(k, want[k]) for k in shapes}
            path = d / (vname.replace(" ", "_") + "." + container)
            (write_gguf if container == "gguf" else write_safetensors)(path, sd)
            loaded, info = load_model_file(path)
            total, per_key, n_storages = held_bytes(loaded)
            out[cname, vname] = dict(
                cfg=cfg, fmt=fmt, bits=bits, container=container, info=info, want=want, n_storages=n_storages,
                types={k: stored_type(v) for k, v in loaded.items()},
                shapes={k: tuple(v.shape) for k, v in loaded.items()},
                total=total, per_key=per_key, resident=resident_bytes(loaded), file_bytes=path.stat().st_size,
                n_tensors=sum(len(_storages(v)) for v in loaded.values()))
            del loaded, sd  # drop the memory map before the next file
    return out


@pytest.fixture(scope="module")
def rates(measured):
    """Stored type -> (bytes per element, bytes per tensor), fitted exactly over every loaded tensor of that type
    in every file of both configs (block linears and the rest alike), and checked to hold for each of them."""
    samples = {}
    for rec in measured.values():
        for k, t in rec["types"].items():
            samples.setdefault(t, set()).add((_numel(rec["shapes"][k]), rec["per_key"][k]))
    out = {}
    for t, pts in samples.items():
        sizes = sorted(pts)
        (n1, b1), (n2, b2) = sizes[0], sizes[-1]
        assert n2 > n1, (t, sizes)
        per_elem = Fraction(b2 - b1, n2 - n1)
        per_tensor = b1 - per_elem * n1
        bad = [(n, b) for n, b in sizes if per_elem * n + per_tensor != b]
        assert not bad, f"{t}: bytes are not {per_elem} x numel + {per_tensor} for {bad[:3]}"
        out[t] = (per_elem, per_tensor)
    return out


def _flux_bytes(recipe, rates, cfg=FLUX_DEV):
    """Bytes a file of `cfg` made by `recipe` holds once loaded, at the measured rates; and its block linears'
    bits per weight."""
    total = blocks = block_numel = 0
    for k, s in flux_tensor_shapes(cfg).items():
        per_elem, per_tensor = rates[recipe(k, s)]
        b = per_elem * _numel(s) + per_tensor
        total += b
        if should_quantize(k, s):
            blocks += b
            block_numel += _numel(s)
    return total, float(8 * blocks / block_numel)


CASES = [(c, v) for c in CONFIGS for v in VARIANTS]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_loaded_files_hold_what_the_recipe_wrote(measured, case):
    """The storage count is of the right thing: every tensor came back as the type written, nothing shares a
    storage, resident_bytes agrees, and the file holds at least those bytes (plus a header and alignment)."""
    rec = measured[case]
    assert rec["types"] == rec["want"]
    assert rec["info"]["flux_config"] == rec["cfg"]
    assert rec["n_storages"] == rec["n_tensors"]  # deduplication merged nothing, so per-key counts are exact
    assert rec["total"] == rec["resident"]
    overhead = rec["file_bytes"] - rec["total"]
    # GGUF: header + tensor infos + 32-byte alignment; safetensors: JSON header, NF4's quant_state JSON bytes and
    # the scaled-fp8 marker, which the loader folds into the QTensor's meta
    assert 0 <= overhead < 64 * 1024 + 512 * len(rec["types"]), overhead


def test_bits_per_weight_are_the_constants_the_model_uses(measured, rates):
    """Measured bytes per element of each storage type (scales and statistics included) against the bits the
    memory model assumes: a wrong constant fails here."""
    bits = {t: float(8 * pe) for t, (pe, _) in rates.items()}
    pure = {"bfloat16": F["bf16"].bits, "float8_e4m3fn": F["fp8_e4m3fn"].bits,
            "float8_e4m3fn_scaled": F["fp8_e4m3fn"].bits, "Q8_0": F["Q8_0"].bits, "Q6_K": F["Q6_K"].bits,
            "Q5_K": mm.MEASURED_PEAKS["Q5_K"][0], "Q4_K": mm.MEASURED_PEAKS["Q4_K"][0]}
    for t, b in pure.items():
        assert bits[t] == b, (t, bits[t], b)
    assert bits["float32"] == 32 and bits["float16"] == 16
    assert bits["Q3_K"] == 3.4375 and bits["Q2_K"] == 2.625  # ggml's 110 / 84 bytes per 256
    assert {t: pt for t, (_, pt) in rates.items() if pt} == PER_TENSOR_BYTES
    # MEASURED_PEAKS gives the bits of each measured file: they must be what such a file holds
    for family, (peak_bits, _) in mm.MEASURED_PEAKS.items():
        t = {"bf16": "bfloat16", "fp8": "float8_e4m3fn_scaled", "nf4": "nf4"}.get(family, family)
        if t == "nf4":
            continue  # below, at FLUX.1's tensor sizes
        assert bits[t] == peak_bits, family


# bytes a tensor takes besides its per-element ones: the fp8 scale (one float32), NF4's two code tables (16 and
# 256 float32); none for GGUF and plain tensors
PER_TENSOR_BYTES = {"float8_e4m3fn_scaled": 4, "nf4": (16 + 256) * 4}
NF4_BITS = 4 + Fraction(8, 64) + Fraction(32, 64 * 256)  # 4-bit codes, uint8 absmax per 64, float32 per 256 absmax


def test_nf4_bits_at_flux_sizes(rates):
    """NF4: 4 bits + a uint8 absmax per 64 + a float32 per 256 absmax (4.127 bits per weight) and 1088 bytes of
    code tables per tensor, which at FLUX.1's tensor sizes add 0.0003 bit: the model's 4.13 is that, rounded."""
    _, flux_bits = _flux_bytes(st_blocks("nf4"), rates)
    assert 8 * rates["nf4"][0] == NF4_BITS
    assert round(flux_bits, 2) == F["nf4"].bits == mm.MEASURED_PEAKS["nf4"][0]


@pytest.mark.parametrize("ftype", ["Q5_K_M", "Q4_K_M"])
def test_k_m_mix_bits_at_flux_shapes(rates, ftype):
    """The _M mixes: city96's recipe puts the double blocks' fused qkv (114 of FLUX.1's 1254 h² block weights)
    one type up; at FLUX.1's shapes that is 5.597 / 4.591 bits, which the model rounds to 5.6 / 4.6."""
    _, flux_bits = _flux_bytes(city96(ftype), rates)
    assert round(flux_bits, 1) == F[ftype].bits, flux_bits


@pytest.mark.parametrize("ftype", ["Q3_K_M", "Q2_K"])
def test_unmeasured_low_bit_mixes_err_on_the_safe_side(rates, ftype):
    """Q3_K_M / Q2_K have no measured row: their bits (3.55 / 2.7) are estimates above what city96's recipe holds
    at FLUX.1's shapes (3.534 / 2.625; Q2_K's bump rules name no FLUX tensor), by less than 0.1 bit."""
    _, flux_bits = _flux_bytes(city96(ftype), rates)
    assert flux_bits <= F[ftype].bits < flux_bits + 0.1, flux_bits


# The estimate on the small models, signed (estimate - measured) / measured. bf16: exact, everything is 16 bits.
# Blocks-only fp8 / nf4: the block linears exactly at the format's bits, plus the per-tensor bytes the model leaves
# out (NF4's code tables, 1088 B a tensor: 3 % of a 65536-weight tensor's bytes, 0.45 % of the h256 file, 0.07 %
# of FLUX.1's; the 4-byte fp8 scale): low by < 1 %. city96: low by the F32 tensors' second two bytes per
# parameter (the next test checks that to the byte): 0.76 MiB at hidden 256 and 1.47 at 512, because the
# embedders' in layers are 256 / 768 wide at any hidden size, so 4-9 % of these small files against 0.12-0.22 % of
# FLUX.1's (15 MB; the last test);
# the _M / Q2_K bits (set for FLUX.1's qkv share, or above the file's) shift it by < 1.5 %. Every 2-D quantized:
# high, since the non-block tensors (13.5-14 % of the parameters here, the real 4096-wide txt_in among them, and at
# 16 bits next to 8- to 4-bit blocks 23-38 % of the estimate) are counted at 16 bits and stored at the format's
# bits: by up to (1 - bits / 16) of that share, 11-38 % here and 0.4-1.6 % on FLUX.1.
SMALL_TOLERANCE = {"bf16": (0, 0), "blocks": (-0.01, 0), "city96": (-0.10, -0.02), "every 2-D": (0.05, 0.40)}


def _kind(vname):
    if vname == "bf16":
        return "bf16"
    if vname.endswith("every 2-D"):
        return "every 2-D"
    return "city96" if vname.endswith("city96") else "blocks"


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_estimate_against_measured_small_models(measured, case):
    rec = measured[case]
    est = mm.weight_bytes(rec["fmt"], rec["bits"], rec["cfg"])
    assert mm.weight_gib(rec["fmt"], rec["bits"], rec["cfg"]) * mm.GIB == pytest.approx(est)
    rel = (est - rec["total"]) / rec["total"]
    lo, hi = SMALL_TOLERANCE[_kind(case[1])]
    assert lo <= rel <= hi, f"estimate {est:.0f} vs measured {rec['total']} ({rel:+.2%})"


EXACT_BITS = [c for c in CASES if _kind(c[1]) in ("bf16", "blocks", "city96")
              and not c[1].startswith(("Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"))]


@pytest.mark.parametrize("case", EXACT_BITS, ids=lambda c: f"{c[0]}-{c[1]}")
def test_the_estimate_misses_only_what_the_model_says_it_leaves_out(measured, case):
    """Where the file's block type has exactly the model's bits, measured - estimate is, to the byte, the F32
    tensors' extra two bytes per parameter plus the quantized tensors' per-tensor bytes (from the config's shapes
    and the recipe, not from the measurement)."""
    rec = measured[case]
    bits = NF4_BITS if rec["fmt"].name == "nf4" else rec["bits"]  # the model's 4.13 is this, rounded (above)
    est = mm.weight_bytes(rec["fmt"], bits, rec["cfg"])
    f32_params = sum(_numel(s) for k, s in rec["shapes"].items() if rec["want"][k] == "float32")
    per_tensor = sum(PER_TENSOR_BYTES.get(t, 0) for t in rec["want"].values())
    assert rec["total"] - est == 2 * f32_params + per_tensor


# At FLUX.1's shapes, the measured rates give what a real file holds; the planner's weight_gib is within 0.25 %
# of it for the files people download (city96 GGUFs: 15 MB of F32 tensors counted at 16 bits, low by 0.12-0.22 %;
# the _M bits rounded to 0.1; blocks-only fp8 / nf4), and high, never low, by at most 2 % for files with every 2-D
# tensor quantized (67 M non-block parameters counted at 16 bits; nf4 1.6 %, Q4_K 1.3 %, Q8_0 0.4 %). Q2_K's 2.7
# bits are 0.075 above the 2.625 its file holds: high by 2.4 % (96 MB), on the safe side.
FLUX_TOLERANCE = {"bf16": (0, 0), "blocks": (-0.0025, 0.0025), "city96": (-0.0025, 0.0025), "every 2-D": (0, 0.02)}


@pytest.mark.parametrize("vname", list(VARIANTS))
def test_estimate_against_measured_rates_at_flux_shapes(rates, vname):
    _, recipe, fmt, bits = VARIANTS[vname]
    real, _ = _flux_bytes(recipe, rates)
    est = mm.weight_gib(fmt, bits) * mm.GIB
    assert mm.weight_gib(fmt, bits, FLUX_DEV) == mm.weight_gib(fmt, bits)
    rel = float((Fraction(est) - real) / real)
    lo, hi = FLUX_TOLERANCE[_kind(vname)] if vname != "Q2_K city96" else (0, 0.03)
    assert lo <= rel <= hi, f"{vname}: estimate {est / 2**30:.3f} GiB vs {float(real) / 2**30:.3f} ({rel:+.3%})"
