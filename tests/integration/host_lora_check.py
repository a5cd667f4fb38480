"""Core LoRA patching on our quantized Linear with ComfyUI's own classes, in a fresh process (the caller's pytest
must not import comfy). Run as `python host_lora_check.py COMFYUI_PATH`; prints one JSON object, which
test_host_lora_patches.py checks.

- "per_forward": the host's per-forward patch (comfy.model_patcher.LowVramPatch, what low-VRAM layers and v0.29's
  dynamic VRAM use) on Q4_0 / NF4 / fp8 layers, for a short and a long activation: our output vs the host's own
  application of that patch to the dequantized weight, and how often the host's calculate_weight ran. Once with a
  plain LoRA, once with a LoRA plus a full-weight diff (which only the host can apply).
- "fp8_merge": ModelPatcher.patch_model (the host merges at load) on an fp8 layer, then unpatch_model.
- "kept_quantized": the same load-time merge on Q4_0 / Q8_0 / NF4 layers under our loader's patcher
  (host.patcher.keep_quantized_under_lora): the raw bytes stay, the LoRA runs per forward; then the host's other
  ways to un-merge (partially_unload, unpatch_model) and a clone at another strength.
- "non_dynamic_clone" (ComfyUI with dynamic VRAM only, else null): our loader's model asked for a copy without
  dynamic VRAM, as core's TorchCompileModel does (clone(disable_dynamic=True)), then a core LoRA on that copy.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_harness  # noqa: E402,F401  (maps kontext_lowvram onto this checkout when it is not installed)
import torch  # noqa: E402

from kontext_lowvram.cli import load_bench  # noqa: E402

setup_comfy = load_bench().setup_comfy

IN_F, OUT_F, RANK = 64, 48, 4


def non_dynamic_clone(comfy_path):
    """clone(disable_dynamic=True) of a model from our loader: ComfyUI loads it again through the model's
    cached_patcher_init. A CPU patcher is never dynamic, so the patcher says it is, as on a GPU."""
    import comfy.lora
    import comfy.sd

    from kontext_lowvram.host import compat
    if not compat.diffusion_loader_disables_dynamic():
        return None
    from kontext_lowvram.host.model import load_model
    from kontext_lowvram.optimizations.ops import is_quantized

    cfg = comfy_harness.flux_test_config(Path(comfy_path))
    path = comfy_harness.write_flux_transformer(Path("klv_reload.safetensors").resolve(), cfg)
    patcher = load_model(str(path), "q8_0")
    patcher.is_dynamic = lambda: True
    try:
        plain = patcher.clone(disable_dynamic=True)
    except Exception as e:  # v0.29 raises when the model has no cached_patcher_init
        return {"error": repr(e)}

    def raw(p):
        return {n: m.weight.detach() for n, m in p.model.named_modules() if is_quantized(m)}

    ours, theirs = raw(patcher), raw(plain)
    lora = comfy.sd.load_lora_for_models(plain, None, comfy_harness.flux_lora_state_dict(cfg), 1.0, 0)[0]
    lora.patch_model()
    after = raw(lora)
    return {"class": type(plain).__name__, "dynamic": plain.is_dynamic(), "fresh_model": plain.model is not patcher.model,
            "quantized_layers": len(ours), "same_raw": sorted(ours) == sorted(theirs) and all(
                torch.equal(ours[n], theirs[n]) for n in ours),
            "reloader_kept": plain.cached_patcher_init == patcher.cached_patcher_init,
            "lora_patches": len(lora.patches), "quantized_after_lora": sorted(after) == sorted(ours)}


def main(comfy_path):
    sys.argv = [sys.argv[0], "--cpu"]
    setup_comfy(comfy_path, "off")
    import comfy.float
    import comfy.lora
    import comfy.model_patcher
    import comfy.utils

    from kontext_lowvram.optimizations import QTensor, dequantize, quantize
    from kontext_lowvram.host.ops import HOST_PATCH_ATTR, make_comfy_ops
    from kontext_lowvram.host.patcher import keep_quantized_under_lora
    from kontext_lowvram.optimizations.ops import is_quantized

    string_to_seed = getattr(comfy.utils, "string_to_seed", None) or comfy.model_patcher.string_to_seed
    calls = [0]
    host_calculate = comfy.lora.calculate_weight

    def counting_calculate(*args, **kwargs):
        calls[0] += 1
        return host_calculate(*args, **kwargs)

    comfy.lora.calculate_weight = counting_calculate
    g = torch.Generator().manual_seed(0)
    w = torch.randn(OUT_F, IN_F, generator=g) * 0.05
    bias = torch.randn(OUT_F, generator=g) * 0.01
    lora_sd = {"lin.lora_up.weight": torch.randn(OUT_F, RANK, generator=g) * 0.2,
               "lin.lora_down.weight": torch.randn(RANK, IN_F, generator=g) * 0.2,
               "lin.alpha": torch.tensor(2.0)}
    diff = {"lin.weight": ("diff", (torch.randn(OUT_F, IN_F, generator=g) * 0.01,))}
    key = "lin.weight"

    def patched_net(fmt, with_diff, strength=0.8):
        net = torch.nn.Module()
        net.lin = make_comfy_ops().Linear(IN_F, OUT_F)
        qt = quantize(w, fmt)
        net.lin._load_from_state_dict({"lin.weight": qt, "lin.bias": bias}, "lin.", {}, True, [], [], [])
        patcher = keep_quantized_under_lora(comfy.model_patcher.ModelPatcher(
            net, load_device=torch.device("cpu"), offload_device=torch.device("cpu")))  # as our loader node
        patcher.add_patches(comfy.lora.load_lora(lora_sd, {"lin": key}), strength)
        if with_diff:
            patcher.add_patches(diff, 1.0)
        return net, patcher, qt

    result = {"per_forward": [], "fp8_merge": {}, "kept_quantized": []}
    for fmt in ("Q4_0", "nf4", "fp8_e4m3fn_scaled"):
        for with_diff in (False, True):
            net, patcher, qt = patched_net(fmt, with_diff)
            _, set_func, convert_func = comfy.model_patcher.get_key_weight(net, key)
            patch = comfy.model_patcher.LowVramPatch(key, patcher.patches, convert_func, set_func)
            reference_weight = patch(dequantize(qt, torch.float32))  # the host's own math on the real values
            for rows in (4, 3 * IN_F):  # output path / merged path
                x = torch.randn(2, rows // 2, IN_F, generator=g)
                net.lin.weight_function = [patch]
                calls[0] = 0
                out = net.lin(x)
                ref = torch.nn.functional.linear(x, reference_weight, bias)
                result["per_forward"].append({
                    "fmt": fmt, "diff": with_diff, "rows": rows, "host_calls": calls[0],
                    "rel": float((out - ref).norm() / ref.norm()),
                    "lora_effect": float((ref - torch.nn.functional.linear(x, dequantize(qt), bias)).norm()
                                         / ref.norm())})

    net, patcher, qt = patched_net("fp8_e4m3fn_scaled", False)
    raw_before = net.lin.weight.detach().clone()
    scale = qt.aux["scale"]
    merged = host_calculate(patcher.patches[key], dequantize(qt, torch.float32), key)
    # core's scaled-fp8 layer (v0.3.64 comfy.ops.scaled_fp8_ops.set_weight) stores exactly this
    expected = comfy.float.stochastic_rounding(merged / scale, torch.float8_e4m3fn, seed=string_to_seed(key))
    patcher.patch_model()
    x = torch.randn(20, IN_F, generator=g)
    out = net.lin(x)
    merged_ref = torch.nn.functional.linear(x, merged, bias)
    result["fp8_merge"] = {
        "dtype": str(net.lin.weight.dtype), "quantized": is_quantized(net.lin),
        "equals_core_rounding": bool(torch.equal(net.lin.weight.view(torch.uint8), expected.view(torch.uint8))),
        "rel_vs_merged": float((out - merged_ref).norm() / merged_ref.norm()),
        "rel_vs_stored": float((out - torch.nn.functional.linear(
            x, dequantize(QTensor(net.lin.weight.detach(), qformat="fp8", shape=qt.shape, meta=qt.meta, aux=qt.aux)), bias)).norm()
            / merged_ref.norm()),
    }
    patcher.unpatch_model()
    result["fp8_merge"]["restored"] = bool(torch.equal(net.lin.weight.view(torch.uint8), raw_before.view(torch.uint8)))
    for fmt in ("Q4_0", "Q8_0", "nf4"):
        net, patcher, qt = patched_net(fmt, False)
        raw_before = net.lin.weight.detach().clone()

        def outputs(x, strength):
            ref_patcher = patched_net(fmt, False, strength)[1]
            merged = host_calculate(ref_patcher.patches[key], dequantize(qt, torch.float32), key)
            return torch.nn.functional.linear(x, merged, bias)

        def rel_to(out, ref):
            return float((out - ref).norm() / ref.norm())

        x = torch.randn(3 * IN_F, IN_F, generator=g)  # long enough for the merge-into-the-dequantized-weight path
        plain = torch.nn.functional.linear(x, dequantize(qt, torch.float32), bias)
        calls[0] = 0
        patcher.patch_model()
        case = {"fmt": fmt, "patch_calls": calls[0], "dtype": str(net.lin.weight.dtype),
                "raw_kept": bool(torch.equal(net.lin.weight.detach(), raw_before)),
                "tagged": getattr(net.lin.weight, HOST_PATCH_ATTR, None) is not None,
                "clone_class_kept": type(patcher.clone()) is type(patcher)}
        calls[0] = 0
        case["rel_patched"] = rel_to(net.lin(x), outputs(x, 0.8))
        case["forward_calls"] = calls[0]
        case["lora_effect"] = rel_to(outputs(x, 0.8), plain)
        patcher.partially_unload(torch.device("cpu"), 1e30)  # the host un-merges and re-patches per forward
        case["rel_after_partial_unload"] = rel_to(net.lin(x), outputs(x, 0.8))
        patcher.unpatch_model(torch.device("cpu"))
        case["untagged_after_unpatch"] = getattr(net.lin.weight, HOST_PATCH_ATTR, None) is None
        case["rel_after_unpatch"] = rel_to(net.lin(x), plain)
        half = patcher.clone()
        half.patches = {}
        half.add_patches(comfy.lora.load_lora(lora_sd, {"lin": key}), 0.5)
        half.patch_model()
        case["rel_clone_half"] = rel_to(net.lin(x), outputs(x, 0.5))
        half.unpatch_model(torch.device("cpu"))
        case["raw_restored"] = bool(torch.equal(net.lin.weight.detach(), raw_before))
        result["kept_quantized"].append(case)
    result["non_dynamic_clone"] = non_dynamic_clone(comfy_path)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
