"""GPU check for the fused Triton dequant kernels (run by hand on a CUDA machine; not collected by pytest).

For every Triton-backed format (GGUF Q8_0/Q4_0/Q4_K/Q5_K/Q6_K/Q3_K/Q4_1/Q5_0/Q5_1/Q2_K/IQ4_NL/IQ4_XS, NF4 plain and
double-quantized, scaled fp8) at the FLUX.1
linear shapes it checks that the Triton result equals the torch reference exactly (bf16, fp16, fp32 outputs),
times both (triton.testing.do_bench, bf16 output) and prints a markdown table with the bandwidth reached
(raw bytes read + output bytes written, per second). Then it checks that torch.compile(fullgraph=True) of
dequant + matmul goes through `dequantize_raw` without a graph break and matches eager, and counts the kernels one
weight costs on each path. Last, the fused small-batch matmul (triton_matmul, 1 and 4 activation rows): error vs
an fp64 matmul, and time against dequantize + F.linear (our default path) and a dense bf16 F.linear (core bf16);
and the one-pass LoRA merge (triton_lora, rank 32) against dequantize + addmm; on fp8 GPUs the fp8 linear at the
Kontext token count with per-tensor vs per-row activation scales (fp8_linear). Everything goes to stdout; about
a minute on an H100.

  python tests/gpu/kernel_check.py               # exactness + timings + torch.compile
  python tests/gpu/kernel_check.py --sweep       # also time other tile sizes (blocks per program x warps)
  python tests/gpu/kernel_check.py --quick       # two shapes only
"""
import argparse
import math
import os
import sys
import time

import torch

# Run from a checkout without installing: the repository root is the package `kontext_lowvram`.
try:
    import kontext_lowvram  # noqa: F401
except ImportError:
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("kontext_lowvram", os.path.join(root, "__init__.py"),
                                                  submodule_search_locations=[root])
    module = importlib.util.module_from_spec(spec)
    sys.modules["kontext_lowvram"] = module
    spec.loader.exec_module(module)

from kontext_lowvram.optimizations.quant import dequantize_raw, nf4_parts_from_weight  # noqa: E402
from kontext_lowvram.optimizations.qtensor import QWeight  # noqa: E402
from kontext_lowvram.optimizations.quant import gguf as gq  # noqa: E402
from kontext_lowvram.optimizations.quant import nf4 as nf4q  # noqa: E402
from kontext_lowvram.optimizations.quant import triton_dequant as td  # noqa: E402
from kontext_lowvram.optimizations.quant import triton_lora as tlr  # noqa: E402
from kontext_lowvram.optimizations.quant import triton_matmul as tm  # noqa: E402

# Every distinct Linear weight shape (out, in) of FLUX.1 dev/schnell/Kontext (hidden 3072, MLP 12288).
FLUX_SHAPES = [
    (3072, 3072),    # double blocks: img/txt_attn.proj
    (9216, 3072),    # double blocks: img/txt_attn.qkv; single blocks: modulation.lin
    (12288, 3072),   # double blocks: img/txt_mlp.0
    (3072, 12288),   # double blocks: img/txt_mlp.2
    (18432, 3072),   # double blocks: img/txt_mod.lin
    (21504, 3072),   # single blocks: linear1 (qkv + mlp in)
    (3072, 15360),   # single blocks: linear2 (attn + mlp out)
]
FORMATS = ["Q8_0", "Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "IQ4_NL", "IQ4_XS", "nf4",
           "nf4-nested", "fp8"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def gguf_blocks(qtype, shape, seed, device):
    """Random valid blocks made on the GPU: random bytes, every fp16 scale field a random finite value."""
    block, type_size = gq.GGML_QUANT_SIZES[gq.qtype_of(qtype)]
    n = math.prod(shape) // block
    g = torch.Generator(device=device).manual_seed(seed)
    blocks = torch.randint(0, 256, (n, type_size), dtype=torch.uint8, device=device, generator=g)
    for off in gq.FP16_FIELDS[gq.qtype_of(qtype)]:
        d = (torch.randn(n, device=device, generator=g) * 1e-3).to(torch.float16)
        blocks[:, off:off + 2] = d.view(torch.uint8).view(n, 2)
    return blocks.view(shape[0], -1)


def make(fmt, shape, seed, device):
    """(raw, meta, aux, raw bytes incl. statistics) for dequantize_raw."""
    if fmt == "fp8":
        from kontext_lowvram.optimizations.quant.fp8 import quantize_fp8
        g = torch.Generator(device=device).manual_seed(seed)
        data, scale = quantize_fp8(torch.randn(shape, device=device, generator=g) * 0.02)
        return data, {}, {"scale": scale}, data.numel()
    if fmt.startswith("nf4"):
        g = torch.Generator(device=device).manual_seed(seed)
        w = torch.randn(shape, device=device, generator=g) * 0.02
        q = nf4q.quantize_nf4(w, blocksize=64, double_quant=fmt == "nf4-nested")
        raw, meta, aux = nf4_parts_from_weight(q)
        return raw, meta, aux, q.nbytes()
    raw = gguf_blocks(fmt, shape, seed, device)
    return raw, {"qtype": fmt}, {}, raw.numel()


def reference(fmt, raw, meta, aux, shape, dtype):
    if fmt == "fp8":  # the torch code itself (dequantize_raw would pick the kernel on CUDA)
        from kontext_lowvram.optimizations.quant.fp8 import dequantize_fp8
        return dequantize_fp8(raw, aux["scale"], dtype)
    if fmt.startswith("nf4"):
        from kontext_lowvram.optimizations.quant import nf4_weight_from_parts
        return nf4q.dequantize_nf4(nf4_weight_from_parts(QWeight(raw, "nf4", shape, meta, aux)), dtype=dtype, device=raw.device)
    return gq.dequantize(raw, meta["qtype"], shape, dtype)


def fused(fmt, raw, meta, aux, shape, dtype):
    if fmt == "fp8":
        return td.dequantize_fp8(raw, aux["scale"], dtype)
    if fmt.startswith("nf4"):
        from kontext_lowvram.optimizations.quant import nf4_weight_from_parts
        return td.dequantize_nf4(nf4_weight_from_parts(QWeight(raw, "nf4", shape, meta, aux)), dtype=dtype, device=raw.device)
    return td.dequantize_gguf(raw, meta["qtype"], shape, dtype)


def bench(fn):
    if SMOKE:  # one call, wall clock: the numbers mean nothing, the code path is what runs
        t0 = time.perf_counter()
        fn()
        return max(time.perf_counter() - t0, 1e-9)
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100) * 1e-3  # seconds


SMOKE = False  # --cpu-smoke: every check on tiny shapes on the CPU (kernels in Triton's interpreter)


def check_and_time(shapes, device):
    print("\n## Exactness (torch.equal vs the torch reference) and speed, bf16 output\n")
    print("| format | shape | exact bf16/fp16/fp32 | torch µs | Triton µs | speed-up | Triton GB/s | bytes/elem in |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    all_exact = True
    summary = {}
    for fmt in FORMATS:
        for i, shape in enumerate(shapes):
            raw, meta, aux, nbytes = make(fmt, shape, seed=i, device=device)
            exact = []
            for dtype in DTYPES:
                a = fused(fmt, raw, meta, aux, shape, dtype)
                b = reference(fmt, raw, meta, aux, shape, dtype)
                ok = torch.equal(a, b)
                if not ok:
                    bad = (a != b).sum().item()
                    diff = (a.float() - b.float()).abs().max().item()
                    print(f"MISMATCH {fmt} {shape} {dtype}: {bad} elements differ, max |diff| {diff}")
                exact.append("✓" if ok else "✗")
                all_exact &= ok
                del a, b
            t_ref = bench(lambda: reference(fmt, raw, meta, aux, shape, torch.bfloat16))
            t_tri = bench(lambda: fused(fmt, raw, meta, aux, shape, torch.bfloat16))
            moved = nbytes + math.prod(shape) * 2
            gbs = moved / t_tri / 1e9
            summary.setdefault(fmt, []).append(gbs)
            print(f"| {fmt} | {shape[0]}x{shape[1]} | {'/'.join(exact)} | {t_ref * 1e6:.0f} | {t_tri * 1e6:.1f} | "
                  f"{t_ref / t_tri:.1f}x | {gbs:.0f} | {nbytes / math.prod(shape):.3f} |", flush=True)
            del raw, aux
    # the bandwidth to compare with: a plain device-to-device copy of a bf16 weight of the biggest shape
    x = torch.empty(max(shapes, key=math.prod), dtype=torch.bfloat16, device=device)
    t_copy = bench(lambda: x.clone())
    print(f"\nreference: bf16 clone of {tuple(x.shape)} moves {2 * x.numel() * 2 / t_copy / 1e9:.0f} GB/s "
          f"(read + write)")
    print("mean Triton GB/s per format: " + ", ".join(f"{k} {sum(v) / len(v):.0f}" for k, v in summary.items()))
    print(f"\nALL EXACT: {all_exact}")
    return all_exact


def sweep(device, shape=(3072, 12288)):
    """Time other tile sizes for each kernel (the defaults live in the gguf.BLOCK_TYPES rows / td.NF4_CONFIG)."""
    print(f"\n## Tile sweep at {shape[0]}x{shape[1]}, bf16 output (µs)\n")
    saved = {name: row for name, row in gq.BLOCK_TYPES_BY_NAME.items()}, dict(td.NF4_CONFIG)
    try:
        for fmt in FORMATS:
            if fmt == "fp8":  # an elementwise kernel: nothing to sweep
                continue
            raw, meta, aux, _ = make(fmt, shape, seed=0, device=device)
            ref = reference(fmt, raw, meta, aux, shape, torch.bfloat16)
            if fmt.startswith("nf4"):
                options = [(tile, w) for tile in (512, 1024, 2048, 4096, 8192) for w in (2, 4, 8)]
            else:
                block = gq.BLOCK_TYPES_BY_NAME[fmt].block
                nbs = (16, 32, 64, 128, 256) if block == 32 else (1, 2, 4, 8, 16, 32)
                options = [(nb, w) for nb in nbs for w in (2, 4, 8)]
            row = []
            for nb, w in options:
                if fmt.startswith("nf4"):
                    td.NF4_CONFIG[fmt == "nf4-nested"] = (nb, w)
                else:
                    gq.retune(fmt, dequant_tile=(nb, w))
                out = fused(fmt, raw, meta, aux, shape, torch.bfloat16)
                assert torch.equal(out, ref), (fmt, nb, w)
                row.append((bench(lambda: fused(fmt, raw, meta, aux, shape, torch.bfloat16)) * 1e6, nb, w))
            row.sort()
            print(f"{fmt}: best " + ", ".join(f"{what}={nb} warps={w}: {t:.1f}"
                                              for t, nb, w in row[:4]
                                              for what in ["tile" if fmt.startswith("nf4") else "NB"]) +
                  f" | worst {row[-1][0]:.1f}", flush=True)
            for row in saved[0].values():
                gq.restore(row)
            td.NF4_CONFIG.update(saved[1])
    finally:
        for row in saved[0].values():
            gq.restore(row)
        td.NF4_CONFIG.update(saved[1])


def kernel_counts(device, shape=(3072, 3072)):
    """CUDA kernels launched by one dequantization on each path (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile
    print("\n## Kernels per weight (one dequantization to bf16)\n")
    print("| format | torch path | Triton path |")
    print("|---|---:|---:|")
    for fmt in FORMATS:
        raw, meta, aux, _ = make(fmt, shape, seed=0, device=device)
        counts = []
        for fn in (reference, fused):
            fn(fmt, raw, meta, aux, shape, torch.bfloat16)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn(fmt, raw, meta, aux, shape, torch.bfloat16)
                torch.cuda.synchronize()
            counts.append(sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA))
        print(f"| {fmt} | {counts[0]} | {counts[1]} |")


def compile_check(device):
    """dequantize_raw + matmul under torch.compile(fullgraph=True): no graph break, same result as eager."""
    print("\n## torch.compile\n")
    ok = True
    shape = (3072, 3072)
    x = torch.randn(256, shape[1], device=device, dtype=torch.bfloat16)
    for fmt in ("Q4_K", "Q8_0", "nf4", "nf4-nested", "fp8"):
        raw, meta, aux, _ = make(fmt, shape, seed=0, device=device)
        qformat = qformat_of(fmt)

        def f(x, raw, aux):
            w = dequantize_raw(QWeight(raw, qformat, shape, meta, aux), x.dtype)
            return torch.nn.functional.linear(x, w)

        torch._dynamo.reset()
        try:
            ok &= _compile_one(fmt, f, x, raw, meta, aux, shape, qformat)
        except Exception as e:  # report and go on with the next format
            ok = False
            print(f"- {fmt}: FAILED {type(e).__name__}: " + " | ".join(str(e).strip().splitlines()[:6]))
    ok &= compile_fused(device, shape)
    if torch.cuda.get_device_capability(device) >= (8, 9):
        ok &= compile_fp8_linear(device, shape)
    print(f"\nCOMPILE OK: {ok}")
    return ok


def compile_fused(device, shape):
    """The opt-in fused kernels (1-row matmul, LoRA merged in the dequant) under Inductor: one graph, same result."""
    ok = True
    for fmt in ("Q4_K", "nf4", "fp8"):
        raw, meta, aux, _ = make(fmt, shape, seed=1, device=device)
        q = qformat_of(fmt)
        x = torch.randn(1, shape[1], device=device, dtype=torch.bfloat16)
        up = torch.randn(shape[0], 32, device=device, dtype=torch.bfloat16) * 0.02
        down = torch.randn(32, shape[1], device=device, dtype=torch.bfloat16) * 0.02
        cases = [("fused 1-row matmul", lambda x, raw, aux: tm.linear(x, QWeight(raw, q, shape, meta, aux)))]
        if fmt != "fp8":
            cases.append(("LoRA merged in dequant", lambda x, raw, aux: torch.nn.functional.linear(
                x, tlr.dequantize_with_lora(QWeight(raw, q, shape, meta, aux), x.dtype, up, down))))
        for name, f in cases:
            torch._dynamo.reset()
            try:
                explain = torch._dynamo.explain(f)(x, raw, aux)
                eager = f(x, raw, aux).float()
                diff = (torch.compile(f, fullgraph=True)(x, raw, aux).float() - eager).abs().max()
                # Inductor may pick another GEMM for the linear: equal up to bf16 rounding
                good = explain.graph_break_count == 0 and diff.item() <= 1e-2 * eager.abs().max().item()
                print(f"- {fmt} {name}: graph breaks {explain.graph_break_count}, |compiled - eager| {diff.item():.3g}")
            except Exception as e:
                good = False
                print(f"- {fmt} {name}: FAILED {type(e).__name__}: " + " | ".join(str(e).strip().splitlines()[:4]))
            ok &= good
    return ok


def compile_fp8_linear(device, shape, rows=256):
    """fp8_linear (Triton activation quantization + _scaled_mm), per tensor and per row, under Inductor."""
    from kontext_lowvram.optimizations import fp8_linear as fl
    from kontext_lowvram.optimizations.quant.fp8 import quantize_fp8
    ok = True
    w, w_scale = quantize_fp8(torch.randn(shape, device=device) * 0.02)
    x = torch.randn(rows, shape[1], device=device, dtype=torch.bfloat16)
    for rowwise in (False, True):
        def f(x, w, w_scale):
            return fl.fp8_linear(x, w, w_scale, rowwise=rowwise)
        torch._dynamo.reset()
        try:
            explain = torch._dynamo.explain(f)(x, w, w_scale)
            eager = f(x, w, w_scale).float()
            diff = (torch.compile(f, fullgraph=True)(x, w, w_scale).float() - eager).abs().max().item()
            good = explain.graph_break_count == 0 and diff <= 1e-2 * eager.abs().max().item()
            print(f"- fp8 linear ({'per row' if rowwise else 'per tensor'}): graph breaks "
                  f"{explain.graph_break_count}, |compiled - eager| {diff:.3g}")
        except Exception as e:
            good = False
            print(f"- fp8 linear ({'per row' if rowwise else 'per tensor'}): FAILED {type(e).__name__}: " +
                  " | ".join(str(e).strip().splitlines()[:4]))
        ok &= good
    return ok


def _compile_one(fmt, f, x, raw, meta, aux, shape, qformat):
    explain = torch._dynamo.explain(f)(x, raw, aux)
    eager = f(x, raw, aux)
    t0 = time.perf_counter()
    compiled = torch.compile(f, fullgraph=True)
    y = compiled(x, raw, aux)
    t_compile = time.perf_counter() - t0
    same_w = torch.equal(
        torch.compile(lambda raw, aux: dequantize_raw(QWeight(raw, qformat, shape, meta, aux), torch.bfloat16),
                      fullgraph=True)(raw, aux),
        reference(fmt, raw, meta, aux, shape, torch.bfloat16))
    diff = (y.float() - eager.float()).abs().max().item()
    t_eager = bench(lambda: f(x, raw, aux))
    t_comp = bench(lambda: compiled(x, raw, aux))
    ok = explain.graph_break_count == 0 and same_w
    print(f"- {fmt}: graphs {explain.graph_count}, graph breaks {explain.graph_break_count}; fullgraph compile "
          f"{t_compile:.1f} s; compiled dequant exact: {same_w}; linear max |compiled - eager| {diff:.3g}; "
          f"eager {t_eager * 1e6:.0f} µs, compiled {t_comp * 1e6:.0f} µs")
    if explain.graph_break_count:
        for r in explain.break_reasons:
            print("    break:", str(r.reason).splitlines()[0])
    return ok


MATMUL_SHAPES = [(18432, 3072), (9216, 3072), (3072, 3072), (3072, 12288)]  # modulation first: the 1-row linears


def qformat_of(fmt):
    return "nf4" if fmt.startswith("nf4") else "fp8" if fmt == "fp8" else "gguf"


def matmul_check(device, shapes, sweep=False):
    print("\n## Fused small-batch matmul (bf16 activations), µs; GB/s = raw weight bytes / fused time\n")
    print("| format | shape | rows | rel. err vs fp64 (fused / dequant+linear) | fused | dequant + linear | "
          "dense bf16 linear | fused vs dequant+linear | fused vs bf16 | fused GB/s |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|")
    ok = True
    for fmt in FORMATS:
        for i, shape in enumerate(shapes):
            raw, meta, aux, nbytes = make(fmt, shape, seed=i, device=device)
            q = qformat_of(fmt)
            dense = reference(fmt, raw, meta, aux, shape, torch.bfloat16)
            for rows in (1, 4):
                x = torch.randn(rows, shape[1], device=device, dtype=torch.bfloat16)
                want = x.double() @ dense.double().T
                got = tm.linear(x, QWeight(raw, q, shape, meta, aux))
                base = tm.reference(x, QWeight(raw, q, shape, meta, aux))
                e_f = ((got.double() - want).norm() / want.norm()).item()
                e_b = ((base.double() - want).norm() / want.norm()).item()
                ok &= e_f <= 6e-3
                t_f = bench(lambda: tm.linear(x, QWeight(raw, q, shape, meta, aux)))
                t_b = bench(lambda: tm.reference(x, QWeight(raw, q, shape, meta, aux)))
                t_d = bench(lambda: torch.nn.functional.linear(x, dense))
                print(f"| {fmt} | {shape[0]}x{shape[1]} | {rows} | {e_f:.1e} / {e_b:.1e} | {t_f * 1e6:.1f} | "
                      f"{t_b * 1e6:.1f} | {t_d * 1e6:.1f} | {t_b / t_f:.2f}x | {t_d / t_f:.2f}x | "
                      f"{nbytes / t_f / 1e9:.0f} |", flush=True)
                if fmt == "fp8":  # the fp8 tensor-core path fp8_linear takes from 16 rows: is it worth it below?
                    from kontext_lowvram.optimizations.fp8_linear import fp8_linear
                    try:
                        t_s = bench(lambda: fp8_linear(x, raw, aux["scale"]))
                        print(f"|  | (fp8 _scaled_mm, dynamic activation scale) | {rows} | | {t_s * 1e6:.1f} |"
                              " | | | | |", flush=True)
                    except Exception as e:  # _scaled_mm may refuse so few rows
                        print(f"|  | (fp8 _scaled_mm) | {rows} | {type(e).__name__} | | | | | | |", flush=True)
            if sweep and i == 0 and fmt != "fp8":
                matmul_sweep(fmt, raw, meta, aux, shape, device)
            del raw, aux, dense
    print(f"\nFUSED MATMUL WITHIN BOUND: {ok}")
    return ok


def matmul_sweep(fmt, raw, meta, aux, shape, device):
    """Time other tiles (output rows per program x K blocks per step x warps) for one format, 1 row."""
    x = torch.randn(1, shape[1], device=device, dtype=torch.bfloat16)
    q = qformat_of(fmt)
    saved = gq.BLOCK_TYPES_BY_NAME.get(fmt), tm.NF4_MATMUL_CONFIG
    results = []
    try:
        for bn in (4, 8, 16, 32):
            for kb in ((1, 2, 4) if q != "nf4" and gq.BLOCK_TYPES_BY_NAME[fmt].block == 256 else (2, 4, 8, 16)):
                for w in (2, 4, 8):
                    if q == "nf4":
                        tm.NF4_MATMUL_CONFIG = (bn, kb, w)
                    else:
                        gq.retune(fmt, matmul_tile=(bn, kb, w))
                    try:
                        results.append((bench(lambda: tm.linear(x, QWeight(raw, q, shape, meta, aux))) * 1e6, bn, kb, w))
                    except Exception as e:  # e.g. out of registers / shared memory for a big tile
                        print(f"  {fmt} BN={bn} KB={kb} warps={w}: {type(e).__name__}")
    finally:
        if saved[0] is not None:
            gq.restore(saved[0])
        tm.NF4_MATMUL_CONFIG = saved[1]
    results.sort()
    print(f"  sweep {fmt} {shape}: best " + ", ".join(f"BN={bn} KB={kb} w={w}: {t:.1f}" for t, bn, kb, w in
                                                     results[:4]) + f" | worst {results[-1][0]:.1f} µs", flush=True)


def lora_check(device, shapes, rank=32):
    print(f"\n## Dequantize with a rank-{rank} LoRA merged (bf16), µs\n")
    print("| format | shape | max |err| fused / two-step (vs exact) | one pass | dequant + addmm | dequant alone | "
          "speed-up |")
    print("|---|---|---|---:|---:|---:|---:|")
    ok = True
    for fmt in (f for f in FORMATS if f != "fp8"):  # fp8 LoRA goes on the output (fp8 matmul) or two-step
        for i, shape in enumerate(shapes):
            raw, meta, aux, _ = make(fmt, shape, seed=i, device=device)
            q = qformat_of(fmt)
            g = torch.Generator(device=device).manual_seed(i)
            up = (torch.randn(shape[0], rank, device=device, generator=g) * 0.02).to(torch.bfloat16)
            down = (torch.randn(rank, shape[1], device=device, generator=g) * 0.02).to(torch.bfloat16)

            def one_pass():
                return tlr.dequantize_with_lora(QWeight(raw, q, shape, meta, aux), torch.bfloat16, up, down)

            def two_step():
                return dequantize_raw(QWeight(raw, q, shape, meta, aux), torch.bfloat16).addmm_(up, down)

            exact = dequantize_raw(QWeight(raw, q, shape, meta, aux), torch.float32).double() + up.double() @ down.double()
            e1 = (one_pass().double() - exact).abs().max().item()
            e2 = (two_step().double() - exact).abs().max().item()
            ok &= e1 <= e2
            t1, t2 = bench(one_pass), bench(two_step)
            t0 = bench(lambda: dequantize_raw(QWeight(raw, q, shape, meta, aux), torch.bfloat16))
            print(f"| {fmt} | {shape[0]}x{shape[1]} | {e1:.1e} / {e2:.1e} | {t1 * 1e6:.0f} | {t2 * 1e6:.0f} | "
                  f"{t0 * 1e6:.0f} | {t2 / t1:.2f}x |", flush=True)
            del raw, aux, exact
    print(f"\nLORA MERGE NO WORSE THAN TWO-STEP: {ok}")
    return ok


def fp8_linear_check(device, shapes, tokens=8704):
    """Our fp8 tensor-core linear at the Kontext token count: activation quantization per tensor (two passes) vs
    per row (one pass, row-wise _scaled_mm), each kernel exact against the eager code, error vs an fp32 matmul of
    the same fp8 weight, and time against a dense bf16 linear (core bf16) and the per-tensor path."""
    from kontext_lowvram.optimizations import fp8_linear as fl
    from kontext_lowvram.optimizations import fp8_triton
    from kontext_lowvram.optimizations.quant.fp8 import quantize_fp8
    print(f"\n## fp8 linear, {tokens} tokens (bf16 activations), µs\n")
    print("| shape | quant exact tensor/row | rel. err tensor / row | bf16 linear | fp8 per tensor | fp8 per row | "
          "row vs tensor | quant tensor / row | scaled_mm tensor / row |")
    print("|---|---|---|---:|---:|---:|---:|---|---|")
    ok = True
    for i, (n, k) in enumerate(shapes):
        g = torch.Generator(device=device).manual_seed(i)
        w, w_scale = quantize_fp8(torch.randn(n, k, device=device, generator=g) * 0.02)
        dense = (w.float() * w_scale).to(torch.bfloat16)
        x = torch.randn(tokens, k, device=device, generator=g)
        x[::97] *= 300  # outlier tokens, as FLUX has
        x = x.to(torch.bfloat16)
        exact = []
        for rows in (False, True):
            got = (fp8_triton.quantize_per_row if rows else fp8_triton.quantize_per_tensor)(x, fl.E4M3_MAX)
            want = fl.quantize_activation_eager(x, rows)
            same = torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(got[1], want[1])
            ok &= same
            exact.append("✓" if same else "✗")
        ref = x.float() @ dense.float().T
        errs = []
        for rows in (False, True):
            y = fl.fp8_linear(x, w, w_scale, rowwise=rows).float()
            errs.append(((y - ref).norm() / ref.norm()).item())
        t_bf16 = bench(lambda: torch.nn.functional.linear(x, dense))
        t_t = bench(lambda: fl.fp8_linear(x, w, w_scale, rowwise=False))
        t_r = bench(lambda: fl.fp8_linear(x, w, w_scale, rowwise=True))
        q_t = bench(lambda: fp8_triton.quantize_per_tensor(x, fl.E4M3_MAX))
        q_r = bench(lambda: fp8_triton.quantize_per_row(x, fl.E4M3_MAX))
        xq_t, s_t = fp8_triton.quantize_per_tensor(x, fl.E4M3_MAX)
        xq_r, s_r = fp8_triton.quantize_per_row(x, fl.E4M3_MAX)
        ws_row = w_scale.float().reshape(()).expand(1, n).contiguous()
        m_t = bench(lambda: torch._scaled_mm(xq_t, w.t(), scale_a=s_t, scale_b=w_scale.float().reshape(()),
                                             out_dtype=torch.bfloat16))
        m_r = bench(lambda: torch._scaled_mm(xq_r, w.t(), scale_a=s_r, scale_b=ws_row, out_dtype=torch.bfloat16))
        print(f"| {n}x{k} | {'/'.join(exact)} | {errs[0]:.1e} / {errs[1]:.1e} | {t_bf16 * 1e6:.0f} | "
              f"{t_t * 1e6:.0f} | {t_r * 1e6:.0f} | {t_t / t_r:.2f}x | {q_t * 1e6:.0f} / {q_r * 1e6:.0f} | "
              f"{m_t * 1e6:.0f} / {m_r * 1e6:.0f} |", flush=True)
        del w, dense, x, ref, xq_t, xq_r
    print(f"\nFP8 ACTIVATION KERNELS EXACT: {ok}")
    return ok


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true", help="also time other tile sizes")
    p.add_argument("--quick", action="store_true", help="two shapes only")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile check")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run the checks on tiny shapes on the CPU (Triton's interpreter): tests this script, times "
                        "nothing (tests/test_gpu_scripts.py runs it)")
    args = p.parse_args()
    global SMOKE
    SMOKE = args.cpu_smoke
    if not torch.cuda.is_available() and not SMOKE:
        sys.exit("needs a CUDA device")
    device = torch.device("cpu" if SMOKE else "cuda")
    import triton
    name = "cpu (smoke: Triton interpreter, tiny shapes)" if SMOKE else torch.cuda.get_device_name()
    print(f"# Triton dequant check: {name}, torch {torch.__version__}, triton {triton.__version__}")
    tiles = {name: row.dequant_tile for name, row in gq.BLOCK_TYPES_BY_NAME.items()}
    print(f"triton_dequant.available: {td.available(device)}; tiles: {tiles}, nf4 {td.NF4_CONFIG}")
    t0 = time.perf_counter()
    if SMOKE:
        shapes, mm_shapes = [(64, 256), (32, 512)], [(64, 256)]
    else:
        shapes = FLUX_SHAPES[:1] + FLUX_SHAPES[3:4] if args.quick else FLUX_SHAPES
        mm_shapes = MATMUL_SHAPES[:2] if args.quick else MATMUL_SHAPES
    ok = check_and_time(shapes, device)
    if not SMOKE:  # counts CUDA kernels
        kernel_counts(device)
    if args.sweep:
        sweep(device, shapes[0])
    if not args.no_compile and not SMOKE:
        ok &= compile_check(device)
    ok &= matmul_check(device, mm_shapes, args.sweep)
    ok &= lora_check(device, shapes)
    if SMOKE or torch.cuda.get_device_capability(device) >= (8, 9):
        ok &= fp8_linear_check(device, shapes, tokens=40 if SMOKE else 8704)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; {'PASS' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
