"""`kontext-lowvram bench` runs its whole flow on a tiny model against this ComfyUI (measures nothing).

The GPU session that produces BENCHMARKS.md has 30 minutes of device time; this runs the same code first: each
row kind the speed runs use (core bf16 / fp8, ours with the opt-in kernels and per-row fp8 scales, a LoRA row through
our node and one through core's LoRA loader, ComfyUI-GGUF when GGUF_NODE_PATH is set) and the profile, and checks
every row produced a number and that the quantized outputs stay close to core bf16's on the same weights.
"""
import os
import re
import subprocess
import sys


def test_bench_smoke_runs_every_row_kind(comfy_root, tmp_path):
    cmd = [sys.executable, "-m", "kontext_lowvram.cli", "bench", "--smoke", "--steps", "1", "--comfyui", str(comfy_root),
           "--formats", "Q8_0", "fp8_e4m3fn_scaled", "--lora", "Q8_0", "--include", "core", "fused", "rowwise",
           "corelora", "--profile", "--out", ""]  # the smoke table goes to stdout only
    gguf = os.environ.get("GGUF_NODE_PATH")
    cmd += ["--gguf-formats"] + (["Q8_0"] if gguf else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=str(tmp_path))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "FAILED" not in proc.stdout, log[-4000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "s/step" not in line]
    labels = [" | ".join(c.strip() for c in r.strip("|").split("|")[:2]) for r in rows]
    want = ["core | bf16", "ours | Q8_0", "ours | Q8_0 (fused small-batch matmul)",
            "ours | fp8_e4m3fn_scaled (per-row activation scale)", "ours | Q8_0 + LoRA r32 (low-rank)",
            "ours | Q8_0 + LoRA r32 (core LoRA loader)"]
    want += ["ComfyUI-GGUF | Q8_0"] if gguf else []
    for label in want:
        assert label in labels, (label, labels)
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert re.fullmatch(r"\d+\.\d+", cells[2]), r  # an s/step number, not "failed"
        assert re.fullmatch(r"\d+ / \d+ / \d+ / \d+ / \d+ / \d+", cells[-1]), r  # the profile column
        diff = re.match(r"(\d\.\d+) vs", cells[7])
        if diff and "fp8" not in cells[1] and "nf4" not in cells[1]:
            assert float(diff.group(1)) < 0.02, r  # Q8_0 rows: same weights as core bf16, one quantization off


def test_bench_smoke_runs_flux2(comfy_root, tmp_path):
    """The FLUX.2 rows of speed_runs.sh's flux2 part, on a small FLUX.2 [dev] and [klein]; v0.3.64 has no FLUX.2."""
    import pytest

    import comfy_harness as H
    if not H.runs_flux2(comfy_root):
        pytest.skip(H.predates_reason(comfy_root))
    for model in ("flux2-klein-4b", "flux2-dev"):
        cmd = [sys.executable, "-m", "kontext_lowvram.cli", "bench", "--smoke", "--steps", "1", "--model", model,
               "--comfyui", str(comfy_root), "--formats", "Q8_0", "Q4_K", "fp8_e4m3fn_scaled", "--lora",
               "--gguf-formats", "--include", "core", "--out", ""]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=str(tmp_path))
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0 and "FAILED" not in proc.stdout, log[-4000:]
        rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "s/step" not in line]
        labels = [" | ".join(c.strip() for c in r.strip("|").split("|")[:2]) for r in rows]
        assert labels == ["core | bf16", "core | fp8 native (comfy_quant)", "ours | Q8_0", "ours | Q4_K",
                          "ours | fp8_e4m3fn_scaled"], (model, labels)
        for r in rows:
            assert re.fullmatch(r"\d+\.\d+", [c.strip() for c in r.strip("|").split("|")][2]), r
        assert f"model {model} (smoke size)" in proc.stdout
