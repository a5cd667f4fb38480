"""Launchers for the fp8 activation-quantization kernels (device code in quant/triton_kernels.py; used where
`quant.triton_dequant.available` says our Triton kernels run, and by the tests through the interpreter on CPU).

Per tensor: pass 1 reduces |x| to one float32 amax with an atomic max; pass 2 writes clamp(x / (amax / fmax)).
Per row: one program per row finds the row's amax and quantizes it, so HBM sees the activation once (the per-tensor
scale needs the whole tensor read before the first value can be quantized, hence its two passes).
Both give the values `fp8_linear.quantize_activation_eager` / `quantize_activation_rows_eager` give.
"""
import torch

BLOCK = 4096      # elements per program, per-tensor kernels
ROW_BLOCK = 2048  # elements per step along a row, per-row kernel


def _kernels(x):
    from .quant import triton_dequant as td
    interpret = x.device.type != "cuda"
    return td, td._kernels(interpret), interpret


def _bytes(out, interpret):
    """The interpreter writes e4m3 bytes itself (triton_kernels._e4m3_bits); the GPU converts in hardware."""
    return out.view(torch.uint8) if interpret else out


def quantize_per_tensor(x2: torch.Tensor, fmax: float, dtype=torch.float8_e4m3fn):
    """(x2 / scale in `dtype`, float32 scale of shape ()), scale = max(amax / fmax, 1e-12). x2 contiguous."""
    td, k, interpret = _kernels(x2)
    n = x2.numel()
    amax = torch.zeros((), device=x2.device, dtype=torch.float32)
    scale = torch.empty((), device=x2.device, dtype=torch.float32)
    out = torch.empty(x2.shape, device=x2.device, dtype=dtype)
    grid = (max(1, -(-n // BLOCK)),)
    td._launch(k.act_amax, interpret, grid, x2, amax, n, BLOCK=BLOCK)
    td._launch(k.act_quant_tensor, interpret, grid, x2, _bytes(out, interpret), amax, scale, n, fmax, BLOCK=BLOCK,
               FP8_BITS=interpret)
    return out, scale


def quantize_per_row(x2: torch.Tensor, fmax: float, dtype=torch.float8_e4m3fn):
    """(x2 / scale in `dtype`, float32 scales of shape (rows, 1)), one scale per row. x2 2-D and contiguous."""
    td, k, interpret = _kernels(x2)
    rows, cols = x2.shape
    scale = torch.empty((rows, 1), device=x2.device, dtype=torch.float32)
    out = torch.empty(x2.shape, device=x2.device, dtype=dtype)
    if rows:
        td._launch(k.act_quant_rows, interpret, (rows,), x2, _bytes(out, interpret), scale, cols, fmax,
                   BLOCK=ROW_BLOCK, FP8_BITS=interpret, num_warps=4)
    return out, scale
