"""Triton kernels for per-tensor fp8 activation quantization (CUDA only; imported lazily; used where
`quant.triton_dequant.available` says our Triton kernels run).

Pass 1 reduces |x| to one float32 amax with an atomic max; pass 2 writes clamp(x / (amax / fmax)) in e4m3.
The values equal `fp8_linear.quantize_activation_eager` (same float32 division, same clamp).
"""
import functools


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def amax_kernel(x_ptr, amax_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        tl.atomic_max(amax_ptr, tl.max(tl.abs(x), axis=0))

    @triton.jit
    def quant_kernel(x_ptr, out_ptr, amax_ptr, scale_ptr, n, fmax, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        scale = tl.maximum(tl.load(amax_ptr) / fmax, 1e-12)
        if pid == 0:
            tl.store(scale_ptr, scale)
        x = tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        q = tl.clamp(x / scale, -fmax, fmax)
        tl.store(out_ptr + offs, q.to(out_ptr.dtype.element_ty), mask=offs < n)

    return triton, amax_kernel, quant_kernel


def quantize_per_tensor(x2, fmax: float):
    import torch
    triton, amax_kernel, quant_kernel = _kernels()
    n = x2.numel()
    amax = torch.zeros((), device=x2.device, dtype=torch.float32)
    scale = torch.empty((), device=x2.device, dtype=torch.float32)
    out = torch.empty(x2.shape, device=x2.device, dtype=torch.float8_e4m3fn)
    block = 4096
    grid = (triton.cdiv(n, block),)
    amax_kernel[grid](x2, amax, n, BLOCK=block)
    quant_kernel[grid](x2, out, amax, scale, n, fmax, BLOCK=block)
    return out, scale
