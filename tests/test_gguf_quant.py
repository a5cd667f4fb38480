"""GGUF torch (de)quantization: bit-exact against gguf-py, round trips, error bounds, error handling."""
import numpy as np
import pytest
import torch
import gguf.quants
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from kontext_lowvram.optimizations.quant import gguf as gq
from kontext_lowvram.optimizations.quant.common import QuantDataError, UnsupportedQuantType
from fixtures.gguf_blocks import random_blocks

# Only real devices: no skipped "cuda" params on CPU-only machines.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Where the fp16 scale fields sit in each block type (random bytes there would often decode to NaN/inf).
FP16_FIELDS = gq.FP16_FIELDS
QUANT_TYPES = list(FP16_FIELDS)
N_BLOCKS = 384


def _random_blocks(qtype, seed=0, valid_scales=True):
    """Random raw data for a 2-D tensor of N_BLOCKS blocks, as GGUFReader shapes it: (rows, bytes)."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed + int(qtype))
    blocks = rng.integers(0, 256, size=(N_BLOCKS, type_size), dtype=np.uint8)
    if valid_scales:
        for off in FP16_FIELDS[qtype]:
            scales = (rng.standard_normal(N_BLOCKS) * 0.01).astype(np.float16)
            blocks[:, off:off + 2] = scales.view(np.uint8).reshape(N_BLOCKS, 2)
    rows = 16
    raw = blocks.reshape(rows, -1)
    return raw, (rows, N_BLOCKS // rows * block_size)


def _reference(raw, qtype):
    return torch.from_numpy(gguf.quants.dequantize(raw, qtype))


def test_tables_cover_the_brief():
    assert set(gq.DEQUANTIZE_FUNCTIONS) == set(QUANT_TYPES)
    assert gq.SUPPORTED_TYPES == set(QUANT_TYPES) | {Q.F32, Q.F16, Q.BF16}
    assert gq.QUANTIZABLE_TYPES >= {Q.F32, Q.F16, Q.BF16, Q.Q8_0}
    assert gq.QUANTIZABLE_TYPES <= gq.SUPPORTED_TYPES
    for qtype, offsets in FP16_FIELDS.items():
        assert max(offsets) + 2 <= GGML_QUANT_SIZES[qtype][1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_dequantize_bit_exact(qtype, device):
    raw, shape = _random_blocks(qtype)
    ref = _reference(raw, qtype)
    assert torch.isfinite(ref).all()
    t = torch.from_numpy(raw).to(device)

    out = gq.dequantize(t, qtype, shape)
    assert out.shape == shape and out.dtype == torch.float32 and out.device == t.device
    assert torch.equal(out.cpu(), ref)
    for dtype in (torch.bfloat16, torch.float16):
        low = gq.dequantize(t, qtype, shape, dtype=dtype)
        assert low.dtype == dtype
        assert torch.equal(low.cpu(), ref.to(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_block_function_and_raw_layouts(qtype, device):
    """The per-type table function on (n_blocks, type_size), and dequantize() on a flat buffer, a
    non-contiguous view and a 3-D logical shape all agree with gguf-py."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw, shape = _random_blocks(qtype, seed=1)
    ref = _reference(raw, qtype)
    t = torch.from_numpy(raw).to(device)

    blocks = gq.DEQUANTIZE_FUNCTIONS[qtype](t.reshape(-1, type_size), torch.float32)
    assert blocks.shape == (N_BLOCKS, block_size)
    assert torch.equal(blocks.cpu().reshape(shape), ref)

    assert torch.equal(gq.dequantize(t.reshape(-1), qtype, shape).cpu(), ref)
    strided = torch.zeros(shape[0], 2 * t.shape[1], dtype=torch.uint8, device=device)[:, ::2]
    strided.copy_(t)
    assert not strided.is_contiguous()
    assert torch.equal(gq.dequantize(strided, qtype, shape).cpu(), ref)
    shape3 = (2, shape[0] // 2, shape[1])
    assert torch.equal(gq.dequantize(t, qtype, shape3).cpu(), ref.reshape(shape3))


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_dequantize_garbage_scales_match_reference(qtype):
    """Fully random bytes (NaN/inf scale fields included) still reproduce gguf-py value for value."""
    raw, shape = _random_blocks(qtype, seed=2, valid_scales=False)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = _reference(raw, qtype)
    torch.testing.assert_close(gq.dequantize(torch.from_numpy(raw), qtype, shape), ref,
                               rtol=0, atol=0, equal_nan=True)


def test_empty_tensor():
    out = gq.dequantize(torch.empty(0, dtype=torch.uint8), "Q4_K", (0, 256))
    assert out.shape == (0, 256)
    for qtype, fn in gq.DEQUANTIZE_FUNCTIONS.items():
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        assert fn(torch.empty(0, type_size, dtype=torch.uint8), torch.float16).shape == (0, block_size)
    for qtype in gq.QUANTIZABLE_TYPES:
        assert gq.quantize(torch.empty(0, 256), qtype).shape == gq.byte_shape((0, 256), qtype)
        assert gq.quantize(torch.empty(3, 0), qtype).shape == gq.byte_shape((3, 0), qtype)


# ----------------------------------------------------------------------------------------------
# Float types
# ----------------------------------------------------------------------------------------------

def _sample(shape=(16, 512), seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16], ids=lambda t: t.name)
def test_float_types_round_trip(qtype, device):
    x = _sample()
    x[0, :4] = torch.tensor([float("inf"), float("-inf"), 0.0, -0.0])
    raw = gq.quantize(x.to(device), qtype)
    assert raw.dtype == torch.uint8 and raw.device.type == device
    assert raw.shape == gguf.quants.quant_shape_to_byte_shape(x.shape, qtype)
    ref_raw = np.ascontiguousarray(gguf.quants.quantize(x.numpy(), qtype)).view(np.uint8)
    assert torch.equal(raw.cpu(), torch.from_numpy(ref_raw))

    ref = _reference(ref_raw, qtype)
    native = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}[qtype]
    assert torch.equal(ref, x.to(native).float())
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        out = gq.dequantize(raw, qtype, x.shape, dtype=dtype)
        assert out.dtype == dtype and torch.equal(out.cpu(), ref.to(dtype))
        # Already-typed float tensors (as GGUFReader returns for F32/F16) are accepted as well.
        typed = gq.dequantize(x.to(device=device, dtype=native), qtype, x.shape, dtype=dtype)
        assert torch.equal(typed.cpu(), ref.to(dtype))


def test_bf16_nan_payload_matches_ggml():
    bits = torch.tensor([0x7F800001, 0xFFC12345 - 2**32, 0x7FFFFFFF], dtype=torch.int32)
    x = bits.view(torch.float32).reshape(1, 3)
    ref = np.ascontiguousarray(gguf.quants.quantize(x.numpy(), Q.BF16)).view(np.uint8)
    assert torch.equal(gq.quantize(x, "BF16"), torch.from_numpy(ref))


def test_float_misaligned_byte_buffer():
    x = _sample((4, 8))
    buf = torch.cat([torch.zeros(1, dtype=torch.uint8), gq.quantize(x, Q.F32).reshape(-1)])[1:]
    assert buf.storage_offset() == 1
    assert torch.equal(gq.dequantize(buf, Q.F32, x.shape), x)


# ----------------------------------------------------------------------------------------------
# Block quantizers
# ----------------------------------------------------------------------------------------------

# Worst-case |x - dequant(quant(x))| per block, from the encoders' definitions (gguf-py / ggml):
#   Q8_0: d = amax/127, round to nearest        -> d/2 (+ fp16 rounding of d)      <= amax/127
#   Q4_0: d = max/-8,  q in [-8, 7]; x = -max clips from +8 to +7                 -> amax/8
#   Q5_0: d = max/-16, q in [-16, 15]; same clip at the far end                   -> amax/16
#   Q4_1: d = (max-min)/15, offset min, round to nearest                          -> <= (max-min)/15
#   Q5_1: d = (max-min)/31                                                         -> <= (max-min)/31
# Each gets a 1% slack for the fp16 rounding of d and min.
def _bound_amax(div):
    return lambda b: b.abs().amax(dim=1, keepdim=True) / div


def _bound_range(div):
    return lambda b: (b.amax(dim=1, keepdim=True) - b.amin(dim=1, keepdim=True)) / div


ERROR_BOUNDS = {
    Q.Q8_0: _bound_amax(127),
    Q.Q4_0: _bound_amax(8),
    Q.Q5_0: _bound_amax(16),
    Q.Q4_1: _bound_range(15),
    Q.Q5_1: _bound_range(31),
}
# The types gguf-py can quantize too (byte-exact here); the K-quants are tested in test_gguf_quantize.py.
K_QUANTS = {Q.Q6_K, Q.Q5_K, Q.Q4_K, Q.Q3_K, Q.Q2_K}
BLOCK_QUANTIZABLE = sorted(gq.QUANTIZABLE_TYPES - {Q.F32, Q.F16, Q.BF16} - K_QUANTS)


def test_error_bounds_cover_quantizable_types():
    assert set(BLOCK_QUANTIZABLE) == set(ERROR_BOUNDS)
    assert gq.QUANTIZABLE_TYPES >= K_QUANTS


def _quant_input(extreme=False):
    # Row scales 1e-3..1e2; `extreme` widens to 1e-8..1e6, where d underflows to fp16 subnormals
    # or overflows to inf (bit-exactness still holds there, the error bounds do not).
    lo, hi = (-8, 6) if extreme else (-3, 2)
    x = _sample((8, 512), seed=3) * torch.logspace(lo, hi, 8).unsqueeze(1)
    x[0, :32] = 0                       # all-zero block: d == 0 path
    x[1, :32] = 0.5
    x[1, 3], x[1, 7] = 2.0, -2.0        # magnitude tie with opposite signs: first one wins
    x[2, 32:64] = -1.25                 # constant block
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", BLOCK_QUANTIZABLE, ids=lambda t: t.name)
@pytest.mark.parametrize("extreme", [False, True], ids=["moderate", "extreme"])
def test_quantize_bit_exact(qtype, device, extreme):
    x = _quant_input(extreme)
    raw = gq.quantize(x.to(device), qtype)
    with np.errstate(over="ignore", invalid="ignore"):
        ref = gguf.quants.quantize(x.numpy(), qtype)
    assert raw.shape == ref.shape and raw.dtype == torch.uint8
    assert torch.equal(raw.cpu(), torch.from_numpy(ref))


@pytest.mark.parametrize("qtype", BLOCK_QUANTIZABLE, ids=lambda t: t.name)
def test_quantize_error_bound(qtype):
    x = _quant_input()
    back = gq.dequantize(gq.quantize(x, qtype), qtype, x.shape)
    block_size = GGML_QUANT_SIZES[qtype][0]
    xb, err = x.reshape(-1, block_size), (back - x).abs().reshape(-1, block_size)
    bound = ERROR_BOUNDS[qtype](xb) * 1.01
    assert (err <= bound).all(), (err - bound).max()
    assert torch.equal(back.reshape(-1, block_size)[0], torch.zeros(block_size))  # zeros stay exact


# ----------------------------------------------------------------------------------------------
# Type names, shapes, errors
# ----------------------------------------------------------------------------------------------

def test_qtype_of_accepts_enum_int_and_names():
    assert gq.qtype_of(Q.Q4_K) is Q.Q4_K
    assert gq.qtype_of(int(Q.Q4_K)) is Q.Q4_K
    assert gq.qtype_of("Q4_K") is Q.Q4_K
    assert gq.qtype_of("q4_k") is Q.Q4_K
    assert gq.qtype_of(np.int32(8)) is Q.Q8_0
    assert gq.is_quantized("Q8_0") and gq.is_quantized(Q.IQ4_XS)
    assert not any(gq.is_quantized(t) for t in ("F32", "F16", "BF16"))


@pytest.mark.parametrize("bad", [9999, "Q7_Z", Q.IQ2_XXS, "iq1_s", None])
def test_unknown_type_rejected(bad):
    with pytest.raises(UnsupportedQuantType, match="Q4_K") as info:
        gq.qtype_of(bad)
    assert "IQ4_XS" in str(info.value)  # the message lists what is supported
    with pytest.raises(UnsupportedQuantType):
        gq.dequantize(torch.zeros(64, dtype=torch.uint8), bad, (1, 256))


def test_quantize_unsupported_type_names_quantizable():
    with pytest.raises(UnsupportedQuantType, match="Q8_0"):
        gq.quantize(torch.zeros(1, 256), "IQ4_XS")


@pytest.mark.parametrize("qtype", sorted(gq.SUPPORTED_TYPES), ids=lambda t: t.name)
def test_byte_shape_matches_gguf(qtype):
    shape = (3, 5, 2 * 256)
    assert gq.byte_shape(shape, qtype) == gguf.quants.quant_shape_to_byte_shape(shape, qtype)


def test_row_not_multiple_of_block_size():
    with pytest.raises(QuantDataError, match="block size 256"):
        gq.byte_shape((4, 100), "Q4_K")
    with pytest.raises(QuantDataError, match="block size 32"):
        gq.dequantize(torch.zeros(4 * 34, dtype=torch.uint8), Q.Q8_0, (4, 40))
    with pytest.raises(QuantDataError):
        gq.quantize(torch.zeros(4, 40), Q.Q8_0)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q8_0, Q.F16])
def test_truncated_data(qtype):
    shape = (4, 512)
    n_bytes = int(np.prod(gq.byte_shape(shape, qtype)))
    raw = torch.zeros(n_bytes - 7, dtype=torch.uint8)
    with pytest.raises(QuantDataError, match=rf"expected {n_bytes} bytes, got {n_bytes - 7} bytes"):
        gq.dequantize(raw, qtype, shape)


def test_wrong_raw_dtype():
    with pytest.raises(QuantDataError, match="uint8"):
        gq.dequantize(torch.zeros(4, 256), Q.Q8_0, (4, 256))
    with pytest.raises(QuantDataError):
        gq.DEQUANTIZE_FUNCTIONS[Q.Q4_K](torch.zeros(3, 100, dtype=torch.uint8), torch.float32)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q3_K, Q.IQ4_XS, Q.Q8_0])
def test_random_blocks_have_the_requested_scale(qtype):
    raw = random_blocks(qtype, (64, 512), std=0.05, seed=3)
    assert raw.dtype == torch.uint8 and tuple(raw.shape) == gq.byte_shape((64, 512), qtype)
    ref = _reference(raw.numpy(), qtype)  # gguf-py's view of the same bytes
    assert torch.isfinite(ref).all()
    assert abs(ref.std().item() - 0.05) < 0.005
    assert not torch.equal(raw, random_blocks(qtype, (64, 512), std=0.05, seed=4))
