"""Plain PyTorch, no ComfyUI: dequantization, the quantized linear with its LoRA deltas and fp8 matmul, attention
backends, tiling and the conditioning cache."""
import torch

from .qtensor import QTensor, QWeight
from .quant import dequantize_raw


def dequantize(t: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Values of any state-dict entry a loader returns: QTensor (any format) or a plain tensor."""
    if isinstance(t, QTensor):
        return dequantize_raw(t.qweight, dtype)
    return t.to(dtype)


def quantize(t: torch.Tensor, fmt: str) -> QTensor:
    """Quantize a float tensor to `fmt`: "fp8_e4m3fn_scaled", "fp8_e5m2_scaled", "fp8_e4m3fn", "nf4", or a GGUF
    type name (case-insensitive): "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K"
    (llama.cpp's own encoders, quant.gguf_quantize) or "F32"/"F16"/"BF16" (see quant.gguf.QUANTIZABLE_TYPES)."""
    fmt_l = fmt.lower()
    if fmt_l.startswith("fp8_"):
        from .quant.fp8 import quantize_fp8
        scaled = fmt_l.endswith("_scaled")
        data, scale = quantize_fp8(t, "float8_" + fmt_l[4:].replace("_scaled", ""), scaled=scaled)
        return QTensor(data, qformat="fp8", shape=t.shape, aux={"scale": scale} if scaled else {})
    if fmt_l == "nf4":
        from .quant import nf4, nf4_parts_from_weight
        raw, meta, aux = nf4_parts_from_weight(nf4.quantize_nf4(t))
        return QTensor(raw, qformat="nf4", shape=t.shape, meta=meta, aux=aux)
    try:
        from .quant import gguf
    except ImportError:
        raise ImportError(f"quantizing to the GGUF type {fmt!r} needs the 'gguf' Python package: pip install gguf "
                          "(into the Python that runs ComfyUI)") from None
    qtype = gguf.qtype_of(fmt)
    return QTensor(gguf.quantize(t, qtype), qformat="gguf", shape=t.shape, meta={"qtype": qtype.name})


__all__ = ["QTensor", "QWeight", "dequantize", "quantize", "dequantize_raw"]
