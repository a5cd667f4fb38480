"""Fused dequantization: one Triton kernel launch per weight (CUDA), the torch code in gguf.py / nf4.py / fp8.py the
reference.

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

The kernel bodies are in triton_kernels.py (device code, one block decoder per format, shared with the fused
small-batch matmul of triton_matmul.py); this file decides when to use them, launches and registers them.

CPU tensors run the same kernels in Triton's interpreter (numpy): that is how the tests check them without a GPU.

torch.compile: on torch >= 2.6 the launches are wrapped in ``torch.library.triton_op`` + ``wrap_triton``, so
Dynamo records one custom op (no graph break) and Inductor sees the kernel itself. Older torch: plain functions.
"""
from __future__ import annotations

import importlib.util
import math
import os
import struct

import torch

from ..settings import switch
from .common import QuantDataError

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ENV_DISABLE = "KLV_NO_TRITON"

# GGUF kernel ids, value layouts and tiles are the rows of gguf.BLOCK_TYPES, read where a GGUF tensor is handled:
# the gguf package is needed for GGUF files alone, and fp8 / NF4 models reach this module without it.
# fp8: (elements per program, num_warps); an elementwise pass, not tuned on a GPU yet
FP8_CONFIG = (2048, 4)
# nested (double-quantized absmax) -> (elements per program: whole absmax blocks, at least one; num_warps)
NF4_CONFIG = {False: (4096, 2), True: (2048, 4)}
# The interpreter runs programs one after another, each a handful of numpy calls: big tiles keep it fast.
INTERPRET_TILE = 16384

_ASSUME_CONSTANT = getattr(getattr(torch, "compiler", None), "assume_constant_result", lambda fn: fn)
__all__ = ["available", "supports_gguf", "dequantize_gguf", "dequantize_nf4", "dequantize_fp8"]


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
    if switch(ENV_DISABLE):
        return False
    device = torch.device(device)
    if device.type != "cuda":
        return False
    return _triton_importable() and _device_ok(device)


def block_row(qtype):
    """The registry row (gguf.BlockType) of a block type given as name, id or enum; None for float types and
    anything unknown. Every block type has a Triton decoder."""
    if isinstance(qtype, bool) or qtype is None:
        return None
    from . import gguf
    if isinstance(qtype, str):
        return gguf.BLOCK_TYPES_BY_NAME.get(qtype.strip().upper())
    try:
        return gguf.BLOCK_TYPES_BY_ID.get(int(qtype))
    except (TypeError, ValueError):
        return None


def supports_gguf(qtype, dtype) -> bool:
    """True when `qtype` (name, id or enum) has a Triton kernel and `dtype` is one it writes."""
    return dtype in OUT_DTYPES and block_row(qtype) is not None


def supports_row_tiles(qformat: str, meta: dict, shape) -> bool:
    """True when the row-tiled kernels (fused matmul, LoRA merge) can read this weight: a GGUF type with a decoder,
    or NF4 whose rows are whole absmax blocks (a power of two of at least 16)."""
    if len(shape) != 2:
        return False
    if qformat == "gguf":
        return block_row(meta.get("qtype")) is not None
    if qformat == "nf4":
        bs = int(meta.get("blocksize", 0))
        return bs >= 16 and bs & (bs - 1) == 0 and shape[-1] % bs == 0
    return False


# ----------------------------------------------------------------------------------------------------------------
# kernels (triton_kernels.py, loaded on first use)

_KERNELS: dict = {}


def _kernels(interpret: bool):
    """The kernel module: compiled (@triton.jit) kernels, or a second copy of the same file whose kernels run in
    Triton's interpreter (numpy, for CPU tensors).

    Triton picks interpretation from TRITON_INTERPRET when @triton.jit runs; we choose per call instead (by the
    tensors' device), so a process can hold both and the tests need no import-order tricks."""
    module = _KERNELS.get(interpret)
    if module is None:
        import importlib
        import importlib.util
        if interpret:
            name = __package__ + ".triton_kernels_interpreted"
            spec = importlib.util.spec_from_file_location(
                name, os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_kernels.py"))
            module = importlib.util.module_from_spec(spec)
            module.KLV_INTERPRET = True
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(".triton_kernels", __package__)
        _KERNELS[interpret] = module
    return module


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
    row = block_row(qtype)
    nb, warps = row.dequant_tile
    out = torch.empty(numel, dtype=dtype, device=raw.device)
    n_blocks = numel // row.block
    if n_blocks:
        interpret = raw.device.type != "cuda"
        if interpret:
            nb = INTERPRET_TILE // row.block
        _launch(_kernels(interpret).dequant_gguf, interpret, (triton_cdiv(n_blocks, nb),), raw, out, n_blocks,
                QT=row.kernel, BLOCK=row.block, TS=row.type_size, S=row.sub, W=row.width, NB=nb,
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
        _launch(_kernels(interpret).dequant_nf4, interpret, grid, packed, absmax, code, nested_absmax, nested_code,
                offset, out, numel, nested_blocksize, BS=blocksize, NB=nb, NESTED=nested, MUL_RN=not interpret,
                BF16_BITS=interpret and dtype == torch.bfloat16, num_warps=warps)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def register_op(name: str, impl):
    """`impl` as the custom op kontext_lowvram::<name> (torch >= 2.6: torch.compile records one op, Inductor sees
    the kernel), registered once per process at import, so a first call inside torch.compile does not register it
    mid-trace. Another copy of the calling file (ComfyUI importing the folder by path next to the installed
    package) reuses the op already registered: same code, same kernels. Older torch, or no triton installed (the op
    could never run, and torch would log "Triton not available" once per op at every ComfyUI start): `impl`."""
    if _triton_op is None or importlib.util.find_spec("triton") is None:
        return impl
    try:
        return _triton_op(f"kontext_lowvram::{name}", mutates_args=())(impl)
    except RuntimeError:  # already registered by another import of this file
        return getattr(torch.ops.kontext_lowvram, name)


def _fp8_impl(raw: torch.Tensor, scale: torch.Tensor, numel: int, e5m2: bool, has_scale: bool,
              dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(numel, dtype=dtype, device=raw.device)
    if numel:
        interpret = raw.device.type != "cuda"
        block, warps = (INTERPRET_TILE, 4) if interpret else FP8_CONFIG
        _launch(_kernels(interpret).dequant_fp8, interpret, (triton_cdiv(numel, block),), raw, scale, out, numel,
                BLOCK=block, E5M2=e5m2, HAS_SCALE=has_scale, BF16_BITS=interpret and dtype == torch.bfloat16,
                num_warps=warps)
    return out


_gguf_op = register_op("gguf_dequant", _gguf_impl)
_fp8_op = register_op("fp8_dequant", _fp8_impl)
_nf4_op = register_op("nf4_dequant", _nf4_impl)


# ----------------------------------------------------------------------------------------------------------------
# public API: same signatures and results as gguf.dequantize / nf4.dequantize_nf4

def dequantize_gguf(raw: torch.Tensor, qtype, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """gguf.dequantize(raw, qtype, shape, dtype) in one kernel launch. Types outside SUPPORTED and dtypes other
    than bf16/fp16/fp32 go to the torch reference."""
    row = block_row(qtype)
    if row is None or dtype not in OUT_DTYPES:
        from . import gguf
        return gguf.dequantize(raw, qtype, shape, dtype)
    name, block, type_size = row.name, row.block, row.type_size
    dims = tuple(int(s) for s in shape)
    if not dims or any(s < 0 for s in dims):
        raise QuantDataError(f"Invalid tensor shape {dims}: need at least one non-negative dimension")
    if dims[-1] % block:
        raise QuantDataError(
            f"Row size {dims[-1]} of shape {dims} is not a multiple of the {name} block size {block}")
    if raw.dtype not in (torch.uint8, torch.int8):
        raise QuantDataError(f"{name} data must be uint8, got a {raw.dtype} tensor")
    expected = math.prod(dims) // block * type_size
    if raw.numel() != expected:
        got = raw.numel()
        raise QuantDataError(f"{name} tensor of shape {dims}: expected {expected} bytes, got {got} bytes"
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


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def dequantize_fp8(data: torch.Tensor, scale=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """fp8.dequantize_fp8(data, scale, dtype) in one kernel launch (the torch path takes three, with float32
    intermediates: ~19 bytes moved per weight instead of 3). Other dtypes go to the torch reference."""
    if data.dtype not in FP8_DTYPES or dtype not in OUT_DTYPES:
        from .fp8 import dequantize_fp8 as reference
        return reference(data, scale, dtype)
    flat = data.reshape(-1).contiguous().view(torch.uint8)
    scale_t = scale.to(data.device, torch.float32).reshape(1) if scale is not None else flat
    return _fp8_op(flat, scale_t, data.numel(), data.dtype == torch.float8_e5m2, scale is not None,
                   dtype).view(data.shape)


def nf4_kernel_args(q, device) -> tuple:
    """The NF4 kernels' tensor arguments for an NF4Weight on `device`: (packed, absmax, code, nested_absmax,
    nested_code, offset, nested_blocksize, blocksize, nested); plain absmax stands in for the unused nested ones."""
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
    return packed, absmax, code, nested_absmax, nested_code, offset, nested_blocksize, int(q.blocksize), \
        bool(q.nested)


def dequantize_nf4(q, dtype=torch.float32, device=None) -> torch.Tensor:
    """nf4.dequantize_nf4(q, dtype, device) in one kernel launch (nested absmax decoded in the same kernel)."""
    device = q.packed.device if device is None else torch.device(device)
    if dtype not in OUT_DTYPES or q.blocksize & (q.blocksize - 1) or (q.nested and q.nested_blocksize <= 0):
        from .nf4 import dequantize_nf4 as reference
        return reference(q, dtype=dtype, device=device)
    packed, absmax, code, nested_absmax, nested_code, offset, nested_blocksize, blocksize, nested = \
        nf4_kernel_args(q, device)
    out = _nf4_op(packed, absmax, code, nested_absmax, nested_code, offset, q.numel, blocksize, nested_blocksize,
                  nested, dtype)
    return out.view(q.shape)
