"""NF4 (bitsandbytes 4-bit NormalFloat) against an independent reference written from bitsandbytes' kernels.

The reference below never calls the module under test: it walks the CUDA kernel's NF4 decision tree
(``dQuantizeNF4``, thresholds copied from csrc/kernels.cu) and its 8-bit binary search (``dQuantize<0>``) element
by element in numpy float32, so bit-exact agreement checks the vectorised torch code against bitsandbytes' own
algorithm. When bitsandbytes is importable, extra tests compare with it directly.
"""
import hashlib
import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from kontext_lowvram.optimizations.quant import nf4
from kontext_lowvram.optimizations.quant.common import QuantDataError, UnsupportedQuantType

f32 = np.float32

# ------------------------------------------------------------------------------------------------------------------
# Independent reference

# bitsandbytes.functional.get_4bit_type("nf4")
REF_NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=f32)
# sha256 of the float32 bytes of bitsandbytes 0.50.2's get_4bit_type("nf4", device="cpu")
BNB_NF4_SHA256 = "8501941daa1b8a90ad1bbfeb632e5101b5dddbc4bb52d6e55abcfd777e60c06a"


def _t(x):  # float32 literal, as nvcc reads `0.123f`
    return float(f32(x))


def ref_nf4_code(x: float) -> int:
    """csrc/kernels.cu dQuantizeNF4, verbatim."""
    if x > _t(0.03979014977812767):
        if x > _t(0.3893125355243683):
            if x > _t(0.6427869200706482):
                return 0b1111 if x > _t(0.8614784181118011) else 0b1110
            return 0b1101 if x > _t(0.5016634166240692) else 0b1100
        if x > _t(0.2035212516784668):
            return 0b1011 if x > _t(0.2920137718319893) else 0b1010
        return 0b1001 if x > _t(0.1202552504837513) else 0b1000
    if x > _t(-0.33967943489551544):
        if x > _t(-0.13791173323988914):
            return 0b0111 if x > _t(-0.045525018125772476) else 0b0110
        return 0b0101 if x > _t(-0.23460740596055984) else 0b0100
    if x > _t(-0.6106329262256622):
        return 0b0011 if x > _t(-0.4599952697753906) else 0b0010
    return 0b0001 if x > _t(-0.8480964004993439) else 0b0000


def ref_dynamic_map() -> np.ndarray:
    """bitsandbytes create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8) in exact (double) math."""
    data = [0.0, 1.0]
    for i in range(7):
        bounds = [0.1 + 0.9 * j / 2 ** i for j in range(2 ** i + 1)]
        for lo, hi in zip(bounds, bounds[1:]):
            v = 10.0 ** (i - 6) * (lo + hi) / 2
            data += [v, -v]
    assert len(data) == 256
    return np.array(sorted(data), dtype=f32)


REF_DYN = ref_dynamic_map()


def ref_code8(code: np.ndarray, x: f32) -> int:
    """csrc/kernels.cu dQuantize<0>: binary search over the sorted 256-entry map, then nearest of the bracket
    (midpoints rounded to float32 as the kernel computes them)."""
    pivot, upper_pivot, lower_pivot = 127, 255, 0
    lower, upper = f32(-1.0), f32(1.0)
    val = code[pivot]
    i = 64
    while i > 0:
        if x > val:
            lower_pivot, lower, pivot = pivot, val, pivot + i
        else:
            upper_pivot, upper, pivot = pivot, val, pivot - i
        val = code[pivot]
        i >>= 1
    if upper_pivot == 255:
        upper = code[255]
    if lower_pivot == 0:
        lower = code[0]
    if x > val:
        return upper_pivot if x > (upper + val) * f32(0.5) else pivot
    # The kernel has `x < midpoint` here, so an exact midpoint goes to the even index; we (and bitsandbytes' torch
    # backend) send every exact midpoint to the lower index, hence `<=`. Nothing else differs.
    return lower_pivot if x <= (lower + val) * f32(0.5) else pivot


def ref_blocks(x: np.ndarray, blocksize: int):
    """Per block: absmax and x * (1 / absmax) in float32 (an all-zero block scales by 0)."""
    for start in range(0, len(x), blocksize):
        blk = x[start:start + blocksize]
        absmax = f32(np.abs(blk).max())
        inv = f32(1.0) / absmax if absmax > 0 else f32(0.0)
        yield absmax, blk * inv


def ref_quantize(w: np.ndarray, blocksize: int, nested: bool) -> dict:
    x = w.astype(f32).reshape(-1)
    codes, absmax = [], []
    for am, scaled in ref_blocks(x, blocksize):
        absmax.append(am)
        codes += [ref_nf4_code(float(s)) for s in scaled]
    if len(codes) % 2:
        codes.append(ref_nf4_code(0.0))  # bitsandbytes quantizes the spare low nibble from a 0.0
    packed = np.array([(hi << 4) | lo for hi, lo in zip(codes[::2], codes[1::2])], dtype=np.uint8).reshape(-1, 1)
    out = {"packed": packed, "absmax": np.array(absmax, dtype=f32)}
    if nested:
        absmax = out["absmax"]
        offset = f32(math.fsum(float(a) for a in absmax) / len(absmax))  # exact mean, rounded once
        centered = absmax - offset
        qabs, nabs = [], []
        for am, scaled in ref_blocks(centered, 256):
            nabs.append(am)
            qabs += [ref_code8(REF_DYN, s) for s in scaled]
        out.update(absmax=np.array(qabs, dtype=np.uint8), nested_absmax=np.array(nabs, dtype=f32),
                   nested_offset=offset)
    return out


def ref_dequantize(r: dict, n: int, blocksize: int) -> np.ndarray:
    absmax = r["absmax"]
    if "nested_absmax" in r:  # code * scale rounded to float32, then + offset rounded again (two steps)
        absmax = np.array([f32(REF_DYN[q] * r["nested_absmax"][i // 256]) + r["nested_offset"]
                           for i, q in enumerate(absmax)], dtype=f32)
    out = np.empty(n, dtype=f32)
    for i in range(n):
        byte = int(r["packed"][i // 2, 0])
        code = byte >> 4 if i % 2 == 0 else byte & 0x0F
        out[i] = REF_NF4[code] * absmax[i // blocksize]
    return out


# ------------------------------------------------------------------------------------------------------------------
# Test data

MIDS = (REF_NF4[:-1] + REF_NF4[1:]) / f32(2)  # the decision thresholds


def near_thresholds(absmax: f32) -> np.ndarray:
    """Values within one ulp of threshold * absmax: there x * (1/absmax), which bitsandbytes' kernels compute, and
    x / absmax often land on different sides of the threshold."""
    x0 = (MIDS * absmax).astype(f32)
    return np.concatenate([np.nextafter(x0, f32(-np.inf)), x0, np.nextafter(x0, f32(np.inf))]).astype(f32)


def crafted(n: int, seed: int) -> torch.Tensor:
    """Normal data plus the awkward cases (where n allows): an all-zero block, a block of exact NF4 values, every
    threshold exactly (absmax 1, so x * (1/absmax) == threshold: ties go to the lower code) and values straddling
    the thresholds by one ulp. Laid out so each case works for blocksizes 32 to 128."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g) * 0.02
    if n >= 4 * 64:
        w[64:128] = 0.0
        w[128:144] = torch.from_numpy(REF_NF4) * 0.5
        w[192:192 + 15] = torch.from_numpy(MIDS)
        w[192 + 15] = 1.0
    if n >= 5 * 64:
        a = f32(1.4554425)
        near = torch.from_numpy(near_thresholds(a))  # 45 values, absmax a leads each 32-element half
        w[256], w[288] = float(a), float(a)
        w[257:257 + 31], w[289:289 + 14] = near[:31], near[31:]
    return w


CASES = [  # (shape, blocksize): multiples of the block, ragged tails, odd numel, > 256 blocks (two nested blocks)
    ((4, 64), 64),
    ((3, 100), 64),
    ((7, 9), 64),
    ((1,), 64),
    ((5, 77), 32),
    ((300 * 32 + 17,), 32),
    ((2, 300), 128),
]


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("shape,blocksize", CASES, ids=[f"{s}-bs{b}" for s, b in CASES])
def test_matches_reference_bit_exact(shape, blocksize, dtype, nested):
    n = math.prod(shape)
    w = crafted(n, seed=n + blocksize).reshape(shape).to(dtype)
    ref = ref_quantize(w.float().numpy(), blocksize, nested)
    q = nf4.quantize_nf4(w, blocksize=blocksize, double_quant=nested)

    assert q.shape == shape and q.blocksize == blocksize and q.dtype == dtype
    assert q.packed.dtype == torch.uint8 and q.packed.shape == ((n + 1) // 2, 1)
    np.testing.assert_array_equal(q.packed.numpy(), ref["packed"])
    np.testing.assert_array_equal(q.code.numpy().view(np.uint32), REF_NF4.view(np.uint32))
    if nested:
        assert q.absmax.dtype == torch.uint8
        np.testing.assert_array_equal(q.absmax.numpy(), ref["absmax"])
        np.testing.assert_array_equal(q.nested_absmax.numpy().view(np.uint32), ref["nested_absmax"].view(np.uint32))
        assert f32(q.nested_offset).view(np.uint32) == ref["nested_offset"].view(np.uint32)
        np.testing.assert_array_equal(q.nested_code.numpy().view(np.uint32), REF_DYN.view(np.uint32))
        assert q.nested_blocksize == 256
    else:
        assert q.absmax.dtype == torch.float32 and q.nested_absmax is None
        np.testing.assert_array_equal(q.absmax.numpy().view(np.uint32), ref["absmax"].view(np.uint32))

    deq = nf4.dequantize_nf4(q)
    assert deq.shape == shape and deq.dtype == torch.float32
    expected = ref_dequantize(ref, n, blocksize)
    np.testing.assert_array_equal(deq.reshape(-1).numpy().view(np.uint32), expected.view(np.uint32))


def test_threshold_ties_go_to_lower_code():
    w = crafted(4 * 64, seed=1)
    q = nf4.quantize_nf4(w, double_quant=False)
    codes = torch.stack((q.packed[:, 0] >> 4, q.packed[:, 0] & 15), 1).reshape(-1)
    assert codes[192:192 + 15].tolist() == list(range(15))  # midpoint between code k and k+1 -> k
    assert codes[128:144].tolist() == list(range(16))       # exact NF4 values -> their own code
    assert codes[64:128].tolist() == [7] * 64                # zero block -> the exact 0.0


def test_nested_offset_is_the_exact_mean():
    # absmax spread over six decades, where a float32 running sum loses bits: the offset must still be the exact
    # mean rounded once, so the same weight gives the same bytes on every device.
    g = torch.Generator().manual_seed(9)
    w = torch.randn(700, 64, generator=g) * (10.0 ** torch.randint(-3, 4, (700, 1), generator=g))
    q = nf4.quantize_nf4(w)
    absmax = w.abs().amax(1).numpy()
    assert f32(q.nested_offset) == f32(math.fsum(absmax.tolist()) / len(absmax))


def test_code_tables():
    assert hashlib.sha256(nf4.NF4_CODE.numpy().tobytes()).hexdigest() == BNB_NF4_SHA256
    assert hashlib.sha256(REF_NF4.tobytes()).hexdigest() == BNB_NF4_SHA256
    np.testing.assert_array_equal(nf4.DYNAMIC_CODE.numpy().view(np.uint32), REF_DYN.view(np.uint32))
    assert len(set(REF_DYN.tolist())) == 256 and REF_DYN[-1] == 1.0 and 0.0 in REF_DYN


def test_subnormal_block_scales_like_a_normal_one():
    # 1/absmax overflows float32 for subnormal absmax; codes must match the same block scaled up exactly by 2**100.
    w = torch.randn(128, generator=torch.Generator().manual_seed(3))
    tiny = w * 2.0 ** -140
    assert tiny.abs().max() < torch.finfo(torch.float32).tiny
    a = nf4.quantize_nf4(tiny, double_quant=False)
    b = nf4.quantize_nf4(tiny * 2.0 ** 100, double_quant=False)
    assert torch.equal(a.packed, b.packed)
    assert torch.isfinite(nf4.dequantize_nf4(a)).all()


def test_error_bound_normal_data():
    # NF4 with blocksize 64 on N(0, 1): mean |error| is about 0.073 std (0.0729 measured); double quantization of
    # absmax adds ~0.1%. Bound with margin:
    w = torch.randn(512, 512, generator=torch.Generator().manual_seed(0)) * 0.03
    for nested in (False, True):
        err = nf4.dequantize_nf4(nf4.quantize_nf4(w, double_quant=nested)) - w
        assert (err.abs().mean() / w.std()).item() < 0.08
        # no element is further than half the widest NF4 gap (0.1519 at the top) from its block's scaled value
        assert (err.abs().max() / w.abs().max()).item() < 0.16


def test_dequantize_dtype_device_and_storage():
    w = torch.randn(33, 72, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    q = nf4.quantize_nf4(w)
    full = nf4.dequantize_nf4(q)
    assert torch.equal(nf4.dequantize_nf4(q, dtype=torch.bfloat16), full.to(torch.bfloat16))
    assert torch.equal(nf4.dequantize_nf4(q, dtype=torch.float16, device="cpu"), full.to(torch.float16))
    moved = q.to("cpu")
    assert torch.equal(nf4.dequantize_nf4(moved), full) and moved.nested_offset == q.nested_offset
    nb = -(-w.numel() // 64)
    assert q.nbytes() == w.numel() // 2 + nb + 16 * 4 + (-(-nb // 256)) * 4 + 256 * 4

    # Params4bit(quant_storage=torch.bfloat16) stores the same bytes viewed as another dtype
    sd = nf4.to_bnb_state_dict(q, "")
    sd["weight"] = sd["weight"].reshape(-1).view(torch.bfloat16).reshape(-1, 1)
    assert torch.equal(nf4.dequantize_nf4(nf4.from_bnb_state_dict(sd, "weight")), full)


# ------------------------------------------------------------------------------------------------------------------
# bitsandbytes state-dict format

PREFIX = "model.diffusion_model.double_blocks.0.img_attn.qkv."


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_state_dict_keys_and_quant_state_json(nested):
    q = nf4.quantize_nf4(torch.randn(3, 100).to(torch.bfloat16), double_quant=nested)
    sd = nf4.to_bnb_state_dict(q, PREFIX)
    p = PREFIX + "weight"
    aux = [".absmax", ".quant_map"] + ([".nested_absmax", ".nested_quant_map"] if nested else [])
    assert set(sd) == {p, p + ".quant_state.bitsandbytes__nf4"} | {p + s for s in aux}
    assert sd[p].dtype == torch.uint8 and sd[p].shape == (150, 1)
    assert sd[p + ".quant_map"].dtype == torch.float32 and sd[p + ".quant_map"].shape == (16,)
    raw = bytes(sd[p + ".quant_state.bitsandbytes__nf4"].tolist())
    # byte-for-byte what bitsandbytes 0.50.2's pack_dict_to_tensor(QuantState.as_dict()) wrote for the same weight
    expected = '{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [3, 100]'
    if nested:
        expected += f', "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": {q.nested_offset!r}'
    assert raw.decode() == expected + "}"
    assert sd[p + ".absmax"].dtype == (torch.uint8 if nested else torch.float32)

    assert not nf4.is_bnb_nf4_key(p) and not nf4.is_bnb_nf4_key(PREFIX + "bias")
    assert all(nf4.is_bnb_nf4_key(k) for k in sd if k != p)
    assert nf4.is_bnb_nf4_key(p + ".quant_state.bitsandbytes__fp4")


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_safetensors_round_trip(tmp_path, nested):
    w = torch.randn(48, 130, generator=torch.Generator().manual_seed(7)).to(torch.float16)
    q = nf4.quantize_nf4(w, blocksize=64, double_quant=nested)
    sd = nf4.to_bnb_state_dict(q, PREFIX)
    sd[PREFIX + "bias"] = torch.zeros(48, dtype=torch.float16)
    path = tmp_path / "flux-nf4.safetensors"
    save_file(sd, str(path))
    loaded = load_file(str(path))
    back = nf4.from_bnb_state_dict(loaded, PREFIX + "weight")
    assert back.shape == (48, 130) and back.dtype == torch.float16 and back.blocksize == 64
    assert back.nested_offset == q.nested_offset and back.nested_blocksize == q.nested_blocksize
    assert torch.equal(nf4.dequantize_nf4(back), nf4.dequantize_nf4(q))
    # and writing it out again gives identical entries
    again = nf4.to_bnb_state_dict(back, PREFIX)
    assert all(torch.equal(again[k], sd[k]) for k in again)


def _sd(nested=True):
    return nf4.to_bnb_state_dict(nf4.quantize_nf4(torch.randn(8, 64), double_quant=nested), "blk.")


@pytest.mark.parametrize("suffix", ["", ".absmax", ".quant_map", ".quant_state.bitsandbytes__nf4",
                                    ".nested_absmax", ".nested_quant_map"])
def test_missing_key_is_named(suffix):
    sd = _sd()
    del sd["blk.weight" + suffix]
    with pytest.raises(ValueError, match="missing key 'blk.weight" + suffix.replace(".", r"\.") + "'"):
        nf4.from_bnb_state_dict(sd, "blk.weight")


def test_fp4_is_refused():
    sd = _sd(nested=False)
    qs = sd.pop("blk.weight.quant_state.bitsandbytes__nf4")
    fp4 = json.loads(bytes(qs.tolist()))
    fp4["quant_type"] = "fp4"
    as_tensor = torch.tensor(list(json.dumps(fp4).encode()), dtype=torch.uint8)
    with pytest.raises(UnsupportedQuantType, match="FP4.*only NF4"):  # bitsandbytes' FP4 key
        nf4.from_bnb_state_dict({**sd, "blk.weight.quant_state.bitsandbytes__fp4": as_tensor}, "blk.weight")
    with pytest.raises(ValueError, match="quant_type 'fp4' is not supported; only 'nf4'"):  # fp4 under the nf4 key
        nf4.from_bnb_state_dict({**sd, "blk.weight.quant_state.bitsandbytes__nf4": as_tensor}, "blk.weight")


@pytest.mark.parametrize("payload", [b'{"quant_type": "nf4", "blocksize": 6', b"\xff\xfe", b"[1, 2]"])
def test_corrupt_quant_state(payload):
    sd = _sd()
    sd["blk.weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(payload), dtype=torch.uint8)
    with pytest.raises(QuantDataError, match="quant_state.bitsandbytes__nf4"):
        nf4.from_bnb_state_dict(sd, "blk.weight")


def test_inconsistent_sizes_and_fields():
    sd = _sd()
    bad = dict(sd, **{"blk.weight": sd["blk.weight"][:-1]})
    with pytest.raises(QuantDataError, match=r"'blk.weight' has 255 elements, expected 256"):
        nf4.from_bnb_state_dict(bad, "blk.weight")
    qs = json.loads(bytes(sd["blk.weight.quant_state.bitsandbytes__nf4"].tolist()))
    for field, value in [("blocksize", 0), ("shape", "8x64"), ("dtype", "floaty"), ("nested_offset", None)]:
        broken = dict(qs, **{field: value})
        t = torch.tensor(list(json.dumps(broken).encode()), dtype=torch.uint8)
        with pytest.raises(QuantDataError, match=field if field != "dtype" else "unknown dtype"):
            nf4.from_bnb_state_dict(dict(sd, **{"blk.weight.quant_state.bitsandbytes__nf4": t}), "blk.weight")


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="blocksize"):
        nf4.quantize_nf4(torch.randn(64), blocksize=48)
    with pytest.raises(ValueError, match="floating-point"):
        nf4.quantize_nf4(torch.ones(64, dtype=torch.int32))
    with pytest.raises(ValueError, match="empty"):
        nf4.quantize_nf4(torch.empty(0, 64))


# ------------------------------------------------------------------------------------------------------------------
# Against bitsandbytes itself, only where it is installed (defined conditionally so nothing shows up as skipped)

if importlib.util.find_spec("bitsandbytes") is not None:
    BNB_CASES = [((3, 100), 64), ((64, 64), 32), ((257, 129), 64), ((9617,), 32)]

    @pytest.fixture
    def bnb_functional():
        import bitsandbytes.functional as F
        # bitsandbytes torch.compile()s its CPU fallbacks; eager mode computes the same float32 products, fast.
        with torch.compiler.set_stance("force_eager"):
            yield F

    def test_bnb_code_tables(bnb_functional):
        F = bnb_functional
        assert torch.equal(nf4.NF4_CODE, F.get_4bit_type("nf4", device="cpu"))
        # bitsandbytes builds its dynamic map with float32 torch ops; ours is the same formula rounded once.
        ulps = nf4.DYNAMIC_CODE.view(torch.int32) - F.create_dynamic_map().view(torch.int32)
        assert ulps.abs().max() <= 1

    @pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
    @pytest.mark.parametrize("shape,blocksize", BNB_CASES, ids=[f"{s}-bs{b}" for s, b in BNB_CASES])
    def test_matches_bitsandbytes(bnb_functional, shape, blocksize, dtype, nested):
        F = bnb_functional
        w = crafted(math.prod(shape), seed=11).reshape(shape).to(dtype)
        packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
        q = nf4.quantize_nf4(w, blocksize=blocksize, double_quant=nested)
        assert torch.equal(q.packed, packed)
        if nested:
            # bitsandbytes takes a float32 mean and (on CPU) maps absmax to 8 bits through a 65536-bin lookup table
            # rather than exact nearest; both are a rounding step at most.
            assert q.nested_offset == pytest.approx(state.offset.item(), rel=1e-6)
            torch.testing.assert_close(q.nested_absmax, state.state2.absmax, rtol=1e-6, atol=0)
            assert (q.absmax.int() - state.absmax.int()).abs().max() <= 1
        else:
            assert torch.equal(q.absmax, state.absmax)

        # bitsandbytes' state dict -> our loader: bit-identical values
        theirs = {"w.weight": packed, **{"w.weight." + k: v for k, v in state.as_dict(packed=True).items()}}
        ref = F.dequantize_4bit(packed, state, quant_type="nf4")
        assert torch.equal(nf4.dequantize_nf4(nf4.from_bnb_state_dict(theirs, "w.weight"), dtype=dtype), ref)
        # our state dict -> bitsandbytes' loader: bit-identical values, same keys and JSON fields
        ours = nf4.to_bnb_state_dict(q, "w.")
        assert set(ours) == set(theirs)
        qs = F.QuantState.from_dict({k[len("w.weight."):]: v for k, v in ours.items() if k != "w.weight"}, "cpu")
        assert torch.equal(F.dequantize_4bit(ours["w.weight"], qs, quant_type="nf4"), nf4.dequantize_nf4(q, dtype))
        j_ours = json.loads(bytes(ours["w.weight.quant_state.bitsandbytes__nf4"].tolist()))
        j_theirs = json.loads(bytes(theirs["w.weight.quant_state.bitsandbytes__nf4"].tolist()))
        assert list(j_ours) == list(j_theirs)
        assert {k: v for k, v in j_ours.items() if k != "nested_offset"} == \
            {k: v for k, v in j_theirs.items() if k != "nested_offset"}
