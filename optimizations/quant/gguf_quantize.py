"""GGUF quantizers in vectorised PyTorch: llama.cpp's reference encoders, on whatever device the weights are.

One function per block type, one signature: ``quantize_<type>(w)`` takes a float tensor of shape (n, k * block)
and returns its raw blocks, uint8 of shape (n, k * type_size), on w's device. `QUANTIZE_FUNCTIONS` maps each type
to its function (the counterpart of gguf.DEQUANTIZE_FUNCTIONS). Rows are processed in chunks of about
`chunk_elements(device)` values, so temporary memory stays a few times that whatever the tensor size.

What is reproduced, per type (ggml-quants.c, the path `ggml_quantize_chunk` takes without an importance matrix,
which is what llama-quantize runs when no imatrix is given):
- Q8_0, Q5_1, Q5_0, Q4_1, Q4_0: quantize_row_*_ref. Byte-identical to gguf-py's gguf.quants.quantize (which
  mirrors the same C code), by using the same float32 operations in the same order.
- Q6_K: quantize_row_q6_K_ref, per 16 values make_qx_quants(nmax 32, rmse_type 1: weights x^2; the scale -32/max
  and 18 trials -(32 + 0.1 i)/max, i = +-1..+-9, each kept if its least-squares fit is better), then 8-bit signed
  sub-block scales against one fp16 super-scale.
- Q5_K / Q4_K: quantize_row_q5_K_ref / q4_K_ref, per 32 values make_qkx2_quants (weights av|x| + |x|, an
  affine scale/min least-squares fit for each of nstep+1 trial scales (nmax + rmin + rdelta*i)/(max - min); the
  best fit so far also moves the min the later trials use), then 6-bit scales and mins against fp16 d / dmin,
  packed 12 bytes for 8 pairs exactly as get_scale_min_k4 reads them; final quants recomputed from the stored
  (rounded) scales.
- Q3_K: quantize_row_q3_K_ref, make_q3_quants per 16 values (weights x^2, 5 rounds of one-at-a-time
  coordinate descent), 6-bit signed scales (4 low bits in bytes 0-7, 2 high bits in bytes 8-11), the high quant
  bit inverted into hmask.
- Q2_K: quantize_row_q2_K_ref, make_qkx2_quants per 16 values on 2 bits with weights |x| and absolute error
  (use_mad), 4-bit scales and mins in one byte.

Float arithmetic: everything in float32 with the C expression order kept operation by operation, so the bytes are
llama.cpp's own (tests/test_gguf_quantize.py checks them against stored and live llama.cpp output, extremes
included). What that takes in torch:
- sums over a group left to right (`_seq_sum`: S-1 vector adds over a (S, M) layout; torch's reductions add in
  another order);
- `c / t` and `t / c` as true divisions (`_rdiv`, `_div`: torch turns a Python-number numerator into
  reciprocal * c, and CUDA a Python-number divisor into t * (1/c));
- sqrtf through float64 (`_sqrtf`: torch's float32 sqrt on CPU is an ulp off at times);
- ggml's `nearest_int` (round half to even via 1.5*2^23, wrapping for |x| >= 2^22) emulated exactly, with
  torch.round used where the argument is known to be in range (and checked, with a fall-back, where it is not);
- C's comparison semantics for the running maxima (NaNs never win, a maximum starts at +0.0).
The llama.cpp build compared against is ggml-base with its default flags (no FMA contraction on x86-64); an
aarch64 build, where compilers contract a*b+c into FMA by default, may differ from it in the last bits.

Speed: the K-quant searches are ~20 trial fits per group, ~400 passes over a chunk of elementwise ops. On CPU the
chunks (`chunk_elements`) are sized for the caches and run on `cpu_workers()` threads with torch's own intra-op
threading off for the call (thousands of small ops: a fork/join per op costs more than it saves). Numbers in
BENCHMARKS.md ("GGUF quantizers vs llama.cpp").

Pure torch (numpy only for float32 constants); runs wherever torch runs, the same code on CPU and CUDA.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .common import QuantDataError

Q = GGMLQuantizationType
QK_K = 256
GROUP_MAX_EPS = float(np.float32(1e-15))  # ggml-quants.c: below this |max| a group is all zero


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------

def _f32(v: float) -> float:
    """A constant as the float32 value C computes for it (then passed to torch, which keeps it exactly)."""
    return float(np.float32(v))


def _rdiv(c: float, t: torch.Tensor) -> torch.Tensor:
    """c / t as one IEEE division. (`c / t` with a Python number c is `t.reciprocal() * c` in torch: two
    roundings, which differ from C's c/t in about a quarter of the cases.)"""
    return torch.div(torch.tensor(c, dtype=t.dtype, device=t.device), t)


def _div(t: torch.Tensor, c: float) -> torch.Tensor:
    """t / c as one IEEE division on every device. (On CUDA, dividing by a Python number multiplies by its
    reciprocal instead.)"""
    return torch.div(t, torch.tensor(c, dtype=t.dtype, device=t.device))


def _nearest_int(f: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int, bit for bit: float32 -> int32 via (f + 1.5*2^23) and its low mantissa bits. Round half
    to even for |f| < 2^22; for larger |f| (which ggml asserts against, in debug builds only) the same wrapped
    value the release build computes."""
    return ((f + 12582912.0).view(torch.int32) & 0x007FFFFF) - 0x00400000


def _fp16_round(x: torch.Tensor) -> torch.Tensor:
    """GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(x)): round to nearest even fp16 (overflow to inf), back to float32."""
    return x.to(torch.float16).to(torch.float32)


def _f16_bytes(d: torch.Tensor) -> torch.Tensor:
    """float32 (n,) or (n, 1) -> (n, 2) little-endian fp16 bytes (round to nearest even, like numpy and ggml)."""
    # Go through 1-D: a (n, 1) reduction result may carry a stride that dtype views reject.
    return d.reshape(-1).to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _first_absmax(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """(amax, max) over `dim` like C's `float amax = 0, max = 0; ... if (ax > amax) { amax = ax; max = x[i]; }`:
    the signed value of the first element of largest magnitude (argmax returns the first maximal index), NaNs
    never chosen (a comparison with NaN is false), (0, 0) when nothing is above 0."""
    a = torch.nan_to_num(x.abs(), nan=-1.0)
    idx = a.argmax(dim=dim, keepdim=True)
    amax = a.gather(dim, idx).squeeze(dim)
    pos = amax > 0
    return _where0(pos, amax), _where0(pos, x.gather(dim, idx).squeeze(dim))


def _sqrtf(x: torch.Tensor) -> torch.Tensor:
    """C sqrtf, correctly rounded. (torch's float32 sqrt on CPU is off by an ulp at times; sqrt in float64 rounded
    once to float32 is the correctly rounded float32 result.)"""
    return torch.sqrt(x.to(torch.float64)).to(x.dtype)


def _max_from_zero(v: torch.Tensor) -> torch.Tensor:
    """C's `float m = 0; for (...) if (v[j] > m) m = v[j];` over the last dim: +0.0 unless some value is > 0;
    NaNs never win."""
    top = torch.nan_to_num(v, nan=-1.0).amax(dim=-1)
    return _where0(top > 0, top)


def _where0(cond: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return torch.where(cond, value, torch.zeros((), dtype=value.dtype, device=value.device))


# --------------------------------------------------------------------------------------------------
# 32-element types (quantize_row_*_ref; gguf-py mirrors the same C code, so bytes match it exactly)
# --------------------------------------------------------------------------------------------------

def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C roundf (gguf-py's np_roundf): round half away from zero, with gguf-py's float32 ops."""
    a = x.abs()
    floored = torch.floor(a)
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def _safe_inverse(d: torch.Tensor) -> torch.Tensor:
    """`d ? 1.0f/d : 0.0f`."""
    return torch.where(d == 0, torch.zeros_like(d), _rdiv(1.0, d))


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) uint8 quants -> (n, 16) bytes: quant k in the low nibble, quant 16+k in the high."""
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(n, 8*m) of 0/1 -> (n, m) bytes, little-endian bit order (bit i of byte k is element 8k+i)."""
    grouped = bits.reshape(bits.shape[0], bits.shape[1] // 8, 8)
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return (grouped.to(torch.uint8) << shifts).sum(-1, dtype=torch.uint8)


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _div(blocks.abs().amax(dim=1, keepdim=True), 127.0)
    qs = _round_half_away(blocks * _safe_inverse(d))
    return torch.cat([_f16_bytes(d), qs.to(torch.int8).view(torch.uint8)], dim=1)


def _symmetric_quants(blocks: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0/Q5_0: d = max/-(levels/2), q = (int8)(x/d + levels/2 + 0.5) capped at levels-1."""
    # gguf-py's np.argmax of |x| (first maximum; unlike C it would pick a NaN, irrelevant for finite input)
    mx = torch.gather(blocks, 1, blocks.abs().argmax(dim=1, keepdim=True))
    d = _div(mx, -(levels // 2))
    q = torch.trunc(blocks * _safe_inverse(d) + (levels // 2 + 0.5))
    return d, q.clamp(0, levels - 1).to(torch.uint8)


def _affine_quants(blocks: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1/Q5_1: d = (max-min)/(levels-1), q = (int8)((x-min)/d + 0.5) capped, offset = min."""
    mx = blocks.amax(dim=1, keepdim=True)
    mn = blocks.amin(dim=1, keepdim=True)
    d = _div(mx - mn, levels - 1)
    q = torch.trunc((blocks - mn) * _safe_inverse(d) + 0.5)
    return d, mn, q.clamp(0, levels - 1).to(torch.uint8)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d, q = _symmetric_quants(blocks, 16)
    return torch.cat([_f16_bytes(d), _pack_nibbles(q)], dim=1)


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, mn, q = _affine_quants(blocks, 16)
    return torch.cat([_f16_bytes(d), _f16_bytes(mn), _pack_nibbles(q)], dim=1)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d, q = _symmetric_quants(blocks, 32)
    return torch.cat([_f16_bytes(d), _pack_bits(q >> 4), _pack_nibbles(q)], dim=1)


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, mn, q = _affine_quants(blocks, 32)
    return torch.cat([_f16_bytes(d), _f16_bytes(mn), _pack_bits(q >> 4), _pack_nibbles(q)], dim=1)


# --------------------------------------------------------------------------------------------------
# The K-quant searches. Layout: xt (S, M) holds M groups ("sub-blocks") of S values down its columns, so a
# group's values are S contiguous rows, per-group quantities are (M,) vectors, and a left-to-right sum over a
# group is S-1 vector adds (the exact order of C's `for (i...) sum += t[i]`, which torch's reductions do not keep).
# --------------------------------------------------------------------------------------------------

def _seq_sum(t, first: bool = False) -> torch.Tensor:
    """(..., S, M) -> (..., M): C's `float s = 0; for (i = 0; i < S; ++i) s += t[i];` (first: `float s = t[0];` and
    the loop from 1) over dim -2, in float32, in that order. Stack independent sums in the leading dims: one add
    then serves them all. `t` may also be the tuple t.unbind(-2), made once for a buffer summed many times."""
    rows = t.unbind(-2) if isinstance(t, torch.Tensor) else t
    acc = rows[0].clone() if first else rows[0] + 0.0  # 0.0f + -0.0f is +0.0f, as in C
    for r in rows[1:]:
        torch.add(acc, r, out=acc)
    return acc


def _make_qkx2_quants(xt: torch.Tensor, wt: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                      use_mad: bool, exact_round: bool = False):
    """make_qkx2_quants on each group (column) of xt (S, M) with weights wt (S, M).

    Returns (scale, the_min, iscale, lmin, flat), all (M,): x ~ scale * L - the_min, and the group's quants are
    L = clamp(nearest_int(iscale * (x - lmin)), 0, nmax) (see _qkx2_levels), 0 for `flat` groups. Keeping the
    (iscale, lmin) that produced the best L instead of L itself spares a full-size select per trial; only groups
    whose stored scale rounds to zero ever need their search L.

    The trials round with torch.round (half to even), which is nearest_int while |iscale*(x - min)| < 2^22: always
    so for real weights (it exceeds nmax + 2 only where a trial's min moved above the group's minimum). The bound
    is tracked, and should a group ever exceed it the search is redone with the exact emulation."""
    S, M = xt.shape
    xmin = xt.amin(dim=0)
    mx = xt.amax(dim=0)
    pair = torch.stack([wt, wt * xt])
    sum_w, sum_x = _seq_sum(pair, first=True)  # sum_w = w[0], sum_x = sum_w*x[0]; then += w, += w*x[i]
    del pair
    mn = torch.where(xmin > 0, 0.0, xmin)  # if (min > 0) min = 0  (a -0.0 stays -0.0, as in C)
    flat = mx == mn  # max == min: L = 0, scale 0, the_min = -min
    live = ~flat
    iscale = _rdiv(nmax, mx - mn)
    scale = _rdiv(1.0, iscale)
    l = torch.empty_like(xt)
    prods = torch.empty((3, S, M), dtype=xt.dtype, device=xt.device)
    buf = prods[0]
    prod_rows, buf_rows = prods.unbind(1), buf.unbind(0)
    worst = torch.zeros_like(xmin)

    def levels(iscale, mn):
        torch.sub(xt, mn, out=l).mul_(iscale)  # iscale*(x[i] - min)
        if exact_round:
            l.copy_(_nearest_int(l))
        else:
            l.round_()
        return l.clamp_(0, nmax)

    def error(scale, mn):
        torch.mul(l, scale, out=buf).add_(mn).sub_(xt)  # diff = scale*L[i] + min - x[i]
        buf.abs_() if use_mad else buf.mul_(buf)
        buf.mul_(wt)
        return _seq_sum(buf_rows)  # error += w*diff

    levels(iscale, mn)  # x - min in [0, max - min] here: |value| <= nmax
    best = error(scale, mn)
    best_iscale, best_lmin = iscale, mn
    for step in range(nstep + 1):
        num = _f32(_f32(_f32(rmin) + _f32(_f32(rdelta) * step)) + nmax)  # rmin + rdelta*is + nmax, in float
        iscale = _rdiv(num, mx - mn)
        # |iscale*(x - min)| <= max(num, |iscale*(min - xmin)|); fmax skips the NaN of flat groups
        worst = torch.fmax(worst, ((mn - xmin) * iscale).abs())
        levels(iscale, mn)
        torch.mul(wt, l, out=prods[0])  # w*l
        torch.mul(prods[0], l, out=prods[1])  # w*l*l
        torch.mul(prods[0], xt, out=prods[2])  # w*l*x[i]
        sum_l, sum_l2, sum_xl = _seq_sum(prod_rows)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        clip = this_min > 0
        this_min = _where0(~clip, this_min)
        this_scale = torch.where(clip, sum_xl / sum_l2, this_scale)
        cur = error(this_scale, this_min)
        better = (D > 0) & (cur < best) & live
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        best_iscale = torch.where(better, iscale, best_iscale)
        best_lmin = torch.where(better, mn, best_lmin)
        mn = torch.where(better, this_min, mn)
    if not exact_round and bool(worst.amax() >= 4.0e6):
        return _make_qkx2_quants(xt, wt, nmax, rmin, rdelta, nstep, use_mad, exact_round=True)
    return _where0(live, scale), -mn, best_iscale, best_lmin, flat


def _qkx2_levels(x: torch.Tensor, iscale: torch.Tensor, lmin: torch.Tensor, flat: torch.Tensor, nmax: int):
    """The search quants of some groups: x (m, S), per-group (m,) parameters from _make_qkx2_quants."""
    v = (x - lmin.unsqueeze(1)) * iscale.unsqueeze(1)
    lq = torch.clamp(_nearest_int(v), 0, nmax)
    return _where0(~flat.unsqueeze(1), lq)


def _make_qx_quants_rmse1(xt: torch.Tensor, nmax: int):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL) on each group (column) of xt (S, M).

    Returns (scale, iscale, zero), (M,): the group's quants are clamp(nearest_int(iscale*x), -nmax, nmax-1) + nmax,
    all 0 for `zero` (all |x| < GROUP_MAX_EPS) groups, whose scale is 0."""
    amax, mx = _first_absmax(xt, dim=0)
    zero = amax < GROUP_MAX_EPS
    w = xt * xt  # rmse_type 1: w = x^2
    wx = w * xt
    l = torch.empty_like(xt)
    buf = torch.empty((2, *xt.shape), dtype=xt.dtype, device=xt.device)

    def sums(iscale):
        # |iscale * x| <= nmax + 1 by construction (iscale ~ -nmax/max), so torch.round is nearest_int
        torch.mul(xt, iscale, out=l).round_().clamp_(-nmax, nmax - 1)
        torch.mul(wx, l, out=buf[0])  # w*x[i]*l
        torch.mul(w, l, out=buf[1]).mul_(l)  # w*l*l
        return _seq_sum(buf)

    iscale = _rdiv(-nmax, mx)
    sumlx, suml2 = sums(iscale)
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    best_iscale = iscale
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = _rdiv(-_f32(nmax + _f32(_f32(0.1) * step)), mx)  # -(nmax + 0.1f*is) / max
        sumlx, suml2 = sums(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
        best_iscale = torch.where(better, iscale, best_iscale)
    return _where0(~zero, scale), best_iscale, zero


def _qx_levels(x: torch.Tensor, iscale: torch.Tensor, zero: torch.Tensor, nmax: int) -> torch.Tensor:
    lq = torch.clamp(_nearest_int(x * iscale.unsqueeze(1)), -nmax, nmax - 1) + nmax
    return _where0(~zero.unsqueeze(1), lq)


def _make_q3_quants_rmse(xt: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_q3_quants(n, nmax, x, L, do_rmse=true) on each group (column) of xt (S, M): -> (scale (M,), L (S, M)
    int32 in [0, 2*nmax - 1]; 0 and L = 0 for an all-zero group). The coordinate descent visits the S values one
    at a time, as C does, vectorised over the groups."""
    amax, mx = _first_absmax(xt, dim=0)
    zero = amax < GROUP_MAX_EPS
    iscale = _rdiv(-nmax, mx)
    # |iscale*x| <= nmax: torch.round is nearest_int
    L = torch.clamp(torch.round(xt * iscale), -nmax, nmax - 1)
    w = xt * xt
    wx = w * xt
    sumlx, suml2 = _seq_sum(torch.stack([wx * L, w * L * L]))  # w*x[i]*l, w*l*l
    for _ in range(5):
        n_changed = torch.zeros((), dtype=torch.int64, device=xt.device)
        for i in range(xt.shape[0]):
            wi, wxi, li = w[i], wx[i], L[i]
            slx = sumlx - wxi * li  # sumlx - w*x[i]*L[i]
            sl2 = suml2 - wi * li * li
            new_l = torch.clamp(_nearest_int(xt[i] * sl2 / slx), -nmax, nmax - 1).to(torch.float32)
            slx2 = slx + wxi * new_l
            sl22 = sl2 + wi * new_l * new_l
            take = (slx > 0) & (new_l != li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[i] = torch.where(take, new_l, li)
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
            n_changed += take.sum()
        # A group whose round changed nothing computes the same round again: once no group changes, stop.
        if not n_changed.item():
            break
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    L = _where0(~zero, L.to(torch.int32) + nmax)
    return _where0(~zero, scale), L


# --------------------------------------------------------------------------------------------------
# Block packers: integer quants (B, 256) -> bytes, in the layouts optimizations/quant/gguf.py decodes
# --------------------------------------------------------------------------------------------------

def _pack_planar(L: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """(B, n) integer quants of `bits` bits -> uint8 bytes: per run of group * 8//bits quants, byte l holds quant
    j*group + l in bits [j*bits, (j+1)*bits) (ggml's "first all low fields, then the next" order)."""
    per = 8 // bits
    q = L.reshape(L.shape[0], -1, per, group)
    out = q[:, :, 0]
    for j in range(1, per):
        out = out | (q[:, :, j] << (j * bits))
    return out.reshape(L.shape[0], -1).to(torch.uint8)


def _pack_k4_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins (B, 8) uint8 -> the 12 scale bytes of Q4_K/Q5_K (quantize_row_q4_K_ref)."""
    lo = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    mid = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    hi = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return torch.cat([lo, mid, hi], dim=1)


def _fix_groups(lq: torch.Tensor, keep: torch.Tensor, search_levels: Callable) -> torch.Tensor:
    """lq (M, S) int32; for the (rare) groups where `keep` (M,) is set, C leaves the search's quants in place
    (`if (!d) continue;`): put them back, computed by search_levels(group indices)."""
    if bool(keep.any()):
        idx = keep.nonzero().squeeze(1)
        lq[idx] = search_levels(idx).to(lq.dtype)
    return lq


def _clamped_levels(v: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """MAX(lo, MIN(hi, nearest_int(v))) as int32. torch.round (half to even) is nearest_int while |v| < 2^22, as
    it is for any real weights; beyond that (or with inf/NaN, from an fp16 scale that overflowed) the exact, slower
    emulation."""
    if not bool(v.abs().amax() < 4.0e6):
        return torch.clamp(_nearest_int(v), lo, hi)
    return torch.round(v).clamp_(lo, hi).to(torch.int32)


def _requant_affine(x: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor, sc: torch.Tensor, m: torch.Tensor,
                    nmax: int, search_levels: Callable) -> torch.Tensor:
    """Final quants from the stored scales: l = nearest_int((x + dm)/d) in [0, nmax], d = fp16(d)*sc and
    dm = fp16(dmin)*m per group; groups with d == 0 keep the search's quants. x: (B, G, S); sc, m: (B, G)
    -> int32 (B, G*S)."""
    B, G, S = x.shape
    dl = _fp16_round(d).unsqueeze(1) * sc.to(torch.float32)
    ml = _fp16_round(dmin).unsqueeze(1) * m.to(torch.float32)
    keep = dl == 0
    dl = torch.where(keep, 1.0, dl)  # those groups are overwritten below; keeps v finite
    lq = _clamped_levels((x + ml.unsqueeze(2)) / dl.unsqueeze(2), 0, nmax).reshape(B * G, S)
    return _fix_groups(lq, keep.reshape(-1), search_levels).reshape(B, G * S)


def _requant_symmetric(x: torch.Tensor, d: torch.Tensor, sc: torch.Tensor, nmax: int,
                       search_levels: Callable) -> torch.Tensor:
    """l = nearest_int(x/d) in [-nmax, nmax-1], plus nmax, d = fp16(d)*sc per group -> int32 (B, G*S)."""
    B, G, S = x.shape
    dl = _fp16_round(d).unsqueeze(1) * sc.to(torch.float32)
    keep = dl == 0
    dl = torch.where(keep, 1.0, dl)
    lq = _clamped_levels(x / dl.unsqueeze(2), -nmax, nmax - 1).add_(nmax).reshape(B * G, S)
    return _fix_groups(lq, keep.reshape(-1), search_levels).reshape(B, G * S)


def _groups_t(x: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 256) -> the groups as rows (M, size) and transposed (size, M), contiguous."""
    rows = x.reshape(-1, size)
    return rows, rows.t().contiguous()


# --------------------------------------------------------------------------------------------------
# K-quant super-blocks: float32 (B, 256) -> uint8 (B, type_size)
# --------------------------------------------------------------------------------------------------

def _qkx_4_5(x: torch.Tensor, nmax: int, rmin: float, nstep: int):
    """Q4_K/Q5_K scales, mins and quants: make_qkx2_quants per 32 values with weights av_x + |x|."""
    B = x.shape[0]
    rows, xt = _groups_t(x, 32)
    av_x = _sqrtf(_div(_seq_sum(xt * xt), 32.0))
    wt = av_x + xt.abs()
    scale, the_min, iscale, lmin, flat = _make_qkx2_quants(xt, wt, nmax, rmin, 0.1, nstep, use_mad=False)
    scales, mins = scale.reshape(B, 8), the_min.reshape(B, 8)
    max_scale, max_min = _max_from_zero(scales), _max_from_zero(mins)
    inv_scale = _where0(max_scale > 0, _rdiv(63.0, max_scale))
    inv_min = _where0(max_min > 0, _rdiv(63.0, max_min))
    # uint8_t ls = nearest_int(inv_scale*scales[j]); ls = MIN(63, ls)
    ls = torch.clamp(_nearest_int(inv_scale.unsqueeze(1) * scales) & 0xFF, max=63).to(torch.uint8)
    lm = torch.clamp(_nearest_int(inv_min.unsqueeze(1) * mins) & 0xFF, max=63).to(torch.uint8)
    d, dmin = _div(max_scale, 63.0), _div(max_min, 63.0)
    L = _requant_affine(x.reshape(B, 8, 32), d, dmin, ls, lm, nmax,
                        lambda i: _qkx2_levels(rows[i], iscale[i], lmin[i], flat[i], nmax))
    return d, dmin, _pack_k4_scales(ls, lm), L


def _q4_k(x: torch.Tensor) -> torch.Tensor:
    d, dmin, scale_bytes, L = _qkx_4_5(x, 15, -1.0, 20)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), scale_bytes, _pack_planar(L, 4, 32)], dim=1)


def _q5_k(x: torch.Tensor) -> torch.Tensor:
    d, dmin, scale_bytes, L = _qkx_4_5(x, 31, -0.5, 15)
    qh = _pack_planar(L >> 4, 1, 32)  # bit j of byte l: the 5th bit of quant 32*j + l
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), scale_bytes, qh, _pack_planar(L & 0x0F, 4, 32)], dim=1)


def _q2_k(x: torch.Tensor) -> torch.Tensor:
    B = x.shape[0]
    rows, xt = _groups_t(x, 16)
    scale, the_min, iscale, lmin, flat = _make_qkx2_quants(xt, xt.abs(), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins = scale.reshape(B, 16), the_min.reshape(B, 16)
    max_scale, max_min = _max_from_zero(scales), _max_from_zero(mins)
    has_scale, has_min = max_scale > 0, max_min > 0
    sc = _where0(has_scale.unsqueeze(1), _nearest_int(_rdiv(15.0, max_scale).unsqueeze(1) * scales))
    mq = _where0(has_min.unsqueeze(1), _nearest_int(_rdiv(15.0, max_min).unsqueeze(1) * mins))
    packed = ((sc | (mq << 4)) & 0xFF).to(torch.uint8)  # y.scales[j] = l; y.scales[j] |= (l << 4)
    d = _where0(has_scale, _div(max_scale, 15.0))
    dmin = _where0(has_min, _div(max_min, 15.0))
    L = _requant_affine(x.reshape(B, 16, 16), d, dmin, packed & 0x0F, packed >> 4, 3,
                        lambda i: _qkx2_levels(rows[i], iscale[i], lmin[i], flat[i], 3))
    return torch.cat([packed, _pack_planar(L, 2, 32), _f16_bytes(d), _f16_bytes(dmin)], dim=1)


def _q6_k(x: torch.Tensor) -> torch.Tensor:
    B = x.shape[0]
    rows, xt = _groups_t(x, 16)
    scale, iscale, zero = _make_qx_quants_rmse1(xt, 32)
    scales = scale.reshape(B, 16)
    max_abs, max_scale = _first_absmax(scales, dim=1)
    empty = max_abs < GROUP_MAX_EPS
    biscale = _rdiv(-128.0, max_scale)
    d = _where0(~empty, _rdiv(1.0, biscale))
    # y.scales[ib] = MIN(127, nearest_int(iscale*scales[ib])), an int8
    sc = ((torch.clamp(_nearest_int(biscale.unsqueeze(1) * scales), max=127) + 128) & 0xFF) - 128
    sc = _where0(~empty.unsqueeze(1), sc)
    L = _requant_symmetric(x.reshape(B, 16, 16), d, sc, 32, lambda i: _qx_levels(rows[i], iscale[i], zero[i], 32))
    # ql: per 128 quants, byte l = quant l (low nibble) | quant l+64 (high); byte 32+l = quant l+32 | quant l+96
    out = torch.cat([_pack_planar(L & 0x0F, 4, 64), _pack_planar(L >> 4, 2, 32), (sc & 0xFF).to(torch.uint8),
                     _f16_bytes(d)], dim=1)
    if bool(empty.any()):
        out[empty] = 0  # a block without a scale is all zero bytes (memset)
    return out


def _q3_k(x: torch.Tensor) -> torch.Tensor:
    B = x.shape[0]
    _, xt = _groups_t(x, 16)
    scale, Lt = _make_q3_quants_rmse(xt, 4)
    scales = scale.reshape(B, 16)
    _, max_scale = _first_absmax(scales, dim=1)
    has = max_scale != 0
    biscale = _rdiv(-32.0, max_scale)
    # int8_t l = nearest_int(iscale*scales[j]); l = MAX(-32, MIN(31, l)) + 32
    l6 = torch.clamp(((_nearest_int(biscale.unsqueeze(1) * scales) + 128) & 0xFF) - 128, -32, 31) + 32
    l6 = _where0(has.unsqueeze(1), l6).to(torch.uint8)
    low = l6 & 0x0F
    scale_bytes = torch.cat([low[:, :8] | (low[:, 8:] << 4), _pack_planar(l6 >> 4, 2, 4)], dim=1)
    d = _where0(has, _rdiv(1.0, biscale))
    sc = _where0(has.unsqueeze(1), l6.to(torch.int32) - 32)
    L = _requant_symmetric(x.reshape(B, 16, 16), d, sc, 4, lambda i: Lt[:, i].t())
    hmask = _pack_planar(L >> 2, 1, 32)  # quants > 3 set their bit (then lose 4), the rest leave it clear
    return torch.cat([hmask, _pack_planar(L & 0x03, 2, 32), scale_bytes, _f16_bytes(d)], dim=1)


# --------------------------------------------------------------------------------------------------
# Public per-type functions: float (n, k * block) -> uint8 (n, k * type_size), chunked over rows
# --------------------------------------------------------------------------------------------------

def chunk_elements(device: torch.device) -> int:
    """Values per chunk: CPU chunks stay cache-sized (the searches make ~400 passes over each chunk), CUDA chunks
    big enough to fill the device. Temporary memory is ~10x a chunk's float32 size (per CPU worker)."""
    return 1 << 22 if device.type == "cuda" else 1 << 18


def cpu_workers() -> int:
    """CPU chunks run on this many threads, each running its torch ops single-threaded: the searches are
    thousands of small ops per chunk, for which torch's intra-op parallelism (a fork/join per op) costs more than
    it gains, and far more on a busy machine. Defaults to torch.get_num_threads(), read when the call starts."""
    return max(1, torch.get_num_threads())


@contextlib.contextmanager
def _single_threaded_ops():
    """torch.set_num_threads(1) for the duration (process-wide: torch has no per-call setting), then restored."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _chunked(qtype: GGMLQuantizationType, encode: Callable[[torch.Tensor], torch.Tensor]):
    block, type_size = GGML_QUANT_SIZES[qtype]

    def quantize_rows(w: torch.Tensor) -> torch.Tensor:
        if w.dim() != 2 or not (w.is_floating_point()):
            raise QuantDataError(f"{qtype.name} quantization takes a 2-D float tensor, got {w.dtype} "
                                 f"{tuple(w.shape)}")
        n, k = w.shape
        if k % block:
            raise QuantDataError(f"Row size {k} is not a multiple of the {qtype.name} block size {block}")
        out = torch.empty((n, k // block * type_size), dtype=torch.uint8, device=w.device)
        if out.numel() == 0:
            return out
        rows = max(1, chunk_elements(w.device) // k)
        row_bytes = out.shape[1]

        inference = torch.is_inference_mode_enabled()  # ComfyUI runs nodes under it; `out` may be an inference tensor

        def run(r0: int) -> None:
            r1 = min(n, r0 + rows)
            with torch.no_grad(), torch.inference_mode(inference):  # grad and inference mode are per thread
                x = w[r0:r1].detach().to(torch.float32).contiguous().reshape(-1, block)
                out[r0:r1] = encode(x).reshape(r1 - r0, row_bytes)

        starts = range(0, n, rows)
        if w.device.type != "cpu":
            for r0 in starts:
                run(r0)
            return out
        workers = min(cpu_workers(), len(starts))
        with _single_threaded_ops():
            if workers == 1:
                for r0 in starts:
                    run(r0)
            else:
                with ThreadPoolExecutor(workers, thread_name_prefix="gguf-quantize") as pool:
                    list(pool.map(run, starts))  # (re-raises a worker's exception)
        return out

    quantize_rows.__name__ = f"quantize_{qtype.name.lower()}"
    quantize_rows.__qualname__ = quantize_rows.__name__
    quantize_rows.__doc__ = (f"float (n, k*{block}) -> {qtype.name} blocks, uint8 (n, k*{type_size}), on the "
                             "input's device (llama.cpp's reference encoder).")
    return quantize_rows


quantize_q8_0 = _chunked(Q.Q8_0, _q8_0)
quantize_q5_1 = _chunked(Q.Q5_1, _q5_1)
quantize_q5_0 = _chunked(Q.Q5_0, _q5_0)
quantize_q4_1 = _chunked(Q.Q4_1, _q4_1)
quantize_q4_0 = _chunked(Q.Q4_0, _q4_0)
quantize_q6_k = _chunked(Q.Q6_K, _q6_k)
quantize_q5_k = _chunked(Q.Q5_K, _q5_k)
quantize_q4_k = _chunked(Q.Q4_K, _q4_k)
quantize_q3_k = _chunked(Q.Q3_K, _q3_k)
quantize_q2_k = _chunked(Q.Q2_K, _q2_k)

QUANTIZE_FUNCTIONS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    Q.Q8_0: quantize_q8_0,
    Q.Q5_1: quantize_q5_1,
    Q.Q5_0: quantize_q5_0,
    Q.Q4_1: quantize_q4_1,
    Q.Q4_0: quantize_q4_0,
    Q.Q6_K: quantize_q6_k,
    Q.Q5_K: quantize_q5_k,
    Q.Q4_K: quantize_q4_k,
    Q.Q3_K: quantize_q3_k,
    Q.Q2_K: quantize_q2_k,
}

__all__ = ["QUANTIZE_FUNCTIONS", "chunk_elements", *(f.__name__ for f in QUANTIZE_FUNCTIONS.values())]
