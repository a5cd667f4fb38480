"""Every Triton kernel the pack ships compiles for NVIDIA GPUs, on a machine without one.

The interpreter tests (test_triton_dequant.py, test_triton_matmul.py) check what the kernels compute; they cannot
see what only the compiler does (types, layouts, unsupported ops, register pressure). Triton can compile to a
cubin for a stated GPU target without a driver (its wheel carries ptxas and libdevice), so CI compiles each kernel
with the tile configuration it ships for sm_80 (A100), sm_89 (Ada: fp8) and sm_90 (H100), and, where Triton's
cuobjdump is present, checks that no kernel spills more than a couple of registers to local memory (the untuned
first tiles of the matmul kernels spilled 128-424 bytes; a few bytes, as ptxas gives the nested-NF4 dequant with
fp32 output on sm_89, cost nothing measurable).

Every output dtype is compiled for sm_90; the other targets compile the bf16 variant (what models run), which keeps
this file to under two minutes on two cores.
"""
import inspect
import os
import subprocess
import tempfile

import pytest
import torch

from kontext_lowvram.optimizations.quant import gguf as gq
from kontext_lowvram.optimizations.quant import triton_dequant as td
from kontext_lowvram.optimizations.quant import triton_lora as tlr
from kontext_lowvram.optimizations.quant import triton_matmul as tm

triton = pytest.importorskip("triton", reason="needs the `triton` package (pip install triton); no GPU needed")
pytest.importorskip("triton.backends.nvidia", reason="this triton build has no NVIDIA backend")

ARCHS = [80, 89, 90]
MAX_SPILL = 16  # bytes
PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


def _compile(kernel, arg_types, constexprs, arch, num_warps):
    """Compile `kernel` (a JITFunction) for sm_`arch`: arg_types name the type of each non-constexpr argument,
    in order."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    names = [n for n in inspect.signature(kernel.fn).parameters if n not in constexprs]
    assert len(names) == len(arg_types), (names, arg_types)
    signature = dict(zip(names, arg_types))
    signature.update({n: "constexpr" for n in constexprs})
    try:
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    except TypeError:  # triton < 3.3 spells it `constants`
        src = ASTSource(fn=kernel, signature=signature, constants=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def _spilled_bytes(compiled):
    """Bytes of stack (register spills) the cubin's kernel uses, or None when cuobjdump is not available."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    for word in out.split():
        if word.startswith("STACK:"):
            return int(word[len("STACK:"):])
    return None


def _check(compiled):
    assert compiled.asm.get("cubin"), "no cubin produced"
    spilled = _spilled_bytes(compiled)
    assert spilled is None or spilled <= MAX_SPILL, f"kernel spills {spilled} bytes of registers to the stack"


def _dtypes(arch, dtypes):
    return dtypes if arch == 90 else [torch.bfloat16]


@pytest.fixture(scope="module")
def kernels():
    return td._kernels(interpret=False)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("qtype", sorted(gq.BLOCK_TYPES_BY_NAME))
def test_gguf_kernels_compile(kernels, qtype, arch):
    row = gq.BLOCK_TYPES_BY_NAME[qtype]
    layout = dict(QT=row.kernel, BLOCK=row.block, TS=row.type_size, S=row.sub, W=row.width)
    nb, warps = row.dequant_tile
    for dtype in _dtypes(arch, td.OUT_DTYPES):
        _check(_compile(kernels.dequant_gguf, ["*u8", PTR[dtype], "i32"], dict(layout, NB=nb, BF16_BITS=False),
                        arch, warps))
    bn, kb, warps = row.matmul_tile
    for dtype in _dtypes(arch, tm.DTYPES):
        _check(_compile(kernels.matmul_gguf, [PTR[dtype], "*u8", PTR[dtype], PTR[dtype], "i32", "i32", "i32", "i32"],
                        dict(layout, BN=bn, KB=kb, HAS_BIAS=True, BF16_BITS=False), arch, warps))
    bn, kb, warps = row.lora_tile
    for dtype in _dtypes(arch, (torch.bfloat16, torch.float32)):  # fp16 compiles as bf16 does
        for rc in ((16, 32) if arch == 90 and dtype == torch.bfloat16 else (32,)):  # ranks per dot (_rank_tile)
            _check(_compile(kernels.dequant_lora_gguf, ["*u8", PTR[dtype], PTR[dtype], PTR[dtype], "i32", "i32",
                                                        "i32", "i32"],
                            dict(layout, BN=bn, KB=kb, RC=rc, IEEE=dtype == torch.float32, BF16_BITS=False), arch,
                            warps))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_nf4_kernels_compile(kernels, nested, arch):
    absmax = "*u8" if nested else "*fp32"
    tile, warps = td.NF4_CONFIG[nested]
    for dtype in _dtypes(arch, td.OUT_DTYPES):
        _check(_compile(kernels.dequant_nf4, ["*u8", absmax, "*fp32", "*fp32", "*fp32", "fp32", PTR[dtype], "i32",
                                              "i32"],
                        dict(BS=64, NB=tile // 64, NESTED=nested, MUL_RN=True, BF16_BITS=False), arch, warps))
    bn, kb, warps = tm.NF4_MATMUL_CONFIG
    for dtype in _dtypes(arch, tm.DTYPES):
        _check(_compile(kernels.matmul_nf4, [PTR[dtype], "*u8", absmax, "*fp32", "*fp32", "*fp32", "fp32",
                                             PTR[dtype], PTR[dtype], "i32", "i32", "i32", "i32", "i32"],
                        dict(BS=64, BN=bn, KB=kb, NESTED=nested, MUL_RN=True, HAS_BIAS=True, BF16_BITS=False),
                        arch, warps))
    bn, kb, warps = tlr.NF4_LORA_CONFIG
    for dtype in _dtypes(arch, (torch.bfloat16, torch.float32)):
        _check(_compile(kernels.dequant_lora_nf4, ["*u8", absmax, "*fp32", "*fp32", "*fp32", "fp32", PTR[dtype],
                                                   PTR[dtype], PTR[dtype], "i32", "i32", "i32", "i32"],
                        dict(BS=64, BN=bn, KB=kb, RC=32, NESTED=nested, MUL_RN=True, IEEE=dtype == torch.float32,
                             BF16_BITS=False), arch, warps))


@pytest.mark.parametrize("arch", ARCHS)
def test_fp8_dequant_compiles(kernels, arch):
    block, warps = td.FP8_CONFIG
    for dtype in _dtypes(arch, td.OUT_DTYPES):
        for e5m2 in (False, True):
            _check(_compile(kernels.dequant_fp8, ["*u8", "*fp32", PTR[dtype], "i32"],
                            dict(BLOCK=block, E5M2=e5m2, HAS_SCALE=True, BF16_BITS=False), arch, warps))


@pytest.mark.parametrize("arch", ARCHS)
def test_fp8_small_matmul_compiles(kernels, arch):
    bn, bk, warps = tm.FP8_MATMUL_CONFIG
    for dtype in _dtypes(arch, tm.DTYPES):
        for e5m2 in (False, True):
            _check(_compile(kernels.matmul_fp8, [PTR[dtype], "*u8", "*fp32", PTR[dtype], PTR[dtype], "i32", "i32",
                                                 "i32", "i32"],
                            dict(BN=bn, BK=bk, E5M2=e5m2, HAS_SCALE=True, HAS_BIAS=True, BF16_BITS=False), arch,
                            warps))


@pytest.mark.parametrize("arch", [89, 90])
def test_fp8_activation_kernels_compile(arch, kernels):
    from kontext_lowvram.optimizations import fp8_triton
    for dtype in (torch.bfloat16, torch.float16):
        _check(_compile(kernels.act_amax, [PTR[dtype], "*fp32", "i32"], dict(BLOCK=fp8_triton.BLOCK), arch, 4))
        _check(_compile(kernels.act_quant_tensor, [PTR[dtype], "*fp8e4nv", "*fp32", "*fp32", "i32", "fp32"],
                        dict(BLOCK=fp8_triton.BLOCK, FP8_BITS=False), arch, 4))
    for cols in (3072, 15360, fp8_triton.WHOLE_ROW_MAX + 1):  # FLUX's linear inputs, and a row too long to hold
        block, whole, warps = fp8_triton.row_tile(cols)
        _check(_compile(kernels.act_quant_rows, [PTR[torch.bfloat16], "*fp8e4nv", "*fp32", "i32", "fp32"],
                        dict(BLOCK=block, WHOLE_ROW=whole, FP8_BITS=False), arch, warps))
