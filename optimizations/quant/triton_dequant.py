"""Fused dequantization: one Triton kernel launch per weight (CUDA), the torch code in gguf.py / nf4.py the reference.

The vectorised torch dequantizers cost 10-20 small elementwise kernels per weight, so a FLUX step spends its time
launching kernels. Here each weight is one launch: every program reads a tile of whole quant blocks straight from
the raw bytes, computes in float32 and stores the output dtype (bf16 / fp16 / fp32).

Chosen at run time (`available`): Triton importable, an NVIDIA CUDA device, and ``KLV_NO_TRITON`` unset (``=1``
forces the torch path). Triton is imported only when a kernel is first needed, so this module imports anywhere.

Exactness (bit-identical to the torch reference in float32, bf16 and fp16):

* GGUF: every product the format defines is exact in float32: an fp16 scale (11 significant bits) times a 6- or
  8-bit integer scale, times a quant of at most 6 bits, never needs more than 24 bits, and fp16's range keeps it far
  from float32 under/overflow. So the one rounding of ``dl * q - ml`` (Q4_K/Q5_K) is the same whether or not the
  compiler fuses it into an FMA, and the cast to bf16/fp16 is round-to-nearest-even on both sides.
* NF4: ``code[nibble] * absmax`` is one float32 rounding, as in torch. Double-quantized absmax is
  ``nested_code[a] * nested_absmax + offset``, two roundings: on the GPU the product goes through ``mul_rn`` so
  ptxas cannot contract it into an FMA (which would round once and differ in the last bit).

CPU tensors run the same kernels in Triton's interpreter (numpy): that is how the tests check them without a GPU.

torch.compile: on torch >= 2.6 the launches are wrapped in ``torch.library.triton_op`` + ``wrap_triton``, so
Dynamo records one custom op (no graph break) and Inductor sees the kernel itself. Older torch: plain functions.
"""
from __future__ import annotations

import math
import os
import struct

import torch

from . import gguf as _gguf

SUPPORTED = frozenset({"Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q3_K"})
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ENV_DISABLE = "KLV_NO_TRITON"

# qtype -> (elements per block, bytes per block, blocks per program, num_warps). Tiles picked with
# tests/gpu/kernel_check.py --sweep on an H100 (timings there vary run to run; most tiles of 1-4K elements are close).
GGUF_CONFIG = {
    "Q8_0": (32, 34, 64, 4),
    "Q4_0": (32, 18, 64, 4),
    "Q4_K": (256, 144, 8, 4),
    "Q5_K": (256, 176, 8, 4),
    "Q6_K": (256, 210, 8, 4),
    "Q3_K": (256, 110, 4, 2),
}
# nested (double-quantized absmax) -> (elements per program: whole absmax blocks, at least one; num_warps)
NF4_CONFIG = {False: (4096, 2), True: (2048, 4)}
# The interpreter runs programs one after another, each a handful of numpy calls: big tiles keep it fast.
INTERPRET_TILE = 16384

_ASSUME_CONSTANT = getattr(getattr(torch, "compiler", None), "assume_constant_result", lambda fn: fn)
# type ids of the supported types (GGMLQuantizationType is an IntEnum): resolved without enum machinery, which
# torch.compile does not trace on every torch version
_NAME_BY_ID = {int(_gguf.Q[name]): name for name in SUPPORTED}

__all__ = ["SUPPORTED", "available", "supports_gguf", "dequantize_gguf", "dequantize_nf4"]


# ----------------------------------------------------------------------------------------------------------------
# when to use it

_TRITON_IMPORTABLE = None
_DEVICE_OK: dict = {}


def _triton_importable() -> bool:
    global _TRITON_IMPORTABLE
    if _TRITON_IMPORTABLE is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _TRITON_IMPORTABLE = True
        except Exception:  # ImportError, or a broken install (missing libs)
            _TRITON_IMPORTABLE = False
    return _TRITON_IMPORTABLE


def _device_ok(device: torch.device) -> bool:
    index = device.index if device.index is not None else torch.cuda.current_device()
    ok = _DEVICE_OK.get(index)
    if ok is None:
        # NVIDIA only (the nested-NF4 kernel uses libdevice mul_rn; ROCm is untested); Triton needs sm_75+.
        ok = torch.version.cuda is not None and torch.cuda.get_device_capability(index) >= (7, 5)
        _DEVICE_OK[index] = ok
    return ok


@_ASSUME_CONSTANT  # torch.compile: evaluated once while tracing, a constant in the graph
def available(device) -> bool:
    """True when the fused Triton kernels can run on `device`: Triton importable, an NVIDIA CUDA device, and the
    environment variable KLV_NO_TRITON not set to a true value."""
    if os.environ.get(ENV_DISABLE, "0").strip().lower() not in ("", "0", "false", "no"):
        return False
    device = torch.device(device)
    if device.type != "cuda":
        return False
    return _triton_importable() and _device_ok(device)


def _kernel_name(qtype):
    """Name of the kernel for a type given as name, id or enum; None when there is none."""
    if isinstance(qtype, str):
        name = qtype.strip().upper()
        return name if name in SUPPORTED else None
    if isinstance(qtype, bool):
        return None
    try:
        return _NAME_BY_ID.get(int(qtype))
    except (TypeError, ValueError):
        return None


def supports_gguf(qtype, dtype) -> bool:
    """True when `qtype` (name, id or enum) has a Triton kernel and `dtype` is one it writes."""
    return _kernel_name(qtype) is not None and dtype in OUT_DTYPES


# ----------------------------------------------------------------------------------------------------------------
# kernels (defined on first use, after importing triton)

_KERNELS: dict = {}


def _define_kernels():
    """Kernel bodies. `tl` and `libdevice` are module globals bound by _kernels() before this runs."""

    def q8_0(raw, out, n_blocks, NB: tl.constexpr, BF16_BITS: tl.constexpr):
        pid = tl.program_id(0)
        raw += pid.to(tl.int64) * (NB * 34)
        out += pid.to(tl.int64) * (NB * 32)
        b = tl.arange(0, NB)[:, None]
        k = tl.arange(0, 32)[None, :]
        m = (pid * NB + b) < n_blocks
        blk = raw + b * 34
        d = ((tl.load(blk, mask=m, other=0).to(tl.uint16)
              | (tl.load(blk + 1, mask=m, other=0).to(tl.uint16) << 8)).to(tl.float16, bitcast=True).to(tl.float32))
        q = tl.load(blk + 2 + k, mask=m, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        val = q * d
        if BF16_BITS:  # interpreter: round to nearest even by hand (its fp32->bf16 cast truncates)
            bits = val.to(tl.uint32, bitcast=True)
            val = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        tl.store(out + b * 32 + k, val.to(out.dtype.element_ty), mask=m)

    def q4_0(raw, out, n_blocks, NB: tl.constexpr, BF16_BITS: tl.constexpr):
        pid = tl.program_id(0)
        raw += pid.to(tl.int64) * (NB * 18)
        out += pid.to(tl.int64) * (NB * 32)
        b = tl.arange(0, NB)[:, None, None]
        h = tl.arange(0, 2)[None, :, None]      # low nibbles are quants 0-15, high nibbles 16-31
        k = tl.arange(0, 16)[None, None, :]
        m = (pid * NB + b) < n_blocks
        blk = raw + b * 18
        d = ((tl.load(blk, mask=m, other=0).to(tl.uint16)
              | (tl.load(blk + 1, mask=m, other=0).to(tl.uint16) << 8)).to(tl.float16, bitcast=True).to(tl.float32))
        byte = tl.load(blk + 2 + k, mask=m, other=0).to(tl.int32)
        q = ((byte >> (h * 4)) & 0xF).to(tl.float32) - 8.0
        val = d * q
        if BF16_BITS:  # interpreter: round to nearest even by hand (its fp32->bf16 cast truncates)
            bits = val.to(tl.uint32, bitcast=True)
            val = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        tl.store(out + b * 32 + h * 16 + k, val.to(out.dtype.element_ty), mask=m)

    def q4_k(raw, out, n_blocks, NB: tl.constexpr, BF16_BITS: tl.constexpr):
        # d[2] dmin[2] scales[12] qs[128]; 8 sub-blocks of 32, sub-block s = nibble s%2 of qs[(s//2)*32 + k]
        pid = tl.program_id(0)
        raw += pid.to(tl.int64) * (NB * 144)
        out += pid.to(tl.int64) * (NB * 256)
        b = tl.arange(0, NB)[:, None, None]
        s = tl.arange(0, 8)[None, :, None]
        k = tl.arange(0, 32)[None, None, :]
        m = (pid * NB + b) < n_blocks
        blk = raw + b * 144
        d = ((tl.load(blk, mask=m, other=0).to(tl.uint16)
              | (tl.load(blk + 1, mask=m, other=0).to(tl.uint16) << 8)).to(tl.float16, bitcast=True).to(tl.float32))
        dmin = ((tl.load(blk + 2, mask=m, other=0).to(tl.uint16)
                 | (tl.load(blk + 3, mask=m, other=0).to(tl.uint16) << 8)).to(tl.float16, bitcast=True)
                .to(tl.float32))
        # 6-bit scale/min of sub-block s (see gguf._k_scale_min)
        x = tl.load(blk + 8 + s, mask=m, other=0).to(tl.int32)         # scales[s+4]
        y = tl.load(blk + 4 + s, mask=m, other=0).to(tl.int32)         # scales[s]
        z = tl.load(blk + 4 + (s % 4), mask=m, other=0).to(tl.int32)   # scales[s-4] for s >= 4
        sc = tl.where(s < 4, y & 0x3F, (x & 0x0F) | ((z >> 2) & 0x30))
        mn = tl.where(s < 4, x & 0x3F, (x >> 4) | ((y >> 2) & 0x30))
        dl = d * sc.to(tl.float32)
        ml = dmin * mn.to(tl.float32)
        byte = tl.load(blk + 16 + (s // 2) * 32 + k, mask=m, other=0).to(tl.int32)
        q = ((byte >> ((s % 2) * 4)) & 0xF).to(tl.float32)
        val = dl * q - ml
        if BF16_BITS:  # interpreter: round to nearest even by hand (its fp32->bf16 cast truncates)
            bits = val.to(tl.uint32, bitcast=True)
            val = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        tl.store(out + b * 256 + s * 32 + k, val.to(out.dtype.element_ty), mask=m)

    def q5_k(raw, out, n_blocks, NB: tl.constexpr, BF16_BITS: tl.constexpr):
        # d[2] dmin[2] scales[12] qh[32] qs[128]; bit s of qh[k] is the 5th bit of quant s*32+k
        pid = tl.program_id(0)
        raw += pid.to(tl.int64) * (NB * 176)
        out += pid.to(tl.int64) * (NB * 256)
        b = tl.arange(0, NB)[:, None, None]
        s = tl.arange(0, 8)[None, :, None]
        k = tl.arange(0, 32)[None, None, :]
        m = (pid * NB + b) < n_blocks
        blk = raw + b * 176
        d = ((tl.load(blk, mask=m, other=0).to(tl.uint16)
              | (tl.load(blk + 1, mask=m, other=0).to(tl.uint16) << 8)).to(tl.float16, bitcast=True).to(tl.float32))
        dmin = ((tl.load(blk + 2, mask=m, other=0).to(tl.uint16)
                 | (tl.load(blk + 3, mask=m, other=0).to(tl.uint16) << 8)).to(tl.float16, bitcast=True)
                .to(tl.float32))
        x = tl.load(blk + 8 + s, mask=m, other=0).to(tl.int32)
        y = tl.load(blk + 4 + s, mask=m, other=0).to(tl.int32)
        z = tl.load(blk + 4 + (s % 4), mask=m, other=0).to(tl.int32)
        sc = tl.where(s < 4, y & 0x3F, (x & 0x0F) | ((z >> 2) & 0x30))
        mn = tl.where(s < 4, x & 0x3F, (x >> 4) | ((y >> 2) & 0x30))
        dl = d * sc.to(tl.float32)
        ml = dmin * mn.to(tl.float32)
        low = (tl.load(blk + 48 + (s // 2) * 32 + k, mask=m, other=0).to(tl.int32) >> ((s % 2) * 4)) & 0xF
        high = (tl.load(blk + 16 + k, mask=m, other=0).to(tl.int32) >> s) & 1
        q = (low | (high << 4)).to(tl.float32)
        val = dl * q - ml
        if BF16_BITS:  # interpreter: round to nearest even by hand (its fp32->bf16 cast truncates)
            bits = val.to(tl.uint32, bitcast=True)
            val = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        tl.store(out + b * 256 + s * 32 + k, val.to(out.dtype.element_ty), mask=m)

    def q6_k(raw, out, n_blocks, NB: tl.constexpr, BF16_BITS: tl.constexpr):
        # ql[128] qh[64] scales[16] (int8) d[2]; quant j = g*128 + p*32 + k with g = s//4, p = s%4
        pid = tl.program_id(0)
        raw += pid.to(tl.int64) * (NB * 210)
        out += pid.to(tl.int64) * (NB * 256)
        b = tl.arange(0, NB)[:, None, None]
        s = tl.arange(0, 8)[None, :, None]
        k = tl.arange(0, 32)[None, None, :]
        m = (pid * NB + b) < n_blocks
        blk = raw + b * 210
        d = ((tl.load(blk + 208, mask=m, other=0).to(tl.uint16)
              | (tl.load(blk + 209, mask=m, other=0).to(tl.uint16) << 8)).to(tl.float16, bitcast=True)
             .to(tl.float32))
        g = s // 4
        p = s % 4
        low = (tl.load(blk + g * 64 + (p % 2) * 32 + k, mask=m, other=0).to(tl.int32) >> ((p // 2) * 4)) & 0xF
        high = (tl.load(blk + 128 + g * 32 + k, mask=m, other=0).to(tl.int32) >> (p * 2)) & 3
        q = (low | (high << 4)).to(tl.float32) - 32.0
        sc = tl.load(blk + 192 + s * 2 + k // 16, mask=m, other=0).to(tl.int8, bitcast=True).to(tl.float32)
        dl = d * sc
        val = dl * q
        if BF16_BITS:  # interpreter: round to nearest even by hand (its fp32->bf16 cast truncates)
            bits = val.to(tl.uint32, bitcast=True)
            val = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        tl.store(out + b * 256 + s * 32 + k, val.to(out.dtype.element_ty), mask=m)

    def q3_k(raw, out, n_blocks, NB: tl.constexpr, BF16_BITS: tl.constexpr):
        # hmask[32] qs[64] scales[12] d[2]; 16 sub-blocks of 16 with signed 6-bit scales
        pid = tl.program_id(0)
        raw += pid.to(tl.int64) * (NB * 110)
        out += pid.to(tl.int64) * (NB * 256)
        b = tl.arange(0, NB)[:, None, None]
        s = tl.arange(0, 8)[None, :, None]
        k = tl.arange(0, 32)[None, None, :]
        m = (pid * NB + b) < n_blocks
        blk = raw + b * 110
        d = ((tl.load(blk + 108, mask=m, other=0).to(tl.uint16)
              | (tl.load(blk + 109, mask=m, other=0).to(tl.uint16) << 8)).to(tl.float16, bitcast=True)
             .to(tl.float32))
        t = s * 2 + k // 16  # sub-block of 16
        sc_low = (tl.load(blk + 96 + t % 8, mask=m, other=0).to(tl.int32) >> ((t // 8) * 4)) & 0xF
        sc_high = (tl.load(blk + 104 + t % 4, mask=m, other=0).to(tl.int32) >> ((t // 4) * 2)) & 3
        sc = (sc_low | (sc_high << 4)).to(tl.float32) - 32.0
        dl = d * sc
        ql = (tl.load(blk + 32 + (s // 4) * 32 + k, mask=m, other=0).to(tl.int32) >> ((s % 4) * 2)) & 3
        hm = (tl.load(blk + k, mask=m, other=0).to(tl.int32) >> s) & 1
        q = (ql - ((hm ^ 1) << 2)).to(tl.float32)
        val = dl * q
        if BF16_BITS:  # interpreter: round to nearest even by hand (its fp32->bf16 cast truncates)
            bits = val.to(tl.uint32, bitcast=True)
            val = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        tl.store(out + b * 256 + s * 32 + k, val.to(out.dtype.element_ty), mask=m)

    def nf4(packed, absmax, code, nested_absmax, nested_code, offset, out, n, nested_blocksize,
            BS: tl.constexpr, NB: tl.constexpr, NESTED: tl.constexpr, MUL_RN: tl.constexpr,
            BF16_BITS: tl.constexpr):
        # element e: byte e//2, high nibble first; value code[nibble] * absmax[e // BS]
        pid = tl.program_id(0)
        packed += pid.to(tl.int64) * (NB * BS // 2)
        out += pid.to(tl.int64) * (NB * BS)
        b = tl.arange(0, NB)[:, None]
        i = tl.arange(0, BS)[None, :]
        e = b * BS + i
        m = (pid.to(tl.int64) * (NB * BS) + e) < n
        byte = tl.load(packed + e // 2, mask=m, other=0).to(tl.int32)
        nib = (byte >> ((1 - e % 2) * 4)) & 0xF
        v = tl.load(code + nib, mask=m, other=0.0)
        blk = pid * NB + b
        bm = blk * BS < n
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
        val = v * am
        if BF16_BITS:  # interpreter: round to nearest even by hand (its fp32->bf16 cast truncates)
            bits = val.to(tl.uint32, bitcast=True)
            val = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        tl.store(out + e, val.to(out.dtype.element_ty), mask=m)

    return {"Q8_0": q8_0, "Q4_0": q4_0, "Q4_K": q4_k, "Q5_K": q5_k, "Q6_K": q6_k, "Q3_K": q3_k, "nf4": nf4}


def _kernels(interpret: bool) -> dict:
    """Compiled (@triton.jit) kernels, or interpreted ones (numpy, for CPU tensors): same bodies either way.

    Triton picks interpretation from TRITON_INTERPRET when @triton.jit runs; we choose per call instead (by the
    tensors' device), so a process can hold both and the tests need no import-order tricks."""
    kernels = _KERNELS.get(interpret)
    if kernels is None:
        global tl, libdevice
        import triton
        import triton.language as tl  # noqa: F811
        try:
            from triton.language.extra import libdevice  # noqa: F811
        except ImportError:  # pragma: no cover - very old triton
            from triton.language.math import libdevice  # type: ignore  # noqa: F811
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction as wrap
        else:
            wrap = triton.jit
        kernels = _KERNELS[interpret] = {name: wrap(fn) for name, fn in _define_kernels().items()}
    return kernels


tl = libdevice = None  # bound by _kernels()


def _launch(kernel, interpret, grid, *args, **kwargs):
    if interpret:
        # Interpreted kernels (CPU tensors, the tests) run here; under torch.compile's fake-tensor tracing there is
        # nothing to run (wrap_triton does the same for real kernels).
        from torch._subclasses.fake_tensor import is_fake
        from torch._subclasses.functional_tensor import FunctionalTensor
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if any(isinstance(a, FunctionalTensor) for a in tensors):
            # AOTAutograd decomposes triton ops into the kernel call, which only works for compiled kernels.
            raise NotImplementedError("interpreted (CPU) Triton kernels can only be traced with backend='eager'")
        if any(is_fake(a) for a in tensors):
            return None
        kwargs.pop("num_warps", None)
        return kernel[grid](*args, **kwargs)
    return _wrap_triton(kernel)[grid](*args, **kwargs)


try:
    from torch.library import triton_op as _triton_op, wrap_triton as _wrap_triton
except ImportError:  # torch < 2.6: plain launches (torch.compile then graph-breaks around them)
    _triton_op = None

    def _wrap_triton(kernel):
        return kernel


# ----------------------------------------------------------------------------------------------------------------
# launches

def _gguf_impl(raw: torch.Tensor, qtype: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    block, type_size, nb, warps = GGUF_CONFIG[qtype]
    out = torch.empty(numel, dtype=dtype, device=raw.device)
    n_blocks = numel // block
    if n_blocks:
        interpret = raw.device.type != "cuda"
        if interpret:
            nb = INTERPRET_TILE // block
        kernel = _kernels(interpret)[qtype]
        _launch(kernel, interpret, (triton_cdiv(n_blocks, nb),), raw, out, n_blocks, NB=nb,
                BF16_BITS=interpret and dtype == torch.bfloat16, num_warps=warps)
    return out


def _nf4_impl(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, nested_absmax: torch.Tensor,
              nested_code: torch.Tensor, offset: float, numel: int, blocksize: int, nested_blocksize: int,
              nested: bool, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(numel, dtype=dtype, device=packed.device)
    if numel:
        interpret = packed.device.type != "cuda"
        tile, warps = NF4_CONFIG[bool(nested)]
        nb = max(1, (INTERPRET_TILE if interpret else tile) // blocksize)
        grid = (triton_cdiv(triton_cdiv(numel, blocksize), nb),)
        _launch(_kernels(interpret)["nf4"], interpret, grid, packed, absmax, code, nested_absmax, nested_code,
                offset, out, numel, nested_blocksize, BS=blocksize, NB=nb, NESTED=nested, MUL_RN=not interpret,
                BF16_BITS=interpret and dtype == torch.bfloat16, num_warps=warps)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _register_ops():
    """The launches as custom ops (triton_op, torch >= 2.6), registered once per process at import (so a first call
    inside torch.compile does not register them mid-trace). Another copy of this file (ComfyUI importing the folder
    by path next to the installed package) reuses the ops already registered: same code, same kernels."""
    if _triton_op is None:
        return _gguf_impl, _nf4_impl
    try:
        return (_triton_op("kontext_lowvram::gguf_dequant", mutates_args=())(_gguf_impl),
                _triton_op("kontext_lowvram::nf4_dequant", mutates_args=())(_nf4_impl))
    except RuntimeError:  # already registered by another import of this file
        ns = torch.ops.kontext_lowvram
        return ns.gguf_dequant, ns.nf4_dequant


_gguf_op, _nf4_op = _register_ops()


# ----------------------------------------------------------------------------------------------------------------
# public API: same signatures and results as gguf.dequantize / nf4.dequantize_nf4

def dequantize_gguf(raw: torch.Tensor, qtype, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """gguf.dequantize(raw, qtype, shape, dtype) in one kernel launch. Types outside SUPPORTED and dtypes other
    than bf16/fp16/fp32 go to the torch reference."""
    name = _kernel_name(qtype)
    if name is None or dtype not in OUT_DTYPES:
        return _gguf.dequantize(raw, qtype, shape, dtype)
    block, type_size = GGUF_CONFIG[name][:2]
    dims = tuple(int(s) for s in shape)
    if not dims or any(s < 0 for s in dims):
        raise _gguf.QuantDataError(f"Invalid tensor shape {dims}: need at least one non-negative dimension")
    if dims[-1] % block:
        raise _gguf.QuantDataError(
            f"Row size {dims[-1]} of shape {dims} is not a multiple of the {name} block size {block}")
    if raw.dtype not in (torch.uint8, torch.int8):
        raise _gguf.QuantDataError(f"{name} data must be uint8, got a {raw.dtype} tensor")
    expected = math.prod(dims) // block * type_size
    if raw.numel() != expected:
        got = raw.numel()
        raise _gguf.QuantDataError(f"{name} tensor of shape {dims}: expected {expected} bytes, got {got} bytes"
                                   + (" (truncated data?)" if got < expected else ""))
    flat = raw.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    flat = flat.contiguous()
    return _gguf_op(flat, name, math.prod(dims), dtype).view(dims)


@_ASSUME_CONSTANT
def _f32(x: float) -> float:
    """The float32 value of x (what torch.tensor(x, dtype=float32) holds), so the kernel argument is exact."""
    return struct.unpack("<f", struct.pack("<f", float(x)))[0]


def dequantize_nf4(q, dtype=torch.float32, device=None) -> torch.Tensor:
    """nf4.dequantize_nf4(q, dtype, device) in one kernel launch (nested absmax decoded in the same kernel)."""
    device = q.packed.device if device is None else torch.device(device)
    if dtype not in OUT_DTYPES or q.blocksize & (q.blocksize - 1) or (q.nested and q.nested_blocksize <= 0):
        from .nf4 import dequantize_nf4 as reference
        return reference(q, dtype=dtype, device=device)
    packed = q.packed.to(device).reshape(-1)
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    packed = packed.contiguous()
    code = q.code.to(device, torch.float32).contiguous()
    if q.nested:
        absmax = q.absmax.to(device).reshape(-1).contiguous()
        nested_absmax = q.nested_absmax.to(device, torch.float32).reshape(-1).contiguous()
        nested_code = q.nested_code.to(device, torch.float32).reshape(-1).contiguous()
        offset, nested_blocksize = _f32(q.nested_offset), int(q.nested_blocksize)
    else:
        absmax = q.absmax.to(device, torch.float32).reshape(-1).contiguous()
        nested_absmax, nested_code, offset, nested_blocksize = absmax, code, 0.0, 1
    out = _nf4_op(packed, absmax, code, nested_absmax, nested_code, offset, q.numel, int(q.blocksize),
                        nested_blocksize, q.nested, dtype)
    return out.view(q.shape)
