"""Real FP8 matmul for e4m3 weights: `torch._scaled_mm` with a per-tensor, per-call activation scale.

The activation is quantized with scale = amax(|x|) / 448 (dynamic, so large FLUX activations never saturate),
the weight keeps its own per-tensor scale, and the product is written in the activation's dtype. On CUDA the
amax and the quantization run as two Triton kernels (two passes over the activation instead of the five or six
eager kernels `abs/amax/div/clamp/to` take); without Triton the eager path computes the same values.

`use_fp8_matmul` says when the fast path applies: an e4m3 weight, a GPU of compute capability >= 8.9 (Ada,
Hopper, Blackwell; the CPU has `_scaled_mm` too, which the tests use through `fp8_linear`, but it is no faster
there than upcasting, so the CPU never takes this path), dims that `_scaled_mm` accepts (K, N multiples of 16)
and at least MIN_ROWS rows. The single-row modulation linears take the one-kernel fp8 dequantization (or the
opt-in fused small-batch matmul) instead; whether `_scaled_mm` would beat those at 1-4 rows is not measured yet
(tests/gpu/kernel_check.py times it).
"""
import os

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max
MIN_ROWS = 16


def fp8_matmul_supported(device: torch.device) -> bool:
    if device.type != "cuda" or os.environ.get("KLV_NO_FP8_MATMUL") == "1":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def use_fp8_matmul(weight: torch.Tensor, x: torch.Tensor) -> bool:
    out_f, in_f = weight.shape
    rows = x.numel() // max(x.shape[-1], 1)
    return (weight.dtype == E4M3 and x.dtype in (torch.bfloat16, torch.float16) and rows >= MIN_ROWS
            and in_f % 16 == 0 and out_f % 16 == 0 and fp8_matmul_supported(x.device))


def quantize_activation_eager(x2: torch.Tensor):
    amax = x2.abs().amax().float()
    scale = torch.clamp(amax / E4M3_MAX, min=1e-12)
    xq = (x2.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return xq, scale


def quantize_activation(x2: torch.Tensor):
    """(x2 / scale) in e4m3 and the float32 scale, scale = amax / 448."""
    from .quant import triton_dequant
    if triton_dequant.available(x2.device):  # the one rule for our Triton kernels (CUDA, triton, KLV_NO_TRITON)
        from . import fp8_triton
        return fp8_triton.quantize_per_tensor(x2, E4M3_MAX)
    return quantize_activation_eager(x2)


def fp8_linear(x: torch.Tensor, weight_fp8: torch.Tensor, weight_scale, bias=None) -> torch.Tensor:
    """y = x @ (weight_fp8 * weight_scale).T + bias with an fp8 x fp8 tensor-core matmul."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    xq, x_scale = quantize_activation(x2)
    w_scale = (weight_scale if weight_scale is not None else torch.ones((), device=x.device)).to(
        device=x.device, dtype=torch.float32).reshape(())
    if bias is not None:
        bias = bias.to(device=x.device, dtype=x.dtype)
    out = torch._scaled_mm(xq, weight_fp8.t(), scale_a=x_scale.reshape(()), scale_b=w_scale, bias=bias,
                           out_dtype=x.dtype)
    return out.reshape(*shape[:-1], weight_fp8.shape[0])
