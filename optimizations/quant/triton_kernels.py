"""Triton device code: one block decoder per format, shared by the dequant kernels and the fused small-batch matmul.

Imported only by triton_dequant._kernels(), which loads this file twice when needed: as a normal module (kernels
compiled by @triton.jit) and as a second copy with KLV_INTERPRET set before it runs (the same bodies wrapped for
Triton's numpy interpreter, used for CPU tensors). Two copies rather than one module with two modes because
Triton resolves a kernel's helpers through the module's globals (Triton < 3.4 cannot see closures).

A decoder takes `blk`, pointers to the first byte of quant blocks (any shape ending in two unit axes, e.g.
[NB, 1, 1] or [BN, KB, 1, 1]) and a mask of the same shape, and returns the block values in float32 as
[..., S, W] in storage order (S * W = elements per block): the dequant kernel stores them, the matmul kernel
multiplies them with the activations. Every product is exact in float32 (see triton_dequant's docstring), so
both kernels see the same values as the torch reference in gguf.py.
"""
import triton
import triton.language as tl

try:
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - very old triton
    from triton.language.math import libdevice  # type: ignore

if globals().get("KLV_INTERPRET"):
    from triton.runtime.interpreter import InterpretedFunction as jit
else:
    jit = triton.jit


# ----------------------------------------------------------------------------------------------------------------
# small pieces

@jit
def _f16(p, m):
    """A little-endian fp16 field at p (2 bytes) as float32."""
    return ((tl.load(p, mask=m, other=0).to(tl.uint16) | (tl.load(p + 1, mask=m, other=0).to(tl.uint16) << 8))
            .to(tl.float16, bitcast=True).to(tl.float32))


@jit
def _k_scale_min(blk, s, m):
    """Q4_K/Q5_K: (d * scale, dmin * min) of sub-block s; d and dmin are the block's first two fp16 fields, the
    6-bit scales and mins are packed in the twelve bytes at blk + 4 (gguf._k_scale_min)."""
    x = tl.load(blk + 8 + s, mask=m, other=0).to(tl.int32)         # scales[s+4]
    y = tl.load(blk + 4 + s, mask=m, other=0).to(tl.int32)         # scales[s]
    z = tl.load(blk + 4 + (s % 4), mask=m, other=0).to(tl.int32)   # scales[s-4] for s >= 4
    sc = tl.where(s < 4, y & 0x3F, (x & 0x0F) | ((z >> 2) & 0x30))
    mn = tl.where(s < 4, x & 0x3F, (x >> 4) | ((y >> 2) & 0x30))
    return _f16(blk, m) * sc.to(tl.float32), _f16(blk + 2, m) * mn.to(tl.float32)


@jit
def _sum(x, AXIS: tl.constexpr):
    """tl.sum(x, AXIS), spelled with builtins: tl.sum and tl.zeros are themselves @jit functions, which the
    interpreted copy of this file cannot call (Triton was imported without TRITON_INTERPRET); the interpreter
    still maps _sum_combine to numpy's sum."""
    return tl.reduce(x, AXIS, tl.standard._sum_combine)


@jit
def _cast(val, dtype: tl.constexpr, BF16_BITS: tl.constexpr):
    """val (float32) in `dtype`. The interpreter's float32 -> bf16 cast truncates: there we round to nearest even
    by hand, as the GPU and torch do."""
    if BF16_BITS:
        bits = val.to(tl.uint32, bitcast=True)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return val.to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# block decoders: blk [..., 1, 1] -> float32 [..., S, W]

@jit
def _q8_0(blk, m):
    # d[2] qs[32] (int8)
    k = tl.arange(0, 32)[None, :]
    q = tl.load(blk + 2 + k, mask=m, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    return q * _f16(blk, m)


@jit
def _nibbles_32(blk, at, m):
    """The 32 four-bit quants of a 32-element block (Q4_0/Q4_1/Q5_x low bits/IQ4_NL) as int32 [2, 16]: the 16
    bytes at blk + at hold quants 0-15 in their low nibbles and 16-31 in their high nibbles."""
    h = tl.arange(0, 2)[:, None]
    k = tl.arange(0, 16)[None, :]
    return (tl.load(blk + at + k, mask=m, other=0).to(tl.int32) >> (h * 4)) & 0xF


@jit
def _q4_0(blk, m):
    # d[2] qs[16]; value d * (q - 8)
    return _f16(blk, m) * (_nibbles_32(blk, 2, m).to(tl.float32) - 8.0)


@jit
def _q4_k(blk, m):
    # d[2] dmin[2] scales[12] qs[128]; 8 sub-blocks of 32, sub-block s = nibble s%2 of qs[(s//2)*32 + k]
    s = tl.arange(0, 8)[:, None]
    k = tl.arange(0, 32)[None, :]
    dl, ml = _k_scale_min(blk, s, m)
    byte = tl.load(blk + 16 + (s // 2) * 32 + k, mask=m, other=0).to(tl.int32)
    q = ((byte >> ((s % 2) * 4)) & 0xF).to(tl.float32)
    return dl * q - ml


@jit
def _q5_k(blk, m):
    # d[2] dmin[2] scales[12] qh[32] qs[128]; bit s of qh[k] is the 5th bit of quant s*32+k
    s = tl.arange(0, 8)[:, None]
    k = tl.arange(0, 32)[None, :]
    dl, ml = _k_scale_min(blk, s, m)
    low = (tl.load(blk + 48 + (s // 2) * 32 + k, mask=m, other=0).to(tl.int32) >> ((s % 2) * 4)) & 0xF
    high = (tl.load(blk + 16 + k, mask=m, other=0).to(tl.int32) >> s) & 1
    q = (low | (high << 4)).to(tl.float32)
    return dl * q - ml


@jit
def _q6_k(blk, m):
    # ql[128] qh[64] scales[16] (int8) d[2]; quant j = g*128 + p*32 + k with g = s//4, p = s%4
    s = tl.arange(0, 8)[:, None]
    k = tl.arange(0, 32)[None, :]
    g = s // 4
    p = s % 4
    low = (tl.load(blk + g * 64 + (p % 2) * 32 + k, mask=m, other=0).to(tl.int32) >> ((p // 2) * 4)) & 0xF
    high = (tl.load(blk + 128 + g * 32 + k, mask=m, other=0).to(tl.int32) >> (p * 2)) & 3
    q = (low | (high << 4)).to(tl.float32) - 32.0
    sc = tl.load(blk + 192 + s * 2 + k // 16, mask=m, other=0).to(tl.int8, bitcast=True).to(tl.float32)
    dl = _f16(blk + 208, m) * sc
    return dl * q


@jit
def _q3_k(blk, m):
    # hmask[32] qs[64] scales[12] d[2]; 16 sub-blocks of 16 with signed 6-bit scales
    s = tl.arange(0, 8)[:, None]
    k = tl.arange(0, 32)[None, :]
    t = s * 2 + k // 16  # sub-block of 16
    sc_low = (tl.load(blk + 96 + t % 8, mask=m, other=0).to(tl.int32) >> ((t // 8) * 4)) & 0xF
    sc_high = (tl.load(blk + 104 + t % 4, mask=m, other=0).to(tl.int32) >> ((t // 4) * 2)) & 3
    sc = (sc_low | (sc_high << 4)).to(tl.float32) - 32.0
    dl = _f16(blk + 108, m) * sc
    ql = (tl.load(blk + 32 + (s // 4) * 32 + k, mask=m, other=0).to(tl.int32) >> ((s % 4) * 2)) & 3
    hm = (tl.load(blk + k, mask=m, other=0).to(tl.int32) >> s) & 1
    q = (ql - ((hm ^ 1) << 2)).to(tl.float32)
    return dl * q


@jit
def _q4_1(blk, m):
    # d[2] m[2] qs[16]; value d * q + m
    return _f16(blk, m) * _nibbles_32(blk, 4, m).to(tl.float32) + _f16(blk + 2, m)


@jit
def _q5_bits(blk, qh_at, qs_at, m):
    """Q5_0/Q5_1 quants [2, 16]: low nibbles from qs (_nibbles_32), bit j of the little-endian uint32 qh is the
    5th bit of quant j = h*16 + k."""
    j = tl.arange(0, 2)[:, None] * 16 + tl.arange(0, 16)[None, :]
    high = (tl.load(blk + qh_at + j // 8, mask=m, other=0).to(tl.int32) >> (j % 8)) & 1
    return _nibbles_32(blk, qs_at, m) | (high << 4)


@jit
def _q5_0(blk, m):
    # d[2] qh[4] qs[16]; value d * (q - 16)
    return _f16(blk, m) * (_q5_bits(blk, 2, 6, m).to(tl.float32) - 16.0)


@jit
def _q5_1(blk, m):
    # d[2] m[2] qh[4] qs[16]; value d * q + m
    return _f16(blk, m) * _q5_bits(blk, 4, 8, m).to(tl.float32) + _f16(blk + 2, m)


@jit
def _q2_k(blk, m):
    # scales[16] qs[64] d[2] dmin[2]; quant s*32 + k (s = g*4 + p) is bits 2p of qs[g*32 + k]; sub-block of 16
    # t = s*2 + k//16 has scale d * (scales[t] & 15) and min dmin * (scales[t] >> 4)
    s = tl.arange(0, 8)[:, None]
    k = tl.arange(0, 32)[None, :]
    sc = tl.load(blk + s * 2 + k // 16, mask=m, other=0).to(tl.int32)
    dl = _f16(blk + 80, m) * (sc & 0xF).to(tl.float32)
    ml = _f16(blk + 82, m) * (sc >> 4).to(tl.float32)
    q = ((tl.load(blk + 16 + (s // 4) * 32 + k, mask=m, other=0).to(tl.int32) >> ((s % 4) * 2)) & 3)
    return dl * q.to(tl.float32) - ml


@jit
def _iq4_value(q):
    """kvalues_iq4nl[q] (gguf.IQ4NL_KVALUES: -127 -104 -83 -65 -49 -35 -22 -10 1 13 25 38 53 69 89 113) for 4-bit
    indices q, as float32: the sixteen int8 values packed four per int32 word, no table in memory."""
    word = tl.where(q < 4, -1079142271, tl.where(q < 8, -152379953, tl.where(q < 12, 639175937, 1901675829)))
    v = (word >> ((q & 3) * 8)) & 0xFF
    return tl.where(v >= 128, v - 256, v).to(tl.float32)


@jit
def _iq4_nl(blk, m):
    # d[2] qs[16]; as Q4_0, each nibble an index into kvalues
    return _f16(blk, m) * _iq4_value(_nibbles_32(blk, 2, m))


@jit
def _iq4_xs(blk, m):
    # d[2] scales_h[2] scales_l[4] qs[128]; sub-block s (32 quants) has the 6-bit scale
    # (nibble s%2 of scales_l[s//2]) | (bits 2s of the uint16 scales_h) << 4, minus 32, and its quants in
    # qs[16s .. 16s+15] (low nibbles first, as IQ4_NL)
    s = tl.arange(0, 8)[:, None]
    k = tl.arange(0, 32)[None, :]
    low = (tl.load(blk + 4 + s // 2, mask=m, other=0).to(tl.int32) >> ((s % 2) * 4)) & 0xF
    sh = tl.load(blk + 2, mask=m, other=0).to(tl.int32) | (tl.load(blk + 3, mask=m, other=0).to(tl.int32) << 8)
    dl = _f16(blk, m) * ((low | (((sh >> (s * 2)) & 3) << 4)) - 32).to(tl.float32)
    byte = tl.load(blk + 8 + s * 16 + k % 16, mask=m, other=0).to(tl.int32)
    return dl * _iq4_value((byte >> ((k // 16) * 4)) & 0xF)


@jit
def _decode(blk, m, QT: tl.constexpr):
    """The decoder of quant type QT (ids and layouts: the rows of gguf.BLOCK_TYPES). An id with no branch fails
    to compile rather than decoding as another type."""
    if QT == 0:
        val = _q8_0(blk, m)
    elif QT == 1:
        val = _q4_0(blk, m)
    elif QT == 2:
        val = _q4_k(blk, m)
    elif QT == 3:
        val = _q5_k(blk, m)
    elif QT == 4:
        val = _q6_k(blk, m)
    elif QT == 5:
        val = _q3_k(blk, m)
    elif QT == 6:
        val = _q4_1(blk, m)
    elif QT == 7:
        val = _q5_0(blk, m)
    elif QT == 8:
        val = _q5_1(blk, m)
    elif QT == 9:
        val = _q2_k(blk, m)
    elif QT == 10:
        val = _iq4_nl(blk, m)
    elif QT == 11:
        val = _iq4_xs(blk, m)
    else:
        tl.static_assert(False, "no decoder for this quant type id")
    return val


@jit
def _nf4(packed, absmax, code, nested_absmax, nested_code, offset, nested_blocksize, e, blk, m, bm,
         NESTED: tl.constexpr, MUL_RN: tl.constexpr):
    """NF4 elements e [..., BS] of absmax blocks blk [..., 1] (masks m, bm): code[nibble] * absmax[blk], the
    nibble being byte e//2 of packed, high nibble first. Statistics are loaded once per block."""
    byte = tl.load(packed + e // 2, mask=m, other=0).to(tl.int32)
    nib = (byte >> ((1 - e % 2) * 4)) & 0xF
    v = tl.load(code + nib, mask=m, other=0.0)
    if NESTED:
        a = tl.load(absmax + blk, mask=bm, other=0).to(tl.int32)
        vals = tl.load(nested_code + a, mask=bm, other=0.0)
        scale = tl.load(nested_absmax + blk // nested_blocksize, mask=bm, other=0.0)
        if MUL_RN:  # compiled: an explicitly rounded product, never contracted with the add into an FMA.
            # Inductor passes Python floats as fp64 (a plain launch as fp32): add in float32 either way; the
            # host hands over a float32-representable value, so the conversion is exact.
            am = libdevice.mul_rn(vals, scale) + tl.full([], offset, tl.float32)
        else:  # interpreter: numpy float32 arithmetic with a Python float stays float32
            am = vals * scale + offset
    else:
        am = tl.load(absmax + blk, mask=bm, other=0.0)
    return v * am


# ----------------------------------------------------------------------------------------------------------------
# dequantization: raw blocks -> out (bf16 / fp16 / fp32), NB whole blocks per program

@jit
def dequant_gguf(raw, out, n_blocks, QT: tl.constexpr, BLOCK: tl.constexpr, TS: tl.constexpr, S: tl.constexpr,
                 W: tl.constexpr, NB: tl.constexpr, BF16_BITS: tl.constexpr):
    pid = tl.program_id(0)
    raw += pid.to(tl.int64) * (NB * TS)
    out += pid.to(tl.int64) * (NB * BLOCK)
    b = tl.arange(0, NB)[:, None, None]
    m = (pid * NB + b) < n_blocks
    val = _decode(raw + b * TS, m, QT)
    s = tl.arange(0, S)[:, None]
    k = tl.arange(0, W)[None, :]
    tl.store(out + b * BLOCK + s * W + k, _cast(val, out.dtype.element_ty, BF16_BITS), mask=m)


@jit
def dequant_nf4(packed, absmax, code, nested_absmax, nested_code, offset, out, n, nested_blocksize,
                BS: tl.constexpr, NB: tl.constexpr, NESTED: tl.constexpr, MUL_RN: tl.constexpr,
                BF16_BITS: tl.constexpr):
    pid = tl.program_id(0)
    packed += pid.to(tl.int64) * (NB * BS // 2)
    out += pid.to(tl.int64) * (NB * BS)
    b = tl.arange(0, NB)[:, None]
    e = b * BS + tl.arange(0, BS)[None, :]
    m = (pid.to(tl.int64) * (NB * BS) + e) < n
    blk = pid * NB + b
    val = _nf4(packed, absmax, code, nested_absmax, nested_code, offset, nested_blocksize, e, blk, m,
               blk.to(tl.int64) * BS < n, NESTED, MUL_RN)
    tl.store(out + e, _cast(val, out.dtype.element_ty, BF16_BITS), mask=m)


# ----------------------------------------------------------------------------------------------------------------
# fused small-batch matmul: out[row, n] = sum_k x[row, k] * W[n, k] (+ bias[n]) straight from the quantized bytes.
#
# For activations of a few rows (FLUX's modulation linears see one row per image) the matmul is bound by reading
# the weight: dequantizing first reads the raw bytes, writes a bf16 copy and reads it again (Q8_0: ~5 bytes per
# weight); here the raw bytes are read once (~1.06). Grid (output tiles, rows); a program walks K and keeps a
# float32 partial product per element of its tile, summed once at the end. The weight is rounded to x's dtype
# before multiplying, as dequantize-then-matmul does, so the result differs from that only in summation order.

@jit
def matmul_gguf(x, raw, bias, out, N, BPR, stride_x, stride_o, QT: tl.constexpr, BLOCK: tl.constexpr,
                TS: tl.constexpr, S: tl.constexpr, W: tl.constexpr, BN: tl.constexpr, KB: tl.constexpr,
                HAS_BIAS: tl.constexpr, BF16_BITS: tl.constexpr):
    pid = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    n = pid * BN + tl.arange(0, BN)
    n_ok = (n < N)[:, None, None, None]
    wrow = raw + n.to(tl.int64)[:, None, None, None] * (BPR * TS)   # [BN, 1, 1, 1]
    j = tl.arange(0, KB)[None, :, None, None]                       # [1, KB, 1, 1] blocks along K
    kin = tl.arange(0, S)[:, None] * W + tl.arange(0, W)[None, :]   # [S, W] element within a block
    xrow = x + row * stride_x
    acc = tl.full([BN, KB, S, W], 0.0, tl.float32)
    for j0 in range(0, BPR, KB):
        jj = j0 + j
        w = _decode(wrow + jj * TS, n_ok & (jj < BPR), QT)
        w = _cast(w, x.dtype.element_ty, BF16_BITS).to(tl.float32)
        xv = tl.load(xrow + jj * BLOCK + kin, mask=jj < BPR, other=0.0).to(tl.float32)
        acc += w * xv
    y = _sum(_sum(_sum(acc, 3), 2), 1)
    n_in = n < N
    if HAS_BIAS:
        y += tl.load(bias + n, mask=n_in, other=0.0).to(tl.float32)
    tl.store(out + row * stride_o + n, _cast(y, out.dtype.element_ty, BF16_BITS), mask=n_in)


@jit
def matmul_nf4(x, packed, absmax, code, nested_absmax, nested_code, offset, bias, out, N, K, nested_blocksize,
               stride_x, stride_o, BS: tl.constexpr, BN: tl.constexpr, KB: tl.constexpr, NESTED: tl.constexpr,
               MUL_RN: tl.constexpr, HAS_BIAS: tl.constexpr, BF16_BITS: tl.constexpr):
    # rows are whole absmax blocks (K % BS == 0, checked by the host): a tile is [BN rows, KB blocks, BS]
    pid = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    n = pid * BN + tl.arange(0, BN)
    n_ok = (n < N)[:, None, None]
    first = n.to(tl.int64)[:, None, None] * K + tl.arange(0, KB)[None, :, None] * BS   # [BN, KB, 1]
    i = tl.arange(0, BS)[None, None, :]
    xrow = x + row * stride_x
    acc = tl.full([BN, KB, BS], 0.0, tl.float32)
    for k0 in range(0, K, KB * BS):
        k = k0 + tl.arange(0, KB)[None, :, None] * BS                                # [1, KB, 1]
        bm = n_ok & (k < K)
        e = first + k0
        w = _nf4(packed, absmax, code, nested_absmax, nested_code, offset, nested_blocksize, e + i, e // BS,
                 bm, bm, NESTED, MUL_RN)
        w = _cast(w, x.dtype.element_ty, BF16_BITS).to(tl.float32)
        xv = tl.load(xrow + k + i, mask=k < K, other=0.0).to(tl.float32)
        acc += w * xv
    y = _sum(_sum(acc, 2), 1)
    n_in = n < N
    if HAS_BIAS:
        y += tl.load(bias + n, mask=n_in, other=0.0).to(tl.float32)
    tl.store(out + row * stride_o + n, _cast(y, out.dtype.element_ty, BF16_BITS), mask=n_in)


@jit
def _fp8_value(byte, E5M2: tl.constexpr):
    """An fp8 byte (e4m3fn or e5m2) as float32, by bit manipulation: exact, and independent of the GPU's own fp8
    support (sm_80 has none)."""
    b = byte.to(tl.uint32)
    if E5M2:  # e5m2 is the top byte of an fp16
        return (b << 8).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    sign = (b & 0x80) << 24
    e = (b >> 3) & 0xF
    mant = b & 0x7
    normal = (sign | ((e + 120) << 23) | (mant << 20)).to(tl.float32, bitcast=True)  # bias 7 -> 127
    sub = mant.to(tl.float32) * 0.001953125  # 2^-9: subnormals (and zero)
    sub = tl.where(sign != 0, -sub, sub)
    val = tl.where(e == 0, sub, normal)
    return tl.where((b & 0x7F) == 0x7F, float("nan"), val)


@jit
def dequant_fp8(raw, scale, out, n, BLOCK: tl.constexpr, E5M2: tl.constexpr, HAS_SCALE: tl.constexpr,
                BF16_BITS: tl.constexpr):
    # fp8 bytes -> fp8 * scale in float32 (one rounding, as quant/fp8.dequantize_fp8) -> out dtype
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    val = _fp8_value(tl.load(raw + offs, mask=m, other=0), E5M2)
    if HAS_SCALE:
        val = val * tl.load(scale).to(tl.float32)
    tl.store(out + offs, _cast(val, out.dtype.element_ty, BF16_BITS), mask=m)


@jit
def matmul_fp8(x, w, scale, bias, out, N, K, stride_x, stride_o, BN: tl.constexpr, BK: tl.constexpr,
               E5M2: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BF16_BITS: tl.constexpr):
    # w: the fp8 weight as bytes (N x K); value = fp8 * scale (per tensor), as quant/fp8.dequantize_fp8
    pid = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    n = pid * BN + tl.arange(0, BN)
    n_ok = (n < N)[:, None]
    base = n.to(tl.int64)[:, None] * K
    kk = tl.arange(0, BK)[None, :]
    xrow = x + row * stride_x
    if HAS_SCALE:
        s = tl.load(scale).to(tl.float32)
    acc = tl.full([BN, BK], 0.0, tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + kk
        wv = _fp8_value(tl.load(w + base + k, mask=n_ok & (k < K), other=0), E5M2)
        if HAS_SCALE:
            wv = wv * s
        wv = _cast(wv, x.dtype.element_ty, BF16_BITS).to(tl.float32)
        xv = tl.load(xrow + k, mask=k < K, other=0.0).to(tl.float32)
        acc += wv * xv
    y = _sum(acc, 1)
    n_in = n < N
    if HAS_BIAS:
        y += tl.load(bias + n, mask=n_in, other=0.0).to(tl.float32)
    tl.store(out + row * stride_o + n, _cast(y, out.dtype.element_ty, BF16_BITS), mask=n_in)


# ----------------------------------------------------------------------------------------------------------------
# fp8 activation quantization for the fp8 tensor-core matmul (fp8_linear): q = clamp(x * (1 / scale)) in e4m3 with
# scale = max(amax / fmax, 1e-12), as the eager code computes it. The two scalar divisions are IEEE (div_rn):
# Triton's `/` on float32 is the approximate div.full.f32, which could put the scale an ulp off the eager one.
# Per element a multiply by the reciprocal, not a division: an IEEE division per element would cost ~10
# instructions in a kernel that must keep up with HBM.

@jit
def _amax(x, AXIS: tl.constexpr):
    return tl.reduce(tl.abs(x), AXIS, tl.standard._elementwise_max)


@jit
def _e4m3_bits(v):
    """float32 in [-448, 448] (or NaN) -> its e4m3fn byte, rounded to nearest even, by integer arithmetic. For the
    interpreter only (FP8_BITS): its own float32 -> fp8 cast drops a value that rounds up across a power of two
    to half (125.9 -> 64); on the GPU the hardware conversion (cvt.rn.satfinite) is exact and cheaper."""
    bits = v.to(tl.uint32, bitcast=True)
    a = tl.abs(v)
    ab = a.to(tl.uint32, bitcast=True)
    # normal range (a >= 2^-6): round the float32 mantissa to 3 bits; a carry runs into the exponent
    normal = ((ab + 0x7FFFF + ((ab >> 20) & 1)) >> 20) - 960  # 960 = (127 - 7) << 3: rebias the exponent
    # subnormal range: multiples of 2^-9, ties to even (8 * 2^-9 is the smallest normal, code 8: seamless)
    f = a * 512.0
    fl = tl.floor(f)
    fi = fl.to(tl.uint32)
    up = (f - fl > 0.5) | ((f - fl == 0.5) & ((fi & 1) == 1))
    code = tl.where(a < 0.015625, fi + up.to(tl.uint32), normal)
    code = tl.where(v != v, 0x7F, code)
    return (((bits >> 24) & 0x80) | code).to(tl.uint8)


@jit
def _store_e4m3(ptr, v, m, FP8_BITS: tl.constexpr):
    if FP8_BITS:  # ptr is the output viewed as uint8
        tl.store(ptr, _e4m3_bits(v), mask=m)
    else:
        tl.store(ptr, v.to(ptr.dtype.element_ty), mask=m)


@jit
def act_amax(x, amax, n, BLOCK: tl.constexpr):
    # per-tensor pass 1: amax(|x|) into one float32 (atomic max; every value is >= 0)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.atomic_max(amax, _amax(v, 0))


@jit
def act_quant_tensor(x, out, amax, scale, n, fmax, BLOCK: tl.constexpr, FP8_BITS: tl.constexpr):
    # per-tensor pass 2: one scale for the whole activation
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    s = tl.maximum(tl.math.div_rn(tl.load(amax), fmax), 1e-12)
    if pid == 0:
        tl.store(scale, s)
    inv = tl.math.div_rn(1.0, s)
    v = tl.load(x + offs, mask=offs < n, other=0.0).to(tl.float32)
    _store_e4m3(out + offs, tl.clamp(v * inv, -fmax, fmax), offs < n, FP8_BITS)


@jit
def act_quant_rows(x, out, scale, K, fmax, BLOCK: tl.constexpr, WHOLE_ROW: tl.constexpr, FP8_BITS: tl.constexpr):
    # one scale per row (token), one program per row. WHOLE_ROW (BLOCK >= K): the row is loaded once and held in
    # registers while its amax is found, so HBM sees it once. Longer rows: a first sweep finds the amax, a second
    # quantizes (the row is read twice, the second time mostly from cache).
    row = tl.program_id(0).to(tl.int64)
    base = row * K
    if WHOLE_ROW:
        k = tl.arange(0, BLOCK)
        v = tl.load(x + base + k, mask=k < K, other=0.0).to(tl.float32)
        s = tl.maximum(tl.math.div_rn(_amax(v, 0), fmax), 1e-12)
        tl.store(scale + row, s)
        _store_e4m3(out + base + k, tl.clamp(v * tl.math.div_rn(1.0, s), -fmax, fmax), k < K, FP8_BITS)
    else:
        m = tl.full([BLOCK], 0.0, tl.float32)
        for k0 in range(0, K, BLOCK):
            k = k0 + tl.arange(0, BLOCK)
            m = tl.maximum(m, tl.abs(tl.load(x + base + k, mask=k < K, other=0.0).to(tl.float32)))
        s = tl.maximum(tl.math.div_rn(_amax(m, 0), fmax), 1e-12)
        tl.store(scale + row, s)
        inv = tl.math.div_rn(1.0, s)
        for k0 in range(0, K, BLOCK):
            k = k0 + tl.arange(0, BLOCK)
            v = tl.load(x + base + k, mask=k < K, other=0.0).to(tl.float32)
            _store_e4m3(out + base + k, tl.clamp(v * inv, -fmax, fmax), k < K, FP8_BITS)


# ----------------------------------------------------------------------------------------------------------------
# dequantization with LoRA merged: out = dequant(W) + U·D in one pass over the weight (U: N×R, scaled; D: R×K).
#
# Merging after dequantizing (addmm into the bf16 weight) reads and writes the whole weight once more; here the
# low-rank product of a [BN, COLS] tile is a small tensor-core dot (per 32 ranks) added before the single store. 2-D tiles:
# BN output rows x a run of whole quant blocks along K.

@jit
def _lora_tile(up, down, n, n_ok, c0, K, R, COLS: tl.constexpr, RC: tl.constexpr, IEEE: tl.constexpr,
               BF16_BITS: tl.constexpr):
    """U[n, :R] · D[:R, c0:c0+COLS] in float32, [BN, COLS], RC ranks at a time (RC a power of two >= 16: any rank
    fits the same registers)."""
    c = c0 + tl.arange(0, COLS)
    acc = tl.full([n.shape[0], COLS], 0.0, tl.float32)
    for r0 in range(0, R, RC):
        r = r0 + tl.arange(0, RC)
        u = tl.load(up + n.to(tl.int64)[:, None] * R + r[None, :], mask=n_ok[:, None] & (r < R)[None, :], other=0.0)
        d = tl.load(down + r.to(tl.int64)[:, None] * K + c[None, :], mask=(r < R)[:, None] & (c < K)[None, :],
                    other=0.0)
        if IEEE:  # fp32 factors: full-precision products (the default would be tf32)
            acc += tl.dot(u, d, input_precision="ieee")
        elif BF16_BITS:  # interpreter: its dot cannot take bf16; bf16 products are exact in float32 anyway
            acc += tl.dot(u.to(tl.float32), d.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(u, d)
    return acc


@jit
def dequant_lora_gguf(raw, up, down, out, N, K, BPR, R, QT: tl.constexpr, BLOCK: tl.constexpr, TS: tl.constexpr,
                      S: tl.constexpr, W: tl.constexpr, BN: tl.constexpr, KB: tl.constexpr, RC: tl.constexpr,
                      IEEE: tl.constexpr, BF16_BITS: tl.constexpr):
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    j0 = tl.program_id(1) * KB
    n_ok = n < N
    j = j0 + tl.arange(0, KB)[None, :, None, None]                              # [1, KB, 1, 1]
    m = n_ok[:, None, None, None] & (j < BPR)
    w = _decode(raw + n.to(tl.int64)[:, None, None, None] * (BPR * TS) + j * TS, m, QT)   # [BN, KB, S, W]
    delta = _lora_tile(up, down, n, n_ok, j0 * BLOCK, K, R, KB * BLOCK, RC, IEEE, BF16_BITS)       # [BN, KB * BLOCK]
    val = w + tl.reshape(delta, [BN, KB, S, W])
    kin = tl.arange(0, S)[:, None] * W + tl.arange(0, W)[None, :]
    dst = out + n.to(tl.int64)[:, None, None, None] * K + j * BLOCK + kin
    tl.store(dst, _cast(val, out.dtype.element_ty, BF16_BITS), mask=m)


@jit
def dequant_lora_nf4(packed, absmax, code, nested_absmax, nested_code, offset, up, down, out, N, K, R,
                     nested_blocksize, BS: tl.constexpr, BN: tl.constexpr, KB: tl.constexpr, RC: tl.constexpr,
                     NESTED: tl.constexpr, MUL_RN: tl.constexpr, IEEE: tl.constexpr, BF16_BITS: tl.constexpr):
    # rows are whole absmax blocks (K % BS == 0): a tile is [BN rows, KB blocks, BS]
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    c0 = tl.program_id(1) * (KB * BS)
    n_ok = n < N
    k = c0 + tl.arange(0, KB)[None, :, None] * BS                                # [1, KB, 1] first column
    bm = n_ok[:, None, None] & (k < K)
    e = n.to(tl.int64)[:, None, None] * K + k                                     # [BN, KB, 1]
    i = tl.arange(0, BS)[None, None, :]
    w = _nf4(packed, absmax, code, nested_absmax, nested_code, offset, nested_blocksize, e + i, e // BS, bm, bm,
             NESTED, MUL_RN)
    delta = _lora_tile(up, down, n, n_ok, c0, K, R, KB * BS, RC, IEEE, BF16_BITS)
    val = w + tl.reshape(delta, [BN, KB, BS])
    tl.store(out + e + i, _cast(val, out.dtype.element_ty, BF16_BITS), mask=bm)
