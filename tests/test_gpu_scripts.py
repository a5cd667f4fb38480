"""The GPU check script runs end to end, on the CPU, before a GPU session depends on it.

tests/gpu/kernel_check.py is what a GPU session (30 minutes of device time) runs to check and time every Triton
kernel; a typo in it would waste that time. `--cpu-smoke` runs every check it makes (exactness against the torch
reference, the fused matmul against fp64, the LoRA merge, the fp8 activation kernels, the tile sweeps) on tiny
shapes in Triton's interpreter; the timings it prints mean nothing. The benchmark itself is covered the same way by
tests/integration/test_bench_smoke.py (it needs ComfyUI).
"""
import os
import subprocess
import sys

import pytest

from kontext_lowvram.cli import load_bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernel_check_runs_every_check_on_the_cpu():
    pytest.importorskip("triton", reason="the Triton kernel tests need the `triton` package (pip install triton); "
                                         "they run in its interpreter, no GPU needed")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "gpu", "kernel_check.py"), "--cpu-smoke",
                           "--sweep"], capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**os.environ, "TRITON_DEFAULT_FP_FUSION": "1"})
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    for verdict in ("ALL EXACT: True", "FUSED MATMUL WITHIN BOUND: True", "LORA MERGE NO WORSE THAN TWO-STEP: True",
                    "FP8 ACTIVATION KERNELS EXACT: True", "; PASS"):
        assert verdict in out, verdict
    # every format reached the exactness table and the sweep
    for fmt in ("Q8_0", "Q4_K", "Q2_K", "nf4-nested", "fp8"):
        assert f"| {fmt} | 64x256 |" in out, fmt
    assert "sweep Q4_K" in out and "Q4_K: best" in out


def test_bench_profile_counts_every_kernel_of_ours_as_quant():
    """The bench's profile column 'quant' is matched by kernel name: every kernel in triton_kernels.py must land
    there (a renamed or new kernel silently counted as 'other' would misstate the profile of a miss)."""
    import ast

    profile_category = load_bench().profile_category
    path = os.path.join(ROOT, "optimizations", "quant", "triton_kernels.py")
    kernels = [f.name for f in ast.parse(open(path).read()).body
               if isinstance(f, ast.FunctionDef) and not f.name.startswith("_")]
    assert {"dequant_gguf", "dequant_fp8", "matmul_fp8", "act_quant_rows", "dequant_lora_nf4"} <= set(kernels)
    assert {k: profile_category(k) for k in kernels} == dict.fromkeys(kernels, "quant")
    assert profile_category("kontext_lowvram::gguf_dequant") == "quant"  # CPU smoke: our custom ops
    assert profile_category("sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert profile_category("triton_poi_fused_add_0") == "other"


def test_bench_states_each_target_from_the_rows_of_one_run():
    target_lines = load_bench().target_lines

    def row(who, label, s):
        return (who, label, s, 1.0, 1.0, 1.0, "", "ModelPatcher", None)

    rows = [row("core", "bf16", 0.330), row("core", "fp8 native (comfy_quant)", 0.288),
            row("ours", "Q8_0", 0.350), row("ours", "Q8_0 (fused small-batch matmul)", 0.3366),
            row("ours", "Q4_K", 0.338), row("ours", "fp8_e4m3fn_scaled", 0.297),
            row("ours", "fp8_e4m3fn_scaled (per-row activation scale)", 0.280),
            row("ComfyUI-GGUF", "Q8_0", 0.405), row("ComfyUI-GGUF", "Q4_K", 0.552),
            row("ours", "Q8_0 + LoRA r32 (low-rank)", 0.357), row("ours", "Q4_K + LoRA r32 (low-rank)", 0.3449),
            row("ours", "Q5_K", None)]  # a failed row: no target line
    text = "\n".join(target_lines(rows))
    assert "- ours Q8_0 vs core bf16: 1.06× (target ≤ 1.00×) missed by 6 %; best opt-in variant (fused small-batch " \
           "matmul) 1.02×" in text
    assert "- ours Q4_K vs core bf16: 1.02× (target ≤ 1.10×) met" in text
    assert "- ComfyUI-GGUF Q8_0 / ours Q8_0 (speed-up): 1.16× (target ≥ 1.20×) missed by 4 %; best opt-in " \
           "variant (fused small-batch matmul) 1.20×" in text
    assert "- ComfyUI-GGUF Q4_K / ours Q4_K (speed-up): 1.63× (target ≥ 1.70×) missed by 4 %" in text
    assert "- ours fp8 vs core fp8 native (comfy_quant): 1.03× (target ≤ 1.00×) missed by 3 %; best opt-in variant " \
           "(per-row activation scale) 0.97×" in text
    assert "- LoRA cost, ours Q8_0 + LoRA r32 (low-rank): +2.0 % (target ≤ +3 %) met" in text
    assert "- LoRA cost, ours Q4_K + LoRA r32 (low-rank): +2.0 % (target ≤ +3 %) met" in text
    assert "Q5_K" not in text
    assert target_lines([row("core", "bf16", 0.33)]) == []
