"""bitsandbytes NF4 (4-bit NormalFloat) in plain PyTorch, in bitsandbytes' own checkpoint format.

FLUX NF4 checkpoints (e.g. flux1-dev-bnb-nf4) are written by bitsandbytes' ``Params4bit``. This module reads and
writes that layout without importing bitsandbytes, on whatever device the tensors live on.

Format (bitsandbytes ``quantize_4bit`` / ``QuantState.as_dict(packed=True)``), for a weight stored at ``p.weight``:

* ``p.weight``: uint8 ``((numel + 1) // 2, 1)``, two 4-bit codes per byte, the earlier element in the high nibble.
* ``p.weight.absmax``: per block of ``blocksize`` (default 64) elements, ``max |w|`` as float32, or, with double
  quantization (``compress_statistics=True``), those absmax values minus their mean (``nested_offset``) quantized
  to uint8 in blocks of 256 against the signed dynamic 8-bit map.
* ``p.weight.quant_map``: the 16 NF4 values; ``p.weight.nested_absmax`` / ``p.weight.nested_quant_map``: per-256
  block float32 scale and the 256-entry dynamic map (nested only).
* ``p.weight.quant_state.bitsandbytes__nf4``: uint8 bytes of ``json.dumps`` of ``quant_type``, ``blocksize``,
  ``dtype``, ``shape`` and, nested, ``nested_blocksize``, ``nested_dtype``, ``nested_offset``.

Code choice: each element becomes the index of the nearest NF4 value to ``w * (1 / absmax)``; an exact midpoint
goes to the lower index. That is bitsandbytes' CUDA decision tree (``dQuantizeNF4``: ``x > threshold`` picks the
upper branch, and its thresholds are exactly the float32 midpoints of the NF4 table) and its torch backend
(``bucketize`` against the same midpoints). The nested 8-bit stage is exact nearest with the same tie rule.

Reproducing bitsandbytes' quantized bytes is exact for the 4-bit codes and plain absmax; for double quantization
the offset, the dynamic map and the 8-bit codes can differ by a rounding step (bitsandbytes' float32 mean, its
float32-built map, its CPU lookup-table approximation for 8 bits, CUDA's fast-math reciprocal and even-index ties).
Dequantization needs none of that: it uses the statistics stored in the file and is bit-identical to bitsandbytes.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass

import torch

from .common import QuantDataError, UnsupportedQuantType

log = logging.getLogger("kontext_lowvram")

__all__ = [
    "NF4Weight", "NF4_CODE", "DYNAMIC_CODE", "quantize_nf4", "dequantize_nf4", "to_bnb_state_dict",
    "from_bnb_state_dict", "is_bnb_nf4_key", "BNB_VALID_BLOCKSIZES",
]

# bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1) scaled to [-1, 1], with an exact zero.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)


def _dynamic_code() -> torch.Tensor:
    """bitsandbytes.functional.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8).

    bitsandbytes builds it with float32 torch ops (torch.linspace and friends), whose last bit depends on the torch
    build and CPU vector width. We evaluate the same formula in double and round once, so the map (and therefore
    the quantized bytes) is the same on every machine; it is within 1 ulp of bitsandbytes' in every entry. Readers
    never rebuild it: the map travels in the checkpoint as ``nested_quant_map``.
    """
    values = [0.0, 1.0]
    for i in range(7):  # decade 10**(i-6) holds 2**i means of linspace(0.1, 1, 2**i + 1), both signs
        items = 2 ** i
        scale = 10.0 ** (i - 6)
        for j in range(items):
            lo, hi = 0.1 + 0.9 * j / items, 0.1 + 0.9 * (j + 1) / items
            mean = scale * (lo + hi) / 2.0
            values += [mean, -mean]
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_CODE = _dynamic_code()

BNB_VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_NESTED_BLOCKSIZE = 256  # bitsandbytes.quantize_4bit always double-quantizes absmax in blocks of 256
# dtypes bitsandbytes accepts as a 4-bit quant state's dtype (dequantize_4bit refuses others).
_BNB_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

_QS_PREFIX = "quant_state.bitsandbytes__"
_AUX_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                 ".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")


@dataclass
class NF4Weight:
    packed: torch.Tensor            # uint8, ((numel+1)//2, 1)
    absmax: torch.Tensor            # float32 per block, or uint8 when nested
    code: torch.Tensor              # float32[16]
    shape: tuple                    # logical shape
    blocksize: int
    dtype: torch.dtype              # original dtype recorded in quant_state
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_offset: float | None = None
    nested_blocksize: int | None = None

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to(self, device) -> "NF4Weight":
        move = (lambda t: None if t is None else t.to(device))
        return dataclasses.replace(
            self, packed=move(self.packed), absmax=move(self.absmax), code=move(self.code),
            nested_absmax=move(self.nested_absmax), nested_code=move(self.nested_code))

    def nbytes(self) -> int:
        tensors = (self.packed, self.absmax, self.code, self.nested_absmax, self.nested_code)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# ----------------------------------------------------------------------------------------------------------------
# quantize

def _midpoints(code: torch.Tensor) -> torch.Tensor:
    # float32 (a + b) / 2, as the CUDA kernels compute it ((upper + val) * 0.5f) and as dQuantizeNF4's literals are.
    return (code[:-1] + code[1:]) / 2


def _quantize_blocks(x: torch.Tensor, blocksize: int, code: torch.Tensor):
    """Blockwise absmax quantization of flat float32 ``x`` against sorted ``code``.

    Returns (int32 codes for ceil(n / blocksize) * blocksize elements, float32 absmax per block). The tail block is
    zero-padded: zeros leave its absmax alone and, for NF4, code to 7 (the exact 0.0), which is also what
    bitsandbytes puts in the spare low nibble of an odd-length tensor.
    """
    n = x.numel()
    nblocks = -(-n // blocksize)
    blocks = torch.nn.functional.pad(x, (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # Scale by the float32 reciprocal, as bitsandbytes' kernels do (not x / absmax, which rounds differently).
    # An all-zero block gets scale 0 so its zeros stay exact zeros rather than 0 * inf = NaN.
    inv = torch.where(absmax > 0, absmax.reciprocal(), torch.zeros_like(absmax))
    scaled = blocks * inv[:, None]
    overflow = torch.isinf(inv)  # subnormal absmax: 1 / absmax overflows float32, so divide instead
    if bool(overflow.any()):
        scaled[overflow] = blocks[overflow] / absmax[overflow, None]
    # right=False: x equal to a midpoint stays on the lower code, like the CUDA tree's strict `x > threshold`.
    codes = torch.bucketize(scaled, _midpoints(code.to(x.device)), out_int32=True, right=False)
    return codes.view(-1), absmax


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize ``w`` like ``bitsandbytes.functional.quantize_4bit(w, blocksize, compress_statistics=double_quant,
    quant_type="nf4")``, on ``w``'s device.

    The recorded ``dtype`` is ``w.dtype`` when bitsandbytes can restore it (float32/float16/bfloat16), otherwise
    float32 (values are always computed in float32).
    """
    if blocksize not in BNB_VALID_BLOCKSIZES:
        raise ValueError(f"NF4 blocksize must be one of {BNB_VALID_BLOCKSIZES} (bitsandbytes' set), got {blocksize}")
    if not w.is_floating_point():
        raise ValueError(f"NF4 quantization needs a floating-point tensor, got {w.dtype}")
    n = w.numel()
    if n == 0:
        raise ValueError("cannot NF4-quantize an empty tensor")
    x = w.detach().reshape(-1).to(torch.float32)
    codes, absmax = _quantize_blocks(x, blocksize, NF4_CODE)
    pairs = codes[: 2 * ((n + 1) // 2)].view(-1, 2)
    packed = ((pairs[:, 0] << 4) | pairs[:, 1]).to(torch.uint8).unsqueeze(1)

    q = NF4Weight(packed=packed, absmax=absmax, code=NF4_CODE.to(w.device, copy=True), shape=tuple(w.shape),
                  blocksize=blocksize, dtype=w.dtype if w.dtype in _BNB_DTYPES else torch.float32)
    if not double_quant:
        return q

    # Offset = mean absmax. bitsandbytes takes a float32 torch mean, whose last bit depends on the device's
    # reduction order; a float64 sum rounded once to float32 is the exactly rounded mean in practice, on any device.
    offset = (absmax.double().sum() / absmax.numel()).float()
    dyn = DYNAMIC_CODE.to(w.device)
    qcodes, nested_absmax = _quantize_blocks(absmax - offset, _NESTED_BLOCKSIZE, dyn)
    q.absmax = qcodes[: absmax.numel()].to(torch.uint8)
    q.nested_absmax = nested_absmax
    q.nested_code = dyn.clone()
    q.nested_offset = float(offset.item())
    q.nested_blocksize = _NESTED_BLOCKSIZE
    return q


# ----------------------------------------------------------------------------------------------------------------
# dequantize

def _scale_blocks_(vals: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """vals[i] *= scales[i // blocksize] in place (flat float32), the tail block included, with no padded copy."""
    n = vals.numel()
    full = n - n % blocksize
    if full:
        vals[:full].view(-1, blocksize).mul_(scales[: full // blocksize, None])
    if full < n:
        vals[full:].mul_(scales[full // blocksize])
    return vals


def _block_absmax(q: NF4Weight, device) -> torch.Tensor:
    absmax = q.absmax.to(device).reshape(-1)
    if q.nested_absmax is None:
        return absmax.to(torch.float32)
    # bitsandbytes: dequantize_blockwise(absmax) (code * scale, float32), then `absmax += offset` as a second
    # rounding step; keeping the two steps separate keeps the result bit-identical.
    vals = q.nested_code.to(device, torch.float32).index_select(0, absmax.to(torch.int32))
    _scale_blocks_(vals, q.nested_absmax.to(device, torch.float32).reshape(-1), q.nested_blocksize)
    return vals.add_(torch.tensor(q.nested_offset, dtype=torch.float32, device=device))


def dequantize_nf4(q: NF4Weight, dtype=torch.float32, device=None) -> torch.Tensor:
    """Values of ``q`` in its logical shape, bit-identical to bitsandbytes' ``dequantize_4bit`` in float32 (the
    product ``code * absmax`` is rounded to float32 first, then cast to ``dtype``)."""
    device = q.packed.device if device is None else torch.device(device)
    n = q.numel
    packed = q.packed.to(device).reshape(-1)
    if packed.dtype != torch.uint8:  # Params4bit(quant_storage=...) stores the same bytes under another dtype
        packed = packed.view(torch.uint8)
    code = q.code.to(device, torch.float32)
    # One 256-entry table of (high nibble, low nibble) value pairs turns each byte into its two values with a
    # single gather and an int32 index (half the memory of unpacking nibbles into an int64 index).
    byte = torch.arange(256, device=device)
    pair_lut = torch.stack((code[byte >> 4], code[byte & 0x0F]), dim=1)
    vals = pair_lut.index_select(0, packed.to(torch.int32)).view(-1)[:n]
    _scale_blocks_(vals, _block_absmax(q, device), q.blocksize)
    return vals.view(q.shape).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# bitsandbytes state-dict layout

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")  # bitsandbytes: str(dtype).strip("torch.")


def to_bnb_state_dict(q: NF4Weight, prefix: str) -> dict[str, torch.Tensor]:
    """The entries ``Linear4bit._save_to_state_dict`` writes for this weight (``prefix`` ends with "." or is "")."""
    qs = {"quant_type": "nf4", "blocksize": int(q.blocksize), "dtype": _dtype_name(q.dtype), "shape": list(q.shape)}
    p = prefix + "weight"
    sd = {p: q.packed, p + ".absmax": q.absmax, p + ".quant_map": q.code}
    if q.nested:
        sd[p + ".nested_absmax"] = q.nested_absmax
        sd[p + ".nested_quant_map"] = q.nested_code.clone()  # bitsandbytes un-shares it too (safetensors)
        qs.update(nested_blocksize=int(q.nested_blocksize), nested_dtype="float32",
                  nested_offset=float(q.nested_offset))
    # Same bytes as bitsandbytes.utils.pack_dict_to_tensor: default json.dumps, UTF-8, one uint8 per byte.
    sd[p + "." + _QS_PREFIX + "nf4"] = torch.tensor(list(json.dumps(qs).encode("utf-8")), dtype=torch.uint8)
    return sd


def is_bnb_nf4_key(key: str) -> bool:
    """True for a bitsandbytes 4-bit auxiliary key (statistics / quant state), i.e. anything but the packed weight."""
    return key.endswith(_AUX_SUFFIXES)


def _require(sd, key: str, weight_key: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"bitsandbytes NF4 weight {weight_key!r}: missing key {key!r}")
    return sd[key]


def _parse_quant_state(t: torch.Tensor, key: str) -> dict:
    try:
        qs = json.loads(bytes(t.detach().cpu().reshape(-1).to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QuantDataError(f"{key!r} is not valid bitsandbytes quant-state JSON: {e}") from None
    if not isinstance(qs, dict):
        raise QuantDataError(f"{key!r} must hold a JSON object, got {type(qs).__name__}")
    return qs


def _qs_field(qs: dict, name: str, kind, key: str):
    if name not in qs:
        raise QuantDataError(f"{key!r}: quant state has no {name!r} field")
    v = qs[name]
    ok = {int: isinstance(v, int) and not isinstance(v, bool) and v > 0,
          float: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
          str: isinstance(v, str),
          list: isinstance(v, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in v)}[kind]
    if not ok:
        raise QuantDataError(f"{key!r}: quant state field {name!r} has invalid value {v!r}")
    return v


def _torch_dtype(name: str, key: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise QuantDataError(f"{key!r}: unknown dtype {name!r} in quant state")
    return dtype


def _check_numel(t: torch.Tensor, expected: int, key: str, what: str):
    if t.numel() != expected:
        raise QuantDataError(f"{key!r} has {t.numel()} elements, expected {expected} ({what})")


def check_statistics(q: NF4Weight, weight_key: str) -> NF4Weight:
    """Reject block scales (absmax, after undoing double quantization) and code tables that are NaN / infinite,
    and a layer whose every scale is 0: each turns the whole layer into NaN or zeros. A negative scale flips its
    block's sign, which bitsandbytes never writes: warned, not rejected."""
    tables = {".quant_map": q.code, ".nested_absmax": q.nested_absmax, ".nested_quant_map": q.nested_code}
    for suffix, t in tables.items():
        if t is not None and not torch.isfinite(t.to(torch.float32)).all():
            raise QuantDataError(f"{weight_key + suffix!r} holds NaN or infinite values")
    absmax = _block_absmax(q, q.absmax.device)
    if not torch.isfinite(absmax).all():
        raise QuantDataError(f"{weight_key + '.absmax'!r} holds NaN or infinite block scales")
    if absmax.numel() and not absmax.any():
        raise QuantDataError(f"{weight_key + '.absmax'!r}: every block scale is 0 (the layer would be all zeros)")
    if (absmax < 0).any():
        log.warning(
            "Kontext LowVRAM: %s has negative NF4 block scales (bitsandbytes writes none); loaded as stored",
            weight_key)
    return q


def from_bnb_state_dict(sd: dict, weight_key: str) -> NF4Weight:
    """Gather the bitsandbytes NF4 entries of ``weight_key`` (e.g. "double_blocks.0.img_attn.qkv.weight") from a
    state dict (any mapping with ``in`` and ``[]``). Tensors stay on their device.

    Raises ValueError naming a missing key, UnsupportedQuantType (a ValueError) for FP4 or other quant types and
    QuantDataError (a ValueError) for corrupt quant state or sizes that do not fit the recorded shape.
    """
    qs_key = f"{weight_key}.{_QS_PREFIX}nf4"
    if qs_key not in sd:
        others = [f"{weight_key}.{_QS_PREFIX}{t}" for t in ("fp4",) if f"{weight_key}.{_QS_PREFIX}{t}" in sd]
        if others:
            raise UnsupportedQuantType(f"{weight_key!r} is bitsandbytes FP4 ({others[0]!r}); only NF4 is supported")
    qs = _parse_quant_state(_require(sd, qs_key, weight_key), qs_key)
    quant_type = qs.get("quant_type")
    if quant_type != "nf4":
        raise UnsupportedQuantType(f"{qs_key!r}: quant_type {quant_type!r} is not supported; only 'nf4' is")
    blocksize = _qs_field(qs, "blocksize", int, qs_key)
    shape = tuple(_qs_field(qs, "shape", list, qs_key))
    dtype = _torch_dtype(_qs_field(qs, "dtype", str, qs_key), qs_key)
    n = math.prod(shape)
    nblocks = -(-n // blocksize)

    packed = _require(sd, weight_key, weight_key)
    if packed.dtype != torch.uint8:  # quant_storage other than uint8: same bytes, other element type
        packed = packed.contiguous().view(torch.uint8)
    _check_numel(packed, (n + 1) // 2, weight_key, f"two 4-bit codes per byte for shape {list(shape)}")
    absmax = _require(sd, weight_key + ".absmax", weight_key)
    code = _require(sd, weight_key + ".quant_map", weight_key)
    _check_numel(absmax, nblocks, weight_key + ".absmax", f"one per {blocksize}-element block")
    _check_numel(code, 16, weight_key + ".quant_map", "the NF4 table")
    q = NF4Weight(packed=packed.reshape(-1, 1), absmax=absmax.reshape(-1), code=code.reshape(-1).to(torch.float32),
                  shape=shape, blocksize=blocksize, dtype=dtype)

    nested_key = weight_key + ".nested_absmax"
    if "nested_offset" not in qs and nested_key not in sd:
        if not absmax.is_floating_point():
            raise QuantDataError(f"{weight_key + '.absmax'!r} is {absmax.dtype} but the quant state has no nested "
                                 "(double quantization) fields")
        q.absmax = q.absmax.to(torch.float32)
        return check_statistics(q, weight_key)
    nested_absmax = _require(sd, nested_key, weight_key)
    nested_code = _require(sd, weight_key + ".nested_quant_map", weight_key)
    nested_blocksize = _qs_field(qs, "nested_blocksize", int, qs_key)
    nested_offset = _qs_field(qs, "nested_offset", float, qs_key)
    if absmax.dtype != torch.uint8:
        raise QuantDataError(f"{weight_key + '.absmax'!r} is {absmax.dtype}; double-quantized absmax must be uint8")
    _check_numel(nested_absmax, -(-nblocks // nested_blocksize), nested_key, f"one per {nested_blocksize} blocks")
    _check_numel(nested_code, 256, weight_key + ".nested_quant_map", "the 8-bit dynamic map")
    q.nested_absmax = nested_absmax.reshape(-1).to(torch.float32)
    q.nested_code = nested_code.reshape(-1).to(torch.float32)
    q.nested_offset = float(nested_offset)
    q.nested_blocksize = nested_blocksize
    return check_statistics(q, weight_key)
