"""Launchers for the fp8 activation-quantization kernels (device code in quant/triton_kernels.py; used where
`quant.triton_dequant.available` says our Triton kernels run, and by the tests through the interpreter on CPU).

Per tensor: pass 1 reduces |x| to one float32 amax with an atomic max; pass 2 writes clamp(x / (amax / fmax)).
Per row: one program per row loads the row once, finds its amax and quantizes it, so HBM sees the activation once
(the per-tensor scale needs the whole tensor read before the first value can be quantized, hence its two passes).
Both give the values `fp8_linear.quantize_activation_eager` gives.
"""
import torch

from .quant import triton_dequant as td

BLOCK = 4096      # elements per program, per-tensor kernels
# per-row kernel: rows of up to WHOLE_ROW_MAX elements (every FLUX linear input: 3072, 12288, 15360) are held in
# registers, 32 values per thread; longer rows are swept twice in steps of ROW_BLOCK
WHOLE_ROW_MAX = 16384
ROW_BLOCK = 2048


def _kernels(x):
    interpret = x.device.type != "cuda"
    return td._kernels(interpret), interpret


def _bytes(out, interpret):
    """The interpreter writes e4m3 bytes itself (triton_kernels._e4m3_bits); the GPU converts in hardware."""
    return out.view(torch.uint8) if interpret else out


def _per_tensor_impl(x2: torch.Tensor, fmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    k, interpret = _kernels(x2)
    n = x2.numel()
    amax = torch.zeros((), device=x2.device, dtype=torch.float32)
    scale = torch.empty((), device=x2.device, dtype=torch.float32)
    out = torch.empty(x2.shape, device=x2.device, dtype=torch.float8_e4m3fn)
    grid = (max(1, td.triton_cdiv(n, BLOCK)),)
    td._launch(k.act_amax, interpret, grid, x2, amax, n, BLOCK=BLOCK)
    td._launch(k.act_quant_tensor, interpret, grid, x2, _bytes(out, interpret), amax, scale, n, fmax, BLOCK=BLOCK,
               FP8_BITS=interpret)
    return out, scale


def row_tile(cols: int):
    """(BLOCK, WHOLE_ROW, num_warps) of the per-row kernel for rows of `cols` elements."""
    if cols <= WHOLE_ROW_MAX:
        block = max(1024, 1 << (cols - 1).bit_length())
        return block, True, max(1, block // 1024)
    return ROW_BLOCK, False, 4


def _per_row_impl(x2: torch.Tensor, fmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    k, interpret = _kernels(x2)
    rows, cols = x2.shape
    scale = torch.empty((rows, 1), device=x2.device, dtype=torch.float32)
    out = torch.empty(x2.shape, device=x2.device, dtype=torch.float8_e4m3fn)
    if rows:
        block, whole, warps = row_tile(cols)
        td._launch(k.act_quant_rows, interpret, (rows,), x2, _bytes(out, interpret), scale, cols, fmax,
                   BLOCK=block, WHOLE_ROW=whole, FP8_BITS=interpret, num_warps=warps)
    return out, scale


# custom ops (torch.compile records one op each; see triton_dequant.register_op)
_per_tensor_op = td.register_op("fp8_act_quant_tensor", _per_tensor_impl)
_per_row_op = td.register_op("fp8_act_quant_rows", _per_row_impl)


def quantize_per_tensor(x2: torch.Tensor, fmax: float):
    """(x2 / scale in e4m3, float32 scale of shape ()), scale = max(amax / fmax, 1e-12). x2 contiguous."""
    return _per_tensor_op(x2, fmax)


def quantize_per_row(x2: torch.Tensor, fmax: float):
    """(x2 / scale in e4m3, float32 scales of shape (rows, 1)), one scale per row. x2 2-D and contiguous."""
    return _per_row_op(x2, fmax)
