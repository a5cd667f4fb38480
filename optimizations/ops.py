"""Quantized Linear: raw storage stays resident, values are made just in time on the compute device.

Inside a model a quantized weight is a *plain* Parameter of raw storage (uint8 blocks or float8 values), so the
host moves, pins and offloads it like any other tensor. What it takes to read it (format, logical shape, meta)
lives on the module instance and small statistics (nf4 absmax/code, fp8 scale) are non-persistent buffers, so
one model's settings never leak into another's.

`QuantLinear` is the plain-PyTorch layer; host/ops.py builds ComfyUI's `custom_operations` around the same
functions.
"""
import torch

from .fp8_linear import fp8_linear, use_fp8_matmul
from .lora import apply_all, merge_all, split_low_rank, stacked_factors
from .qtensor import QTensor, QWeight
from .quant import dequantize_raw, triton_dequant, triton_lora, triton_matmul

RAW_DTYPES = (torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2)
FLOAT_GGUF_TYPES = ("F16", "BF16", "F32")  # "dequantized" by reinterpreting the stored bytes
AUX_PREFIX = "klv_aux_"


def adopt_quantized_weight(module: torch.nn.Module, qt: QTensor) -> None:
    """Install a QTensor into `module` as raw Parameter + per-instance format state."""
    module.weight = torch.nn.Parameter(qt.raw, requires_grad=False)
    module.klv_qformat = qt.qformat
    module.klv_qshape = qt.qshape
    module.klv_meta = dict(qt.meta)
    module.klv_aux_names = tuple(qt.aux)
    for name, t in qt.aux.items():
        module.register_buffer(AUX_PREFIX + name, t, persistent=False)


def is_quantized(module) -> bool:
    # After a LoRA merge the weight is dense (float); the host restoring its backup brings the raw storage back.
    return getattr(module, "klv_qformat", None) is not None and module.weight.dtype in RAW_DTYPES


def stores_floats(module) -> bool:
    """A float GGUF layer (F16/BF16/F32): its "dequantized" weight reinterprets the stored bytes."""
    return module.klv_qformat == "gguf" and module.klv_meta.get("qtype") in FLOAT_GGUF_TYPES


def aux_tensor(module, name):
    """The module's aux buffer `name` (e.g. the fp8 scale), or None when its format has none."""
    return getattr(module, AUX_PREFIX + name) if name in module.klv_aux_names else None


def _aux(module, device):
    return {n: getattr(module, AUX_PREFIX + n).to(device, non_blocking=True) for n in module.klv_aux_names}


def module_qweight(module, raw: torch.Tensor) -> QWeight:
    """The module's quantized weight as one value, over `raw` (its storage, already cast to the compute device)."""
    return QWeight(raw, module.klv_qformat, module.klv_qshape, module.klv_meta, _aux(module, raw.device))


def dequantize_module_weight(module, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_raw(module_qweight(module, raw), dtype)


def use_fused_small_matmul(module, raw: torch.Tensor, x: torch.Tensor) -> bool:
    """The one-kernel matmul from quantized bytes (triton_matmul): switched on, a few activation rows, a format
    it reads, and our Triton kernels able to run on this device."""
    return (triton_matmul.enabled() and triton_matmul.supports(module.klv_qformat, module.klv_meta,
                                                               module.klv_qshape, x)
            and triton_dequant.available(raw.device))


def fused_lora_weight(module, raw: torch.Tensor, low_rank, dtype: torch.dtype):
    """dequant(W) + Σ LoRA deltas in one kernel (triton_lora), or None where that path is off or cannot take it."""
    rank = sum(d.down.shape[0] for d in low_rank)
    if not (triton_lora.enabled() and triton_dequant.available(raw.device)
            and triton_lora.supports(module.klv_qformat, module.klv_meta, module.klv_qshape, dtype, rank)):
        return None
    factors = stacked_factors(low_rank, raw.device, dtype)  # None for output-slice (offset) LoRAs
    if factors is None:
        return None
    return triton_lora.dequantize_with_lora(module_qweight(module, raw), dtype, *factors)


def quantized_linear(module, x, raw, bias, weight_fns=(), fp8_matmul=True):
    """x @ W.T + b for a quantized module whose raw storage is already on x's device.

    e4m3 weights take a real fp8 matmul where the GPU has one (unless weight functions must see the dense
    weight); activations of a few rows may take the fused small-batch matmul (triton_matmul, opt-in); everything
    else is dequantized just in time. Low-rank LoRA deltas (see lora.py) are merged into that just-dequantized
    weight when the activation has more rows than the weight has columns (in the dequant kernel itself where
    triton_lora is switched on), else added to the output; several LoRAs on one layer take one pass together
    (lora.merge_all / apply_all). A core LoRA loader's per-forward patches count as such deltas when they are
    plain LoRAs (lora.host_patch_low_rank). The stored quantized weight is never changed.
    """
    low_rank, weight_fns = split_low_rank(weight_fns)
    if fp8_matmul and not weight_fns and module.klv_qformat == "fp8" and use_fp8_matmul(raw, x):
        out = fp8_linear(x, raw, aux_tensor(module, "scale"), bias)
    elif not weight_fns and use_fused_small_matmul(module, raw, x):
        out = triton_matmul.linear(x, module_qweight(module, raw), bias)
    else:
        rows = x.numel() // max(x.shape[-1], 1)
        # merging costs a pass over the weight, < a pass over the output
        merge = len(low_rank) > 0 and rows > module.klv_qshape[1]
        weight = fused_lora_weight(module, raw, low_rank, x.dtype) if merge and not weight_fns else None
        if weight is not None:
            low_rank = []
        else:
            weight = dequantize_module_weight(module, raw, x.dtype)
            for f in weight_fns:
                weight = f(weight)
            weight = weight.to(x.dtype)
            if merge:
                if stores_floats(module):
                    weight = weight.clone()  # may be a view of the stored weight: never change that in place
                merge_all(weight, low_rank)
                low_rank = []
        out = torch.nn.functional.linear(x, weight, bias)
    if low_rank:
        apply_all(x, out, low_rank)
    return out


class QuantLinear(torch.nn.Module):
    """Plain-PyTorch quantized linear: y = x @ dequant(W).T + b, dequantized on x's device in x's dtype."""

    def __init__(self, qweight: QTensor, bias: torch.Tensor | None = None, fp8_matmul: bool = False):
        super().__init__()
        adopt_quantized_weight(self, qweight)
        self.bias = torch.nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.out_features, self.in_features = qweight.qshape
        self.fp8_matmul = fp8_matmul
        self.weight_function = []  # e.g. LowRankDelta, as ComfyUI's weight wrappers

    def forward(self, x):
        b = self.bias.to(device=x.device, dtype=x.dtype) if self.bias is not None else None
        return quantized_linear(self, x, self.weight.to(x.device, non_blocking=True), b, self.weight_function,
                                self.fp8_matmul)
