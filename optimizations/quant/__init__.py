"""Quant families and the one table that turns raw storage back into values.

Each family module (gguf, nf4, fp8) owns its block geometry, `dequantize` (vectorised torch, any device) and
`quantize` (for on-load conversion and the converter). `dequantize_raw` is the single dispatch point used by the
public `dequantize`, the quantized ops and the CLI; on CUDA it sends GGUF, NF4 and fp8 to the fused Triton kernels of
`triton_dequant` when those can run there.
"""
import torch

from .common import QuantDataError, UnsupportedQuantType


# GGUF, NF4 and fp8 take the fused Triton kernels (one launch per weight) where triton_dequant.available() says they run:
# Triton installed, an NVIDIA CUDA device, KLV_NO_TRITON unset. The torch code stays the reference everywhere else.

def _dequant_gguf(q, dtype):
    from . import gguf, triton_dequant
    qtype = q.meta["qtype"]
    if triton_dequant.supports_gguf(qtype, dtype) and triton_dequant.available(q.raw.device):
        return triton_dequant.dequantize_gguf(q.raw, qtype, q.shape, dtype)
    return gguf.dequantize(q.raw, qtype, q.shape, dtype)


def _dequant_nf4(q, dtype):
    from . import nf4, triton_dequant
    w = nf4_weight_from_parts(q)
    if dtype in triton_dequant.OUT_DTYPES and triton_dequant.available(q.raw.device):
        return triton_dequant.dequantize_nf4(w, dtype=dtype, device=q.raw.device)
    return nf4.dequantize_nf4(w, dtype=dtype, device=q.raw.device)


def _dequant_fp8(q, dtype):
    from . import triton_dequant
    from .fp8 import dequantize_fp8
    if dtype in triton_dequant.OUT_DTYPES and triton_dequant.available(q.raw.device):
        return triton_dequant.dequantize_fp8(q.raw, q.aux.get("scale"), dtype)
    return dequantize_fp8(q.raw, q.aux.get("scale"), dtype)


DEQUANTIZERS = {"gguf": _dequant_gguf, "nf4": _dequant_nf4, "fp8": _dequant_fp8}


def dequantize_raw(q, dtype=torch.float32):
    """The values of `q` (a qtensor.QWeight) in its logical shape and `dtype`, on its raw storage's device."""
    try:
        fn = DEQUANTIZERS[q.qformat]
    except KeyError:
        raise UnsupportedQuantType(f"unknown quantized format {q.qformat!r}; "
                                   f"known: {', '.join(DEQUANTIZERS)}") from None
    return fn(q._replace(shape=torch.Size(q.shape)), dtype)


# NF4 keeps its statistics as aux tensors and its geometry as meta, so it travels like every other format.
def nf4_weight_from_parts(q):
    """The NF4Weight of an "nf4" QWeight, its statistics on the raw storage's device."""
    from .nf4 import NF4Weight
    device, meta, aux = q.raw.device, q.meta, q.aux
    nested = "nested_absmax" in aux
    return NF4Weight(
        packed=q.raw, absmax=aux["absmax"].to(device), code=aux["code"].to(device), shape=tuple(q.shape),
        blocksize=int(meta["blocksize"]), dtype=meta.get("dtype", torch.bfloat16),
        nested_absmax=aux["nested_absmax"].to(device) if nested else None,
        nested_code=aux["nested_code"].to(device) if nested else None,
        nested_offset=float(meta["nested_offset"]) if nested else None,
        nested_blocksize=int(meta["nested_blocksize"]) if nested else None,
    )


def nf4_parts_from_weight(q):
    aux = {"absmax": q.absmax, "code": q.code}
    meta = {"blocksize": q.blocksize, "dtype": q.dtype}
    if q.nested_absmax is not None:
        aux.update(nested_absmax=q.nested_absmax, nested_code=q.nested_code)
        meta.update(nested_offset=q.nested_offset, nested_blocksize=q.nested_blocksize)
    return q.packed, meta, aux


__all__ = ["dequantize_raw", "DEQUANTIZERS", "QuantDataError", "UnsupportedQuantType",
           "nf4_weight_from_parts", "nf4_parts_from_weight"]
