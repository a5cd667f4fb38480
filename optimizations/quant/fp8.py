"""FP8 weights: plain float8 (e4m3fn / e5m2) and per-tensor scaled float8.

Dequantization is `data.to(dtype) * scale` computed in float32 (the scale is a float32 scalar), the same
arithmetic ComfyUI's scaled-fp8 ops use, so our output matches the host's own fp8 path.
"""
import torch

from .common import UnsupportedQuantType

FP8_DTYPES = {
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}


def fp8_dtype(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name in FP8_DTYPES.values():
            return name
        name = str(name).replace("torch.", "")
    try:
        return FP8_DTYPES[str(name).lower()]
    except KeyError:
        raise UnsupportedQuantType(
            f"unknown fp8 format {name!r}; supported: {', '.join(FP8_DTYPES)}") from None


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES.values()


def quantize_fp8(w: torch.Tensor, dtype=torch.float8_e4m3fn, scaled: bool = True):
    """Per-tensor absmax scaling: returns (data, scale) with `data.float() * scale ≈ w`.

    With scaled=False the values are cast directly (scale None), as in plain fp8 checkpoints.
    """
    dtype = fp8_dtype(dtype)
    w32 = w.float()
    finfo = torch.finfo(dtype)
    if not scaled:
        return w32.clamp(finfo.min, finfo.max).to(dtype), None
    amax = w32.abs().amax()
    # An all-zero tensor would give scale 0 and NaNs on the way back; any positive scale represents it exactly.
    scale = torch.where(amax > 0, amax / finfo.max, torch.ones_like(amax)).to(torch.float32)
    data = (w32 / scale).clamp(finfo.min, finfo.max).to(dtype)
    return data, scale


def dequantize_fp8(data: torch.Tensor, scale=None, dtype=torch.float32) -> torch.Tensor:
    out = data.to(torch.float32)
    if scale is not None:
        out = out * scale.to(device=out.device, dtype=torch.float32)
    return out.to(dtype)
