"""Fused small-batch matmul from quantized weights: y = x @ W.T + b read straight from the raw blocks (Triton).

Where it pays: activations of a few rows. FLUX's modulation linears (img_mod / txt_mod / modulation, ~27 % of
the weights) see one row per image, so their matmul is a pass over the weight. Dequantize-then-matmul makes that
pass three times (read raw, write bf16, read bf16: ~5 bytes per Q8_0 weight); here it is once (~1.06). With many
rows the weight is reused across them and dequantize + cuBLAS wins, so this only takes x with at most MAX_ROWS rows.
Formats: the GGUF types with a decoder, NF4, and fp8 (e4m3fn / e5m2, decoded by bit manipulation, so sm_80 works
too; fp8_linear's tensor-core fp8 matmul only takes 16 rows or more).

Off unless ``KLV_FUSED_MATMUL=1`` (optimizations/settings.py): it must beat dequantize + cuBLAS on the GPU in
question, which `kontext-lowvram bench` measures (rows "fused small-batch matmul").

Same dispatch rules as the dequant kernels (`triton_dequant.available`): Triton, an NVIDIA device, no KLV_NO_TRITON.
CPU tensors run the kernels in Triton's interpreter (the tests).
"""
from __future__ import annotations


import torch

from ..settings import switch
from . import triton_dequant as td

MAX_ROWS = 4
ENV_ENABLE = "KLV_FUSED_MATMUL"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# nf4: (output features per program, 64-element absmax blocks along K per step, num_warps)
NF4_MATMUL_CONFIG = (8, 4, 4)
# fp8 (e4m3fn / e5m2, per-tensor scale): (output features per program, elements along K per step, num_warps)
FP8_MATMUL_CONFIG = (8, 256, 4)
INTERPRET_TILE = 1 << 15  # elements per program step in the interpreter (bigger is faster there)

__all__ = ["MAX_ROWS", "enabled", "supports", "linear"]


@td._ASSUME_CONSTANT  # torch.compile: read once while tracing
def enabled() -> bool:
    """KLV_FUSED_MATMUL=1 switches the fused small-batch matmul on (off by default until timed on a GPU)."""
    return switch(ENV_ENABLE)


def supports(qformat: str, meta: dict, shape, x: torch.Tensor) -> bool:  # the format's facts, no storage needed
    """True when `linear` can take this weight and activation (any device; CUDA also needs `td.available`)."""
    if x.dtype not in DTYPES or x.shape[-1] != shape[-1] or len(shape) != 2:
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    return 0 < rows <= MAX_ROWS and (qformat == "fp8" or td.supports_row_tiles(qformat, meta, shape))


def linear(x: torch.Tensor, q, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ dequant(W).T + bias in one kernel, W being the QWeight `q` of logical shape (out, in).
    The caller checks `supports` first. Output dtype is x's; W is rounded to x's dtype before multiplying."""
    raw, qformat, meta, aux = q.raw, q.qformat, q.meta, q.aux
    n_out, k = (int(s) for s in q.shape)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    flat = raw.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    bias_t = bias.to(x.dtype).contiguous() if bias is not None else x2  # x2: any pointer, unused without bias
    if qformat == "gguf":
        out = _gguf_op(x2, flat.contiguous(), bias_t, td.block_row(meta["qtype"]).name, n_out, bias is not None)
    elif qformat == "fp8":
        scale = aux.get("scale")
        scale_t = scale.to(raw.device, torch.float32).reshape(1) if scale is not None else x2  # x2: unused
        out = _fp8_op(x2, flat.contiguous(), scale_t, bias_t, n_out, raw.dtype == torch.float8_e5m2,
                      scale is not None, bias is not None)
    else:
        out = _nf4_op(x2, *nf4_args(q), bias_t, n_out, bias is not None)
    return out.view(*lead, n_out)


def nf4_args(q):
    """The NF4 kernels' arguments (triton_dequant.nf4_kernel_args) of an "nf4" QWeight."""
    from . import nf4_weight_from_parts
    return td.nf4_kernel_args(nf4_weight_from_parts(q), q.raw.device)


def _gguf_impl(x: torch.Tensor, raw: torch.Tensor, bias: torch.Tensor, qtype: str, n_out: int,
               has_bias: bool) -> torch.Tensor:
    rows, k = x.shape
    out = torch.empty(rows, n_out, dtype=x.dtype, device=x.device)
    row = td.block_row(qtype)  # layout and tile: gguf.BlockType
    qt, block, type_size, sub, width = row.kernel, row.block, row.type_size, row.sub, row.width
    bn, kb, warps = row.matmul_tile
    interpret = x.device.type != "cuda"
    if interpret:
        bn = 64
        kb = max(1, INTERPRET_TILE // (bn * block))
    bpr = k // block
    kb = min(kb, 1 << max(bpr - 1, 0).bit_length())  # no wider than a row (power of two)
    td._launch(td._kernels(interpret).matmul_gguf, interpret, (td.triton_cdiv(n_out, bn), rows), x, raw, bias,
               out, n_out, bpr, x.stride(0), out.stride(0), QT=qt, BLOCK=block, TS=type_size, S=sub, W=width,
               BN=bn, KB=kb, HAS_BIAS=has_bias, BF16_BITS=interpret and x.dtype == torch.bfloat16,
               num_warps=warps)
    return out


def _nf4_impl(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
              nested_absmax: torch.Tensor, nested_code: torch.Tensor, offset: float, nested_blocksize: int,
              blocksize: int, nested: bool, bias: torch.Tensor, n_out: int, has_bias: bool) -> torch.Tensor:
    rows, k = x.shape
    out = torch.empty(rows, n_out, dtype=x.dtype, device=x.device)
    bn, kb, warps = NF4_MATMUL_CONFIG
    kb = max(1, kb * 64 // blocksize)
    interpret = x.device.type != "cuda"
    if interpret:
        bn = 64
        kb = max(1, INTERPRET_TILE // (bn * blocksize))
    kb = min(kb, 1 << max(k // blocksize - 1, 0).bit_length())
    td._launch(td._kernels(interpret).matmul_nf4, interpret, (td.triton_cdiv(n_out, bn), rows), x, packed, absmax,
               code, nested_absmax, nested_code, offset, bias, out, n_out, k, nested_blocksize, x.stride(0),
               out.stride(0), BS=blocksize, BN=bn, KB=kb, NESTED=nested, MUL_RN=not interpret, HAS_BIAS=has_bias,
               BF16_BITS=interpret and x.dtype == torch.bfloat16, num_warps=warps)
    return out


def _fp8_impl(x: torch.Tensor, raw: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, n_out: int, e5m2: bool,
              has_scale: bool, has_bias: bool) -> torch.Tensor:
    rows, k = x.shape
    out = torch.empty(rows, n_out, dtype=x.dtype, device=x.device)
    bn, bk, warps = FP8_MATMUL_CONFIG
    interpret = x.device.type != "cuda"
    if interpret:
        bn, bk = 64, 512
    bk = min(bk, 1 << max(k - 1, 0).bit_length())
    td._launch(td._kernels(interpret).matmul_fp8, interpret, (td.triton_cdiv(n_out, bn), rows), x, raw, scale, bias,
               out, n_out, k, x.stride(0), out.stride(0), BN=bn, BK=bk, E5M2=e5m2, HAS_SCALE=has_scale,
               HAS_BIAS=has_bias, BF16_BITS=interpret and x.dtype == torch.bfloat16, num_warps=warps)
    return out


_gguf_op = td.register_op("gguf_matmul", _gguf_impl)
_fp8_op = td.register_op("fp8_matmul_small", _fp8_impl)
_nf4_op = td.register_op("nf4_matmul", _nf4_impl)


def reference(x, q, bias=None):
    """What `linear` replaces: dequantize to x's dtype, then torch's matmul."""
    from . import dequantize_raw
    w = dequantize_raw(q, x.dtype)
    return torch.nn.functional.linear(x, w, bias.to(x.dtype) if bias is not None else None)

