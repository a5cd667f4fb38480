"""Core LoRA patches on our quantized layers, with ComfyUI's own patch classes (host_lora_check.py runs them in a
fresh process; this checks what it measured)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

CHECK = Path(__file__).resolve().parent / "host_lora_check.py"


@pytest.fixture(scope="module")
def measured(comfy_root, tmp_path_factory):
    proc = subprocess.run([sys.executable, str(CHECK), str(comfy_root)], capture_output=True, text=True,
                          timeout=600, cwd=str(tmp_path_factory.mktemp("host_lora")))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_per_forward_lora_rides_the_low_rank_path(measured):
    """The host's per-forward LoRA patch (LowVramPatch) on Q4_0 / NF4 / fp8 layers gives the host's own result
    without the host ever forming the dense delta; a patch with a full-weight diff goes to the host, still exact."""
    cases = measured["per_forward"]
    assert len(cases) == 12
    for c in cases:
        assert c["lora_effect"] > 0.1, c  # the patch really changes the output
        assert c["rel"] < 1e-5, c
        assert c["host_calls"] == (1 if c["diff"] else 0), c


def test_fp8_layer_merged_by_the_host_stays_fp8(measured):
    """ModelPatcher's load-time merge on an fp8 layer: stored as fp8 again, with exactly the stochastic rounding
    core's scaled-fp8 layers use (same seed, same scale), dequantizing to the merged weight within fp8 rounding;
    unpatching brings the original bytes back."""
    m = measured["fp8_merge"]
    assert m["dtype"] == "torch.float8_e4m3fn" and m["quantized"]
    assert m["equals_core_rounding"]
    assert m["rel_vs_stored"] < 1e-6  # the forward reads what was stored
    assert m["rel_vs_merged"] < 0.08  # e4m3: 3 mantissa bits
    assert m["restored"]


def test_lora_the_host_would_merge_keeps_gguf_and_nf4_quantized(measured):
    """The classic ModelPatcher's load-time merge on Q4_0 / Q8_0 / NF4 layers under our loader's patcher: the
    layer keeps its raw bytes (no dense copy the host did not plan for) and gives the host's own merged result
    per forward without the host's dense math; partially_unload (host re-patches per forward) applies it once,
    unpatch_model drops it, a clone at another strength applies its own."""
    cases = measured["kept_quantized"]
    assert [c["fmt"] for c in cases] == ["Q4_0", "Q8_0", "nf4"]
    for c in cases:
        assert c["dtype"] == "torch.uint8" and c["raw_kept"] and c["tagged"], c
        assert c["clone_class_kept"], c
        assert c["patch_calls"] == 0 and c["forward_calls"] == 0, c  # no dense merge at load, nor per forward
        assert c["lora_effect"] > 0.1, c
        assert c["rel_patched"] < 1e-5, c
        assert c["rel_after_partial_unload"] < 1e-5, c  # once, not twice
        assert c["untagged_after_unpatch"] and c["rel_after_unpatch"] < 1e-6, c
        assert c["rel_clone_half"] < 1e-5, c
        assert c["raw_restored"], c


def test_non_dynamic_copy_of_our_model_loads_again_and_stays_ours(measured):
    """v0.29 asks a dynamic-VRAM model for a copy without it (core's TorchCompileModel, hooks in the conditioning,
    MultiGPU) through the model's cached_patcher_init, and raises without one. Ours loads the file again (same
    conversion, same raw bytes) into our patcher class, so a core LoRA on the copy keeps GGUF layers quantized."""
    c = measured["non_dynamic_clone"]
    if c is None:
        pytest.skip("this ComfyUI has no dynamic VRAM: nothing asks for a non-dynamic copy")
    assert "error" not in c, c
    assert c["class"] == "KontextLowVRAMModelPatcher" and not c["dynamic"] and c["fresh_model"], c
    assert c["quantized_layers"] > 0 and c["same_raw"] and c["reloader_kept"], c
    assert c["lora_patches"] > 0 and c["quantized_after_lora"], c
