"""Real FP8 matmul for e4m3 weights: `torch._scaled_mm` with a dynamic, per-call activation scale.

The activation is quantized with scale = amax(|x|) / 448 (dynamic, so large FLUX activations never saturate),
the weight keeps its own per-tensor scale, and the product is written in the activation's dtype. On CUDA the
amax and the quantization run as Triton kernels (fp8_triton; instead of the five or six eager kernels
`abs/amax/div/clamp/to` take); without Triton the eager path computes the same values.

Two activation scalings (ComfyUI core's native fp8 instead uses a fixed scale, 1.0 unless the checkpoint stores
an input scale, so activations beyond +-448 clamp):
- per tensor (default): one scale; needs two passes over the activation (the amax before the first value).
- per row (opt-in, KLV_FP8_ROWWISE=1, bf16 activations): one scale per token, `_scaled_mm`'s row-wise mode. One
  pass over the activation, and never coarser than the per-tensor scale. Whether torch's row-wise GEMM keeps up
  with the per-tensor one is what tests/gpu/kernel_check.py measures before it can become the default.

`use_fp8_matmul` says when the fast path applies: an e4m3 weight, a GPU of compute capability >= 8.9 (Ada,
Hopper, Blackwell; the CPU has `_scaled_mm` too, which the tests use through `fp8_linear`, but it is no faster
there than upcasting, so the CPU never takes this path), dims that `_scaled_mm` accepts (K, N multiples of 16)
and at least MIN_ROWS rows. The single-row modulation linears take the one-kernel fp8 dequantization (or the
opt-in fused small-batch matmul) instead; whether `_scaled_mm` would beat those at 1-4 rows is not measured yet
(tests/gpu/kernel_check.py times it).
"""

import torch

from .settings import switch
from . import fp8_triton  # registers its custom ops at import, not inside a torch.compile trace
from .quant import triton_dequant

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max
MIN_ROWS = 16
ENV_ROWWISE = "KLV_FP8_ROWWISE"
ENV_NO_FP8_MATMUL = "KLV_NO_FP8_MATMUL"


def fp8_matmul_supported(device: torch.device) -> bool:
    if device.type != "cuda" or switch(ENV_NO_FP8_MATMUL):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def use_fp8_matmul(weight: torch.Tensor, x: torch.Tensor) -> bool:
    out_f, in_f = weight.shape
    rows = x.numel() // max(x.shape[-1], 1)
    return (weight.dtype == E4M3 and x.dtype in (torch.bfloat16, torch.float16) and rows >= MIN_ROWS
            and in_f % 16 == 0 and out_f % 16 == 0 and fp8_matmul_supported(x.device))


def quantize_activation_eager(x2: torch.Tensor, rowwise: bool = False):
    """The torch reference of the fp8_triton kernels: one scale for x2, or (rowwise) one per row."""
    amax = (x2.abs().amax(dim=1, keepdim=True) if rowwise else x2.abs().amax()).float()
    scale = torch.clamp(amax / E4M3_MAX, min=1e-12)
    xq = (x2.float() * (1.0 / scale)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)  # as the kernels: times the reciprocal
    return xq, scale


def quantize_activation(x2: torch.Tensor, rowwise: bool = False):
    """(x2 / scale) in e4m3 and the float32 scale, scale = amax / 448: shape () per tensor, (rows, 1) per row."""
    if triton_dequant.available(x2.device):  # the one rule for our Triton kernels (CUDA, triton, KLV_NO_TRITON)
        return (fp8_triton.quantize_per_row if rowwise else fp8_triton.quantize_per_tensor)(x2, E4M3_MAX)
    return quantize_activation_eager(x2, rowwise)


def rowwise_enabled(x: torch.Tensor) -> bool:
    """Per-row activation scales: asked for with KLV_FP8_ROWWISE=1, and only for bf16 activations (the row-wise
    `_scaled_mm` writes bf16 only)."""
    return x.dtype == torch.bfloat16 and switch(ENV_ROWWISE)


def fp8_linear(x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale, bias=None, rowwise=None) -> torch.Tensor:
    """y = x @ (weight_fp8 * weight_scale).T + bias with an fp8 x fp8 tensor-core matmul; `rowwise` None follows
    `rowwise_enabled`."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    rowwise = rowwise_enabled(x) if rowwise is None else rowwise
    xq, x_scale = quantize_activation(x2, rowwise)
    w_scale = (weight_scale if weight_scale is not None else torch.ones((), device=x.device)).to(
        device=x.device, dtype=torch.float32).reshape(())
    if rowwise:  # the row-wise mode takes the weight's scale per output column
        w_scale = w_scale.expand(1, weight_fp8.shape[0]).contiguous()
    else:
        x_scale = x_scale.reshape(())
    if bias is not None:
        bias = bias.to(device=x.device, dtype=x.dtype)
    out = torch._scaled_mm(xq, weight_fp8.t(), scale_a=x_scale, scale_b=w_scale, bias=bias, out_dtype=x.dtype)
    return out.reshape(*shape[:-1], weight_fp8.shape[0])
