"""Our LowVRAMModelLoader inside a real ComfyUI: every format runs the Kontext edit graph.

Metric: relative L2 distance of the sampled latents (SaveLatent output, 2 euler steps, same seed):
  ‖z_ours − z_ref‖ / ‖z_ref‖
against (a) ComfyUI's own UNETLoader on the bf16 file the quantized one was made from — the quantization error,
bounded per format — and (b) UNETLoader on an fp32 file of exactly the values our file holds (dequantized by
gguf-py's own code for GGUF) — the runtime path, bounded tightly.
"""
import gguf
import pytest
import torch
from safetensors.torch import load_file

import comfy_harness as H
from kontext_lowvram.loaders import quantize_state_dict
from kontext_lowvram.loaders.keys import should_quantize
from kontext_lowvram.loaders.writers import write_gguf, write_safetensors
from kontext_lowvram.optimizations import QTensor, dequantize
from fixtures.gguf_blocks import random_blocks

# format -> (file suffix, quantization, writer option, bound vs the bf16 original).
# Bounds are ~1.5x the errors measured on both ComfyUI versions (CPU, 2 steps): in these random models the latent
# error is about twice the weights' relative L2 error (Q8_0 0.5%, fp8 e4m3 2.5%, Q5_1 3.6%, nf4/Q4_0 8-9%).
FORMATS = {
    "gguf_q8_0": (".gguf", "Q8_0", None, 0.03),
    "gguf_q5_1": (".gguf", "Q5_1", None, 0.15),
    "gguf_q4_0": (".gguf", "Q4_0", None, 0.30),
    "fp8_e4m3fn_scaled": (".safetensors", "fp8_e4m3fn_scaled", "scaled", 0.10),
    "fp8_comfy_quant": (".safetensors", "fp8_e4m3fn_scaled", "comfy_quant", 0.10),
    "fp8_e5m2_plain": (".safetensors", "fp8_e5m2", "scaled", 0.20),
    "nf4_bnb": (".safetensors", "nf4", "scaled", 0.30),
}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def ours(name, compute_dtype="default", convert="none"):
    return H.node("LowVRAMModelLoader", model_name=name, compute_dtype=compute_dtype, convert_on_load=convert)


@pytest.fixture(scope="session")
def original(flux_model):
    return load_file(str(flux_model.path))


@pytest.fixture(scope="session")
def baseline(comfy, flux_model):
    """Core UNETLoader on the bf16 original: the reference latent."""
    return comfy.saved_latent(comfy.run(H.kontext_edit_graph(H.unet_loader_node(flux_model.name), seed=7,
                                                             prefix="ref_bf16"), timeout=900))


@pytest.fixture(scope="session")
def write_format(comfy, original):
    cache = {}

    def write(fmt):
        if fmt not in cache:
            suffix, quant, style, _ = FORMATS[fmt]
            sd = quantize_state_dict(original, quant)
            path = comfy.models_dir / "diffusion_models" / f"klv_{fmt}{suffix}"
            write_gguf(path, sd) if suffix == ".gguf" else write_safetensors(path, sd, fp8_style=style)
            cache[fmt] = (path.name, sd)
        return cache[fmt][0]
    write.state_dict = lambda fmt: cache[fmt][1]
    return write


@pytest.fixture(scope="session")
def exact_reference(comfy):
    """Context: an fp32 .safetensors of exactly the values a state dict holds (GGUF blocks read by gguf-py's own
    dequantizer), for core's UNETLoader; removed afterwards (a full-width test model is 2 GB in fp32)."""
    import contextlib

    @contextlib.contextmanager
    def make(sd, name):
        ref = {}
        for k, v in sd.items():
            if isinstance(v, QTensor) and v.qformat == "gguf":
                qt = gguf.GGMLQuantizationType[v.meta["qtype"]]
                ref[k] = torch.from_numpy(gguf.quants.dequantize(v.raw.numpy(), qt)).reshape(v.shape)
            else:
                ref[k] = dequantize(v, torch.float32)
        path = comfy.models_dir / "diffusion_models" / f"{name}_ref_fp32.safetensors"
        H.save_safetensors(ref, path)
        del ref
        try:
            yield path.name
        finally:
            path.unlink()
    return make


def run_latent(comfy, model_node, prefix, **kw):
    out = comfy.run(H.kontext_edit_graph(model_node, seed=7, prefix=prefix, **kw), timeout=900)
    images = comfy.saved_images(out)
    assert len(images) == 1 and images[0].stat().st_size > 0, "no image written"
    lat = comfy.saved_latent(out)
    assert torch.isfinite(lat).all()
    return lat


def test_node_is_registered_with_tooltips(comfy, write_format):
    write_format("gguf_q8_0")
    info = comfy.object_info("LowVRAMModelLoader")["LowVRAMModelLoader"]
    assert not comfy.custom_node_import_failed()
    assert info["category"] == "Kontext LowVRAM/loaders" and info["output"] == ["MODEL"]
    assert "GGUF/FP8/NF4" in info["display_name"]
    req = info["input"]["required"]
    assert "klv_gguf_q8_0.gguf" in req["model_name"][0]
    assert set(req["convert_on_load"][0]) == {"none", "fp8_e4m3fn_scaled", "nf4", "q8_0"}
    assert all(spec[1].get("tooltip") for spec in req.values())


def test_bf16_through_our_loader_matches_core(comfy, flux_model, baseline):
    lat = run_latent(comfy, ours(flux_model.name), "ours_bf16")
    assert rel(lat, baseline) < 1e-4


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_quantized_format_close_to_bf16(comfy, write_format, baseline, fmt):
    lat = run_latent(comfy, ours(write_format(fmt)), f"ours_{fmt}")
    err = rel(lat, baseline)
    print(f"{comfy.version} {fmt}: latent rel L2 vs bf16 = {err:.4f} (bound {FORMATS[fmt][3]})")
    assert err < FORMATS[fmt][3]
    assert err > 0  # the quantized weights were really used


@pytest.mark.parametrize("conversion,bound", [("q8_0", 0.03), ("nf4", 0.30), ("fp8_e4m3fn_scaled", 0.10)])
def test_convert_on_load(comfy, flux_model, baseline, conversion, bound):
    lat = run_latent(comfy, ours(flux_model.name, convert=conversion), f"conv_{conversion}")
    assert 0 < rel(lat, baseline) < bound


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "IQ4_XS"])
def test_kquant_runtime_matches_its_exact_values(comfy, original, flux_cfg, exact_reference, qtype):
    """gguf-py cannot write K-quants, so the file holds random valid blocks; the reference is an fp32 file of
    exactly the values gguf-py reads from those blocks, run by core's own loader."""
    sd = {}
    for i, (k, v) in enumerate(original.items()):
        if should_quantize(k, v.shape):
            raw = random_blocks(qtype, v.shape, std=H.init_std(flux_cfg), seed=i)
            sd[k] = QTensor(raw, qformat="gguf", shape=v.shape, meta={"qtype": qtype})
        else:
            sd[k] = v
    write_gguf(comfy.models_dir / "diffusion_models" / f"klv_{qtype}.gguf", sd)
    with exact_reference(sd, f"klv_{qtype}") as ref_name:
        ref_lat = run_latent(comfy, H.unet_loader_node(ref_name), f"ref_{qtype}")
    lat = run_latent(comfy, ours(f"klv_{qtype}.gguf"), f"ours_{qtype}")
    assert rel(lat, ref_lat) < 1e-3


@pytest.mark.parametrize("fmt", ["gguf_q8_0", "nf4_bnb", "fp8_e4m3fn_scaled"])
def test_core_lora_applies_to_quantized_model(comfy, write_format, exact_reference, flux_lora, fmt):
    """Core LoraLoaderModelOnly on our quantized model = core's LoRA on an fp32 model of the same values.

    GGUF/NF4 layers stay quantized, the LoRA runs per forward (host/patcher.py). fp8 layers are merged and stored as
    fp8 again, with core's stochastic rounding (the exact rounding is checked in test_host_lora_patches.py), so
    their error is that of an fp8 rounding of the merged weights: bounded by core's own fp8 + LoRA on the same
    file against the same fp32 merge."""
    name = write_format(fmt)
    plain = run_latent(comfy, ours(name), f"lora0_{fmt}")
    with_lora = run_latent(comfy, ours(name), f"lora1_{fmt}", lora=flux_lora)
    with exact_reference(write_format.state_dict(fmt), f"klv_{fmt}") as ref_name:
        fp32_merge = run_latent(comfy, H.unet_loader_node(ref_name), f"lora_core_{fmt}", lora=flux_lora)
    effect, err = rel(with_lora, plain), rel(with_lora, fp32_merge)
    print(f"{comfy.version} {fmt}: LoRA effect {effect:.4f}; vs core LoRA on the same values in fp32 {err:.5f}")
    assert effect > 0.05  # the LoRA really changed the output
    if fmt.startswith("fp8"):
        core_fp8 = run_latent(comfy, H.unet_loader_node(name), f"lora_core8_{fmt}", lora=flux_lora)
        core_err = rel(core_fp8, fp32_merge)
        print(f"{comfy.version} {fmt}: core's own fp8 + LoRA vs the same fp32 merge {core_err:.5f}")
        assert err < 1.5 * core_err
    else:
        assert err < 0.02
    zero = run_latent(comfy, ours(name), f"lora_zero_{fmt}", lora={"lora_name": flux_lora, "strength_model": 0.0})
    assert torch.equal(zero, plain)


@pytest.mark.parametrize("fmt", ["gguf_q8_0", "nf4_bnb", "fp8_e4m3fn_scaled"])
def test_low_rank_lora_node_equals_core_lora(comfy, write_format, exact_reference, flux_lora, fmt):
    """Our LowVRAMLoraLoader (low-rank side product, base stays quantized) = core's LoRA merged into an fp32
    model of the same values; strength 0.5 then 1.0 (a strength change re-uses the plan)."""
    name = write_format(fmt)
    plain = run_latent(comfy, ours(name), f"lr0_{fmt}")
    with exact_reference(write_format.state_dict(fmt), f"klv_{fmt}") as ref_name:
        for strength in (0.5, 1.0):
            spec = {"lora_name": flux_lora, "strength_model": strength}
            ours_lat = run_latent(comfy, ours(name), f"lr_{fmt}_{strength}",
                                  lora=dict(spec, class_type="LowVRAMLoraLoader"))
            core_lat = run_latent(comfy, H.unet_loader_node(ref_name), f"lr_core_{fmt}_{strength}", lora=spec)
            effect, err = rel(ours_lat, plain), rel(ours_lat, core_lat)
            print(f"{comfy.version} {fmt} strength {strength}: low-rank LoRA effect {effect:.4f}; "
                  f"vs core LoRA on the same values {err:.5f}")
            assert effect > 0.02
            assert err < 0.01  # bf16 low-rank product vs fp32 merge: no bf16 rounding of the merged weight


@pytest.mark.slow
@pytest.mark.skipif(not H.slow_enabled(), reason="Inductor compiles the model on the CPU (minutes); set KLV_INTEGRATION_SLOW=1")
def test_torch_compile_option_gives_the_same_latent(comfy, write_format):
    name = write_format("gguf_q8_0")
    plain = run_latent(comfy, ours(name), "tc_plain")
    compiled = run_latent(comfy, H.node("LowVRAMModelLoader", model_name=name, compute_dtype="default",
                                        convert_on_load="none", fp8_matmul=True, torch_compile=True), "tc_compiled")
    err = rel(compiled, plain)
    print(f"{comfy.version}: torch.compile latent rel L2 vs eager {err:.2e}")
    assert err < 1e-3


def test_corrupt_file_fails_cleanly_and_server_survives(comfy, write_format):
    src = comfy.models_dir / "diffusion_models" / write_format("gguf_q8_0")
    bad = comfy.models_dir / "diffusion_models" / "klv_truncated.gguf"
    data = src.read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(H.ComfyError) as e:
        comfy.run(H.kontext_edit_graph(ours(bad.name), prefix="bad"), timeout=300)
    assert "klv_truncated.gguf" in str(e.value) and "download it again" in str(e.value)
    assert "LowVRAMModelLoader" in comfy.object_info()  # the server is still up


@pytest.mark.slow
@pytest.mark.skipif(not H.slow_enabled(), reason="FluxKontextImageScale -> ~1 MP reference latent: minutes on CPU; set KLV_INTEGRATION_SLOW=1")
def test_full_kontext_graph_with_kontext_image_scale(comfy, write_format, flux_model):
    """The stock Kontext edit graph, FluxKontextImageScale included, on our NF4 model vs core on bf16."""
    ref = run_latent(comfy, H.unet_loader_node(flux_model.name), "kscale_core", kontext_scale=True)
    lat = run_latent(comfy, ours(write_format("nf4_bnb")), "kscale_ours", kontext_scale=True)
    assert 0 < rel(lat, ref) < FORMATS["nf4_bnb"][3]


def every_2d_weight(key, shape):
    return key.endswith(".weight") and len(shape) == 2


@pytest.mark.parametrize("fmt", ["gguf_q8_0", "gguf_q4_0", "nf4_bnb", "fp8_e4m3fn_scaled"])
def test_every_2d_tensor_quantized_runs_the_kontext_edit(comfy, original, exact_reference, fmt):
    """Files as gguf-py and other producers make them: every 2-D tensor quantized, img_in, txt_in, time_in,
    vector_in, guidance_in, final_layer and the modulations included. The host reads img_in's shape for the
    channel count (Flux.concat_cond): a raw-byte width broke the Kontext graph. Reference: core's loader on an
    fp32 file of exactly the values ours holds."""
    suffix, quant, style, _ = FORMATS[fmt]
    sd = quantize_state_dict(original, quant, select=every_2d_weight)
    for key in ("img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "final_layer.linear.weight",
                "final_layer.adaLN_modulation.1.weight", "double_blocks.0.img_mod.lin.weight"):
        assert isinstance(sd[key], QTensor), key
    name = f"klv_all2d_{fmt}{suffix}"
    path = comfy.models_dir / "diffusion_models" / name
    write_gguf(path, sd) if suffix == ".gguf" else write_safetensors(path, sd, fp8_style=style)
    lat = run_latent(comfy, ours(name), f"all2d_{fmt}")
    with exact_reference(sd, f"klv_all2d_{fmt}") as ref_name:
        ref_lat = run_latent(comfy, H.unet_loader_node(ref_name), f"all2d_ref_{fmt}")
    err = rel(lat, ref_lat)
    print(f"{comfy.version} {fmt}, every 2-D tensor quantized: latent rel L2 vs the same values in fp32 {err:.2e}")
    assert err < 1e-3
