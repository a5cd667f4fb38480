"""Vectorised PyTorch (de)quantization of GGUF / ggml tensors.

Every function here is a handful of whole-tensor torch ops on the input's device, so the same code
dequantizes on CPU and CUDA without numpy round trips or Python loops over blocks.

Bit-exactness: the reference is gguf-py (``gguf.quants.dequantize``), which computes in float32
numpy. We compute in float32 too, perform the multiplications/additions in the same order (float
arithmetic is not associative, so ``(d * sc) * q`` must not become ``d * (sc * q)``), never fuse them
(no addcmul / FMA), and cast to the requested dtype only at the very end. float32 output is therefore
bit-identical to gguf-py and bf16/fp16 output equals gguf-py's result rounded once.

Layout: multi-byte fields are little-endian, as in the file format. fp16 scale fields are read by
viewing their two bytes as float16 (torch tensors use host byte order; every platform torch ships
for is little-endian, and gguf-py itself relies on the same native ``view``). Wider packed integer
fields (Q5_0/Q5_1 ``qh``, IQ4_XS ``scales_h``) are unpacked byte by byte, so they need no wide
integer dtypes at all.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .common import QuantDataError, UnsupportedQuantType
from .gguf_quantize import QUANTIZE_FUNCTIONS

Q = GGMLQuantizationType
QK_K = 256  # super-block size of the K-quants and IQ4_XS

_FLOAT_TYPES: dict[GGMLQuantizationType, torch.dtype] = {
    Q.F32: torch.float32,
    Q.F16: torch.float16,
    Q.BF16: torch.bfloat16,
}

# Non-linear 4-bit codebook shared by IQ4_NL and IQ4_XS (ggml-common.h kvalues_iq4nl).
IQ4NL_KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


# --------------------------------------------------------------------------------------------------
# Small helpers shared by the per-type kernels
# --------------------------------------------------------------------------------------------------

def _split(blocks: torch.Tensor, *sizes: int) -> list[torch.Tensor]:
    """Cut (n_blocks, type_size) bytes into consecutive fields of the given byte widths (views)."""
    return list(torch.split(blocks, list(sizes), dim=-1))


def _f16(field: torch.Tensor) -> torch.Tensor:
    """(n, 2) bytes of a little-endian fp16 field -> (n, 1) float32.

    ``view(float16)`` needs a contiguous last dim, which a column slice of the blocks is not; the copy
    is only 2 bytes per block."""
    return field.contiguous().view(torch.float16).to(torch.float32)


def _unpack_planar(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Split each byte of (..., L) into 8//bits fields of `bits` bits -> (..., 8//bits, L).

    Output [..., j, k] is bits [j*bits, (j+1)*bits) of byte k: the "planar" order ggml uses for
    quants (first all low nibbles, then all high nibbles)."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device).unsqueeze(-1)
    return (packed.unsqueeze(-2) >> shifts) & ((1 << bits) - 1)


def _unpack_interleaved(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Split each byte of (..., L) into 8//bits fields, byte-major -> (..., L * 8//bits).

    This is the order of the fields in a little-endian integer made of those bytes (bit i of a
    uint32 ``qh`` is bit i%8 of byte i//8), so it unpacks uint16/uint32 bit fields."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    fields = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return fields.flatten(-2)


def _nibbles(qs: torch.Tensor, n_blocks: int, group: int) -> torch.Tensor:
    """4-bit quants stored as groups of `group` bytes, low nibbles first, then high nibbles.

    Returns uint8 (n_blocks, n_groups, 2 * group) in element order."""
    # Explicit sizes rather than -1: reshape cannot infer a dim when n_blocks == 0.
    n_groups = qs.shape[-1] // group
    return _unpack_planar(qs.reshape(n_blocks, n_groups, group), 4).reshape(n_blocks, n_groups, 2 * group)


def _kvalues(device: torch.device) -> torch.Tensor:
    return torch.tensor(IQ4NL_KVALUES, dtype=torch.float32, device=device)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: twelve bytes holding eight 6-bit scales and eight 6-bit mins -> two uint8 (n, 8).

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same for
    the mins; bytes 8-11 hold the low nibbles of scales 4-7 (low half) and mins 4-7 (high half)."""
    d, m, m_d = scales.reshape(scales.shape[0], 3, 4).unbind(dim=1)
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _check_blocks(blocks: torch.Tensor, qtype: GGMLQuantizationType) -> int:
    type_size = GGML_QUANT_SIZES[qtype][1]
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != type_size:
        raise QuantDataError(
            f"{qtype.name} blocks must be uint8 of shape (n_blocks, {type_size}), "
            f"got {blocks.dtype} {tuple(blocks.shape)}"
        )
    return blocks.shape[0]


# --------------------------------------------------------------------------------------------------
# Per-type kernels: uint8 (n_blocks, type_size) -> (n_blocks, block_size) in `dtype`
# Each mirrors the arithmetic order of the matching gguf.quants class.
# --------------------------------------------------------------------------------------------------

def dequantize_q8_0(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    _check_blocks(blocks, Q.Q8_0)
    d, qs = _split(blocks, 2, 32)
    return (qs.view(torch.int8).to(torch.float32) * _f16(d)).to(dtype)


def dequantize_q4_0(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = _check_blocks(blocks, Q.Q4_0)
    d, qs = _split(blocks, 2, 16)
    q = _nibbles(qs, n, 16).reshape(n, 32).to(torch.float32) - 8  # exact small integers
    return (_f16(d) * q).to(dtype)


def dequantize_q4_1(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = _check_blocks(blocks, Q.Q4_1)
    d, m, qs = _split(blocks, 2, 2, 16)
    q = _nibbles(qs, n, 16).reshape(n, 32).to(torch.float32)
    return (_f16(d) * q + _f16(m)).to(dtype)


def _q5_quants(qh: torch.Tensor, qs: torch.Tensor, n: int) -> torch.Tensor:
    """Q5_0/Q5_1: 4 low bits from the nibbles, bit 4 from the little-endian uint32 `qh`."""
    low = _nibbles(qs, n, 16).reshape(n, 32)
    high = _unpack_interleaved(qh, 1)  # (n, 32): bit i of the uint32
    return low | (high << 4)


def dequantize_q5_0(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = _check_blocks(blocks, Q.Q5_0)
    d, qh, qs = _split(blocks, 2, 4, 16)
    q = _q5_quants(qh, qs, n).to(torch.float32) - 16
    return (_f16(d) * q).to(dtype)


def dequantize_q5_1(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = _check_blocks(blocks, Q.Q5_1)
    d, m, qh, qs = _split(blocks, 2, 2, 4, 16)
    q = _q5_quants(qh, qs, n).to(torch.float32)
    return (_f16(d) * q + _f16(m)).to(dtype)


def dequantize_q2_k(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = _check_blocks(blocks, Q.Q2_K)
    scales, qs, d, dmin = _split(blocks, QK_K // 16, QK_K // 4, 2, 2)
    # 16 sub-blocks of 16: low nibble of each scale byte scales, high nibble scales the min.
    dl = (_f16(d) * (scales & 0x0F).to(torch.float32)).unsqueeze(-1)
    ml = (_f16(dmin) * (scales >> 4).to(torch.float32)).unsqueeze(-1)
    # Two 32-byte groups, each holding four 2-bit planes of 32 quants.
    q = _unpack_planar(qs.reshape(n, 2, 32), 2).reshape(n, 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K).to(dtype)


def dequantize_q3_k(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = _check_blocks(blocks, Q.Q3_K)
    hmask, qs, scales, d = _split(blocks, QK_K // 8, QK_K // 4, 12, 2)
    # Sixteen 6-bit signed scales: low nibbles in bytes 0-7 (planar), top 2 bits in bytes 8-11.
    low = _unpack_planar(scales[:, :8], 4).reshape(n, 16)
    high = _unpack_planar(scales[:, 8:], 2).reshape(n, 16)
    sc = (low | (high << 4)).to(torch.float32) - 32
    dl = (_f16(d) * sc).unsqueeze(-1)
    ql = _unpack_planar(qs.reshape(n, 2, 32), 2).reshape(n, 16, 16)
    # The hmask bit *clear* means "subtract 4" (ggml stores the offset inverted). Stay in 8-bit
    # integers until the final conversion: q is in [-4, 3].
    offset = (_unpack_planar(hmask, 1).reshape(n, 16, 16) ^ 1) << 2
    q = (ql.view(torch.int8) - offset.view(torch.int8)).to(torch.float32)
    return (dl * q).reshape(n, QK_K).to(dtype)


def dequantize_q4_k(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = _check_blocks(blocks, Q.Q4_K)
    d, dmin, scales, qs = _split(blocks, 2, 2, 12, QK_K // 2)
    sc, mn = _k_scale_min(scales)
    dl = (_f16(d) * sc.to(torch.float32)).unsqueeze(-1)
    ml = (_f16(dmin) * mn.to(torch.float32)).unsqueeze(-1)
    q = _nibbles(qs, n, 32).reshape(n, 8, 32).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K).to(dtype)


def dequantize_q5_k(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = _check_blocks(blocks, Q.Q5_K)
    d, dmin, scales, qh, qs = _split(blocks, 2, 2, 12, QK_K // 8, QK_K // 2)
    sc, mn = _k_scale_min(scales)
    dl = (_f16(d) * sc.to(torch.float32)).unsqueeze(-1)
    ml = (_f16(dmin) * mn.to(torch.float32)).unsqueeze(-1)
    low = _nibbles(qs, n, 32).reshape(n, 8, 32)
    high = _unpack_planar(qh, 1)  # (n, 8, 32): bit j of byte k is the 5th bit of quant j*32+k
    q = (low | (high << 4)).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K).to(dtype)


def dequantize_q6_k(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = _check_blocks(blocks, Q.Q6_K)
    ql, qh, scales, d = _split(blocks, QK_K // 2, QK_K // 4, QK_K // 16, 2)
    dl = (_f16(d) * scales.view(torch.int8).to(torch.float32)).unsqueeze(-1)
    low = _nibbles(ql, n, 64).reshape(n, 8, 32)
    high = _unpack_planar(qh.reshape(n, 2, 32), 2).reshape(n, 8, 32)
    q = (low | (high << 4)).reshape(n, 16, 16).to(torch.float32) - 32
    return (dl * q).reshape(n, QK_K).to(dtype)


def dequantize_iq4_nl(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = _check_blocks(blocks, Q.IQ4_NL)
    d, qs = _split(blocks, 2, 16)
    # Index with int64: a uint8 index tensor would be taken as a boolean mask.
    q = _kvalues(blocks.device)[_nibbles(qs, n, 16).reshape(n, 32).long()]
    return (_f16(d) * q).to(dtype)


def dequantize_iq4_xs(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n = _check_blocks(blocks, Q.IQ4_XS)
    d, scales_h, scales_l, qs = _split(blocks, 2, 2, QK_K // 64, QK_K // 2)
    # Eight 6-bit signed scales: low nibbles byte-major in scales_l, top 2 bits in the uint16 scales_h.
    low = _unpack_interleaved(scales_l, 4)
    high = _unpack_interleaved(scales_h, 2)
    sc = (low | (high << 4)).to(torch.float32) - 32
    dl = (_f16(d) * sc).unsqueeze(-1)
    q = _kvalues(blocks.device)[_nibbles(qs, n, 16).reshape(n, 8, 32).long()]
    return (dl * q).reshape(n, QK_K).to(dtype)


# --------------------------------------------------------------------------------------------------
# The registry: one row per block type. Adding a type is one row here plus its decoders (the torch one above,
# the Triton one in triton_kernels._decode under the row's kernel id); every table the rest of the code reads
# (torch dispatch, kernel ids and layouts, tile shapes, fp16 fields) is this one.
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BlockType:
    qtype: GGMLQuantizationType
    decode: Callable[[torch.Tensor, torch.dtype], torch.Tensor]  # uint8 (n, type_size) -> (n, block) values
    # byte offsets of the fp16 scale (d) / min (dmin) fields in a block: random bytes there would often decode
    # to NaN/inf, so valid random blocks (tests, the benchmark) get finite values written there
    fp16_fields: tuple[int, ...]
    kernel: int  # id of the Triton decoder (triton_kernels._decode)
    sub: int  # the Triton decoder returns a block's values as [sub, width] in storage order
    width: int
    # Triton tiles. Dequant (blocks per program, num_warps): swept with tests/gpu/kernel_check.py --sweep on an
    # H100 for Q8_0, Q4_0 and the 256-element K-quants but Q2_K (timings vary run to run; most 1-4K-element tiles
    # are close); the others take the tile of the same-shaped type. Matmul (output features per program, blocks
    # along K per step, num_warps) and LoRA merge (rows per program, blocks along K per program, num_warps):
    # the widest that compile without register spills for sm_90 (tests/test_triton_compile.py); not timed on a GPU.
    dequant_tile: tuple[int, int]
    matmul_tile: tuple[int, int, int]
    lora_tile: tuple[int, int, int]

    @property
    def name(self) -> str:
        return self.qtype.name

    @property
    def block(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][1]


def _rows(*rows: BlockType) -> dict[GGMLQuantizationType, BlockType]:
    kernels = [r.kernel for r in rows]
    assert len(set(kernels)) == len(kernels), "two block types share a Triton decoder id"
    return {r.qtype: r for r in rows}


_SMALL, _SUPER = ((64, 4), (8, 8, 4), (16, 8, 4)), ((8, 4), (8, 1, 4), (16, 1, 4))  # 32- / 256-element blocks
BLOCK_TYPES: dict[GGMLQuantizationType, BlockType] = _rows(
    #         type       torch decoder     fp16 fields  kernel S  W   dequant, matmul, lora tiles
    BlockType(Q.Q8_0,   dequantize_q8_0,   (0,),        0,     1, 32, *_SMALL),
    BlockType(Q.Q4_0,   dequantize_q4_0,   (0,),        1,     2, 16, *_SMALL),
    BlockType(Q.Q4_K,   dequantize_q4_k,   (0, 2),      2,     8, 32, *_SUPER),   # d dmin scales[12] qs[128]
    BlockType(Q.Q5_K,   dequantize_q5_k,   (0, 2),      3,     8, 32, *_SUPER),   # d dmin scales[12] qh[32] qs[128]
    BlockType(Q.Q6_K,   dequantize_q6_k,   (208,),      4,     8, 32, *_SUPER),   # ql[128] qh[64] scales[16] d
    # Q3_K: hmask[32] qs[64] scales[12] d
    BlockType(Q.Q3_K,   dequantize_q3_k,   (108,),      5,     8, 32, (4, 2), (8, 1, 8), (16, 1, 8)),
    BlockType(Q.Q4_1,   dequantize_q4_1,   (0, 2),      6,     2, 16, *_SMALL),
    BlockType(Q.Q5_0,   dequantize_q5_0,   (0,),        7,     2, 16, *_SMALL),
    BlockType(Q.Q5_1,   dequantize_q5_1,   (0, 2),      8,     2, 16, *_SMALL),
    BlockType(Q.Q2_K,   dequantize_q2_k,   (80, 82),    9,     8, 32, *_SUPER),   # scales[16] qs[64] d dmin
    BlockType(Q.IQ4_NL, dequantize_iq4_nl, (0,),        10,    2, 16, *_SMALL),
    BlockType(Q.IQ4_XS, dequantize_iq4_xs, (0,),        11,    8, 32, *_SUPER),   # d scales_h[2] scales_l[4] qs[128]
)
BLOCK_TYPES_BY_NAME: dict[str, BlockType] = {r.name: r for r in BLOCK_TYPES.values()}
# ids as plain ints: torch.compile does not trace enum machinery on every torch version
BLOCK_TYPES_BY_ID: dict[int, BlockType] = {int(q): r for q, r in BLOCK_TYPES.items()}
DEQUANTIZE_FUNCTIONS = {q: r.decode for q, r in BLOCK_TYPES.items()}  # views of the registry, by enum
FP16_FIELDS = {q: r.fp16_fields for q, r in BLOCK_TYPES.items()}


def retune(name: str, **tiles) -> BlockType:
    """Give block type `name` other Triton tiles (dequant_tile=, matmul_tile=, lora_tile=), for the tile sweeps of
    tests/gpu/kernel_check.py; returns the row it replaced (pass it to `restore`)."""
    old = BLOCK_TYPES_BY_NAME[name]
    restore(dataclasses.replace(old, **tiles))
    return old


def restore(row: BlockType) -> None:
    BLOCK_TYPES[row.qtype] = BLOCK_TYPES_BY_NAME[row.name] = BLOCK_TYPES_BY_ID[int(row.qtype)] = row


def block_type(qtype) -> BlockType:
    """The registry row of a block type given as enum, id or name; UnsupportedQuantType for anything else
    (float types included)."""
    row = None
    if isinstance(qtype, str):
        row = BLOCK_TYPES_BY_NAME.get(qtype.strip().upper())
    elif isinstance(qtype, GGMLQuantizationType):
        row = BLOCK_TYPES.get(qtype)
    elif not isinstance(qtype, bool):
        try:
            row = BLOCK_TYPES_BY_ID.get(int(qtype))
        except (TypeError, ValueError):
            row = None
    if row is None:
        raise UnsupportedQuantType(f"{qtype!r} is not a supported GGUF block type; supported: "
                                   f"{', '.join(sorted(BLOCK_TYPES_BY_NAME))}")
    return row


SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(_FLOAT_TYPES) | frozenset(BLOCK_TYPES)


# --------------------------------------------------------------------------------------------------
# Type and shape bookkeeping
# --------------------------------------------------------------------------------------------------

def _names(types) -> str:
    return ", ".join(sorted(t.name for t in types))


def qtype_of(qtype) -> GGMLQuantizationType:
    """Normalise an enum member, integer id or (case-insensitive) name to a supported type."""
    resolved = None
    if isinstance(qtype, GGMLQuantizationType):
        resolved = qtype
    elif isinstance(qtype, str):
        resolved = GGMLQuantizationType.__members__.get(qtype.strip().upper())
    elif not isinstance(qtype, bool):
        try:
            resolved = GGMLQuantizationType(int(qtype))
        except (TypeError, ValueError):
            resolved = None
    if resolved is None or resolved not in SUPPORTED_TYPES:
        what = resolved.name if resolved is not None else repr(qtype)
        raise UnsupportedQuantType(
            f"Unsupported GGUF quant type {what}; supported types are: {_names(SUPPORTED_TYPES)}"
        )
    return resolved


def is_quantized(qtype) -> bool:
    return qtype_of(qtype) not in _FLOAT_TYPES


def _logical_shape(shape: Sequence[int]) -> tuple[int, ...]:
    dims = tuple(int(s) for s in shape)
    if not dims or any(s < 0 for s in dims):
        raise QuantDataError(f"Invalid tensor shape {dims}: need at least one non-negative dimension")
    return dims


def byte_shape(shape: Sequence[int], qtype) -> tuple[int, ...]:
    """Logical shape -> shape of the raw bytes (rows keep their dims, the last dim becomes bytes)."""
    qt = qtype_of(qtype)
    dims = _logical_shape(shape)
    block_size, type_size = GGML_QUANT_SIZES[qt]
    if dims[-1] % block_size != 0:
        raise QuantDataError(
            f"Row size {dims[-1]} of shape {dims} is not a multiple of the {qt.name} block size {block_size}"
        )
    return (*dims[:-1], dims[-1] // block_size * type_size)


# --------------------------------------------------------------------------------------------------
# Dequantize
# --------------------------------------------------------------------------------------------------

def _as_bytes(raw: torch.Tensor) -> torch.Tensor:
    """Any contiguous-able tensor -> flat uint8 view of its bytes."""
    flat = raw.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.contiguous().view(torch.uint8)


def _dequantize_float(raw: torch.Tensor, qt, dims, dtype) -> torch.Tensor:
    src = _FLOAT_TYPES[qt]
    if raw.dtype == src:  # size already checked by dequantize()
        values = raw.reshape(dims)
    else:
        flat = _as_bytes(raw)
        # A dtype view needs an element-aligned storage offset (e.g. a slice of an mmapped file).
        if flat.storage_offset() % src.itemsize:
            flat = flat.clone()
        values = flat.view(src).reshape(dims)
    if dtype == src:
        return values
    # Widen through float32 exactly like gguf-py does, then round once to the target dtype.
    return values.to(torch.float32).to(dtype)


def dequantize(raw: torch.Tensor, qtype, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Raw GGUF tensor data -> tensor of logical `shape` and `dtype` on raw.device.

    `raw` is the tensor's bytes as uint8 in any shape (GGUFReader's (rows, bytes) or flat); for
    F32/F16/BF16 it may also already be a tensor of that float dtype. For those float types, when
    `dtype` is the stored dtype the result is a view that shares memory with `raw` (no copy)."""
    qt = qtype_of(qtype)
    dims = _logical_shape(shape)
    expected = math.prod(byte_shape(dims, qt))
    is_float_source = qt in _FLOAT_TYPES and raw.dtype == _FLOAT_TYPES[qt]
    if raw.dtype not in (torch.uint8, torch.int8) and not is_float_source:
        allowed = "uint8" + (f" or {_FLOAT_TYPES[qt]}" if qt in _FLOAT_TYPES else "")
        raise QuantDataError(f"{qt.name} data must be {allowed}, got a {raw.dtype} tensor")
    got = raw.numel() * raw.element_size()
    if got != expected:
        raise QuantDataError(
            f"{qt.name} tensor of shape {dims}: expected {expected} bytes, got {got} bytes"
            + (" (truncated data?)" if got < expected else "")
        )

    if qt in _FLOAT_TYPES:
        return _dequantize_float(raw, qt, dims, dtype)
    if expected == 0:
        return torch.empty(dims, dtype=dtype, device=raw.device)
    type_size = GGML_QUANT_SIZES[qt][1]
    blocks = _as_bytes(raw).reshape(-1, type_size)
    return BLOCK_TYPES[qt].decode(blocks, dtype).reshape(dims)


# --------------------------------------------------------------------------------------------------
# Quantize (for tests, conversion tools and caches). The block encoders are llama.cpp's reference quantizers, one
# function per type in gguf_quantize (QUANTIZE_FUNCTIONS); the float types are handled here.
# --------------------------------------------------------------------------------------------------

QUANTIZABLE_TYPES: frozenset[GGMLQuantizationType] = frozenset(_FLOAT_TYPES) | frozenset(QUANTIZE_FUNCTIONS)


def _to_bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bf16 like ggml/gguf-py: round to nearest even, but NaNs keep sign and top payload
    bits and are forced quiet (torch would canonicalise every NaN to 0x7FC0)."""
    rounded = x.to(torch.bfloat16).view(torch.int16)
    quiet_nan = ((x.view(torch.int32) >> 16) | 0x40).to(torch.int16)  # arithmetic shift: fits int16
    return torch.where(torch.isnan(x), quiet_nan, rounded).view(torch.bfloat16)


def quantize(t: torch.Tensor, qtype) -> torch.Tensor:
    """Float tensor -> raw uint8 bytes shaped byte_shape(t.shape, qtype), on t.device.

    llama.cpp's quantizer without an importance matrix (ggml-quants.c quantize_row_*_ref, see gguf_quantize):
    F32/F16/BF16 and Q8_0/Q5_1/Q5_0/Q4_1/Q4_0 byte-identical to gguf.quants.quantize, the K-quants
    Q6_K/Q5_K/Q4_K/Q3_K/Q2_K (which gguf-py cannot make) byte-identical to llama.cpp's ggml_quantize_chunk."""
    qt = qtype_of(qtype)
    if qt not in QUANTIZABLE_TYPES:
        raise UnsupportedQuantType(
            f"Cannot quantize to {qt.name}; quantizable types are: {_names(QUANTIZABLE_TYPES)}"
        )
    shape = byte_shape(t.shape, qt)  # validates the row size
    if qt in QUANTIZE_FUNCTIONS:  # converts to float32 chunk by chunk: no full-size float32 copy
        return QUANTIZE_FUNCTIONS[qt](t.detach().reshape(math.prod(t.shape[:-1]), t.shape[-1])).reshape(shape)
    x = t.detach().to(torch.float32).contiguous()
    if qt == Q.F32:
        out = x
    elif qt == Q.F16:
        out = x.to(torch.float16)
    else:
        out = _to_bf16_bits(x)
    return out.contiguous().view(torch.uint8).reshape(shape)


__all__ = [
    "BLOCK_TYPES",
    "BlockType",
    "block_type",
    "DEQUANTIZE_FUNCTIONS",
    "IQ4NL_KVALUES",
    "QUANTIZABLE_TYPES",
    "QUANTIZE_FUNCTIONS",
    "SUPPORTED_TYPES",
    "byte_shape",
    "dequantize",
    "is_quantized",
    "qtype_of",
    "quantize",
    *(r.decode.__name__ for r in BLOCK_TYPES.values()),
]
