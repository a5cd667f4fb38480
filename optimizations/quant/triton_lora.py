"""Dequantize with LoRA merged in the same pass: W' = dequant(W) + U·D, one Triton kernel per weight.

Where it pays: LoRA on a quantized model at the Kontext shape (8704 activation rows), where ops merge the low-rank
delta into the weight each forward dequantizes anyway. Merging after the fact is an addmm over the whole bf16
weight, a read and a write of 2 bytes per weight (≈ 48 GB a step for FLUX, the +4.4 % measured for one LoRA on
Q8_0); here each tile adds its U·D slice (a small tensor-core dot) before its only store. The sum is formed in
float32 and rounded once (the two-step path rounds twice), so it is at least as close to the exact W + U·D.

Off unless ``KLV_FUSED_LORA=1`` (optimizations/settings.py); `kontext-lowvram bench --include fused` measures it.
Same device rules as the dequant kernels.
"""
from __future__ import annotations


import torch

from ..settings import switch
from . import triton_dequant as td

ENV_ENABLE = "KLV_FUSED_LORA"
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_RANK = 1024  # total rank of the LoRAs merged into one weight (the kernel walks it 32 at a time)

NF4_LORA_CONFIG = (16, 2, 4)  # rows, 64-element absmax blocks along K, num_warps
INTERPRET_ROWS = 64

__all__ = ["enabled", "supports", "dequantize_with_lora"]


@td._ASSUME_CONSTANT
def enabled() -> bool:
    """KLV_FUSED_LORA=1 switches the one-pass LoRA merge on (off by default until timed on a GPU)."""
    return switch(ENV_ENABLE)


def supports(qformat: str, meta: dict, shape, dtype: torch.dtype, rank: int) -> bool:
    return dtype in DTYPES and 0 < rank <= MAX_RANK and td.supports_row_tiles(qformat, meta, shape)


def dequantize_with_lora(q, dtype: torch.dtype, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """dequant(q) + up @ down in `dtype`, shape (N, K), for the QWeight `q`; up (N×R, already scaled) and down
    (R×K) on its raw storage's device. The caller checks `supports` first."""
    raw = q.raw
    n_out, k = (int(s) for s in q.shape)
    up = up.to(raw.device, dtype).contiguous()
    down = down.to(raw.device, dtype).contiguous()
    flat = raw.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    if q.qformat == "gguf":
        out = _gguf_op(flat.contiguous(), up, down, td.block_row(q.meta["qtype"]).name, n_out, k)
    else:
        from .triton_matmul import nf4_args
        out = _nf4_op(*nf4_args(q), up, down, n_out, k)
    return out


def _rank_tile(rank: int) -> int:
    """Ranks per dot: the rank rounded up to a power of two, between 16 (tensor-core minimum) and 32."""
    return min(32, max(16, 1 << (rank - 1).bit_length()))


def _gguf_impl(raw: torch.Tensor, up: torch.Tensor, down: torch.Tensor, qtype: str, n_out: int,
               k: int) -> torch.Tensor:
    out = torch.empty(n_out, k, dtype=up.dtype, device=raw.device)
    row = td.block_row(qtype)  # layout and tile: gguf.BlockType
    qt, block, type_size, sub, width = row.kernel, row.block, row.type_size, row.sub, row.width
    bn, kb, warps = row.lora_tile
    interpret = raw.device.type != "cuda"
    if interpret:
        bn = INTERPRET_ROWS
    bpr = k // block
    td._launch(td._kernels(interpret).dequant_lora_gguf, interpret,
               (td.triton_cdiv(n_out, bn), td.triton_cdiv(bpr, kb)), raw, up, down, out, n_out, k, bpr,
               up.shape[1], QT=qt, BLOCK=block, TS=type_size, S=sub, W=width, BN=bn, KB=kb,
               RC=_rank_tile(up.shape[1]), IEEE=up.dtype == torch.float32,
               BF16_BITS=interpret and up.dtype == torch.bfloat16, num_warps=warps)
    return out


def _nf4_impl(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, nested_absmax: torch.Tensor,
              nested_code: torch.Tensor, offset: float, nested_blocksize: int, blocksize: int, nested: bool,
              up: torch.Tensor, down: torch.Tensor, n_out: int, k: int) -> torch.Tensor:
    out = torch.empty(n_out, k, dtype=up.dtype, device=packed.device)
    bn, kb, warps = NF4_LORA_CONFIG
    kb = max(1, kb * 64 // blocksize)
    interpret = packed.device.type != "cuda"
    if interpret:
        bn = INTERPRET_ROWS
    td._launch(td._kernels(interpret).dequant_lora_nf4, interpret,
               (td.triton_cdiv(n_out, bn), td.triton_cdiv(k, kb * blocksize)), packed, absmax, code, nested_absmax,
               nested_code, offset, up, down, out, n_out, k, up.shape[1], nested_blocksize, BS=blocksize, BN=bn,
               KB=kb, RC=_rank_tile(up.shape[1]), NESTED=nested, MUL_RN=not interpret,
               IEEE=up.dtype == torch.float32, BF16_BITS=interpret and up.dtype == torch.bfloat16, num_warps=warps)
    return out


_gguf_op = td.register_op("gguf_dequant_lora", _gguf_impl)
_nf4_op = td.register_op("nf4_dequant_lora", _nf4_impl)
