"""The converter's files in a real ComfyUI: our Q4_K_M / Q8_0 GGUFs load in city96's ComfyUI-GGUF (UnetLoaderGGUF,
linked into the server's custom_nodes from GGUF_NODE_PATH) and in our loader with the same latents; our
fp8_e4m3fn_scaled (comfy_quant) file loads in core's own UNETLoader where core reads comfy_quant natively (v0.29) and
matches ours; and the Convert node runs inside the server (progress, summary, file next to its source).

Metric: relative L2 distance of the sampled latents (SaveLatent, 2 euler steps, same seed), as in
test_lowvram_model_loader.py.
"""
import os

import pytest
import torch

import comfy_harness as H
from kontext_lowvram.loaders.convert import convert

# bound vs core bf16 on the source (2 steps, ~1.5x the errors test_lowvram_model_loader.py measures per base type)
VS_BF16 = {"Q8_0": 0.03, "Q4_K_M": 0.30, "fp8_e4m3fn_scaled": 0.10}
SAME = 5e-3  # two loaders dequantizing the same blocks: only their compute order differs


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def server(comfy_root):
    """A ComfyUI with this pack and, when GGUF_NODE_PATH is set, city96's ComfyUI-GGUF in its custom_nodes."""
    s = H.ComfyServer(comfy_root)
    gguf_node = os.environ.get("GGUF_NODE_PATH", "").strip()
    s.gguf_node = bool(gguf_node) and os.path.isfile(os.path.join(gguf_node, "nodes.py"))
    if s.gguf_node:
        (s.custom_nodes_dir / "ComfyUI-GGUF").symlink_to(os.path.abspath(gguf_node), target_is_directory=True)
    try:
        s.start(timeout=300)
        yield s
    finally:
        s.cleanup()


@pytest.fixture(scope="module")
def source(server, comfy_root):
    cfg = H.flux_test_config(comfy_root)
    name = f"klv_convert_src_h{cfg.hidden_size}.safetensors"
    path = server.models_dir / "diffusion_models" / name
    H.write_flux_transformer(path, cfg, seed=11)
    return name, path


@pytest.fixture(scope="module")
def converted(server, source):
    cache = {}

    def get(to):
        if to not in cache:
            suffix = ".gguf" if to != "fp8_e4m3fn_scaled" else ".safetensors"
            out = server.models_dir / "diffusion_models" / f"klv_converted_{to}{suffix}"
            report = convert(source[1], out, to)
            print(report.summary())
            cache[to] = out.name
        return cache[to]
    return get


def latent(server, model_node, prefix):
    out = server.run(H.kontext_edit_graph(model_node, seed=7, prefix=prefix), timeout=1800)
    lat = server.saved_latent(out)
    assert torch.isfinite(lat).all()
    return lat


@pytest.fixture(scope="module")
def baseline(server, source):
    return latent(server, H.unet_loader_node(source[0]), "conv_ref_bf16")


def ours(name):
    return H.node("LowVRAMModelLoader", model_name=name, compute_dtype="default", convert_on_load="none")


@pytest.mark.parametrize("to", ["Q8_0", "Q4_K_M"])
def test_our_gguf_loads_in_comfyui_gguf_and_ours_alike(server, converted, baseline, to):
    if not server.gguf_node:
        pytest.skip("set GGUF_NODE_PATH to city96's ComfyUI-GGUF checkout to load our GGUFs in it")
    name = converted(to)
    assert not server.custom_node_import_failed("ComfyUI-GGUF"), server.log_tail()
    theirs = latent(server, H.node("UnetLoaderGGUF", unet_name=name), f"conv_gguf_{to}")
    mine = latent(server, ours(name), f"conv_ours_{to}")
    same, err = rel(mine, theirs), rel(theirs, baseline)
    print(f"{server.version} {to}: ours vs ComfyUI-GGUF {same:.2e}; ComfyUI-GGUF vs bf16 {err:.4f}")
    assert same < SAME
    assert 0 < err < VS_BF16[to]


def core_reads_comfy_quant(root) -> bool:
    """Whether this core converts `_quantization_metadata` / `comfy_quant` layers itself (v0.4+; v0.3.64 does not)."""
    return "_quantization_metadata" in (root / "comfy" / "utils.py").read_text(encoding="utf-8", errors="replace")


@pytest.fixture(scope="module")
def ours_fp8(server, converted):
    return latent(server, ours(converted("fp8_e4m3fn_scaled")), "conv_ours_fp8")


def test_our_fp8_loads_in_our_loader(server, ours_fp8, baseline):
    err = rel(ours_fp8, baseline)
    print(f"{server.version} fp8_e4m3fn_scaled: ours vs bf16 {err:.4f}")
    assert 0 < err < VS_BF16["fp8_e4m3fn_scaled"]


def test_our_fp8_loads_in_core_natively_and_matches_ours(server, comfy_root, converted, ours_fp8, baseline):
    if not core_reads_comfy_quant(comfy_root):
        pytest.skip(f"ComfyUI {server.version} predates comfy_quant: its UNETLoader would read this file's fp8 "
                    "weights without their weight_scale (core loads comfy_quant natively from v0.4 on)")
    core = latent(server, H.unet_loader_node(converted("fp8_e4m3fn_scaled")), "conv_core_fp8")
    same, err = rel(ours_fp8, core), rel(core, baseline)
    print(f"{server.version} fp8_e4m3fn_scaled: ours vs core's native comfy_quant {same:.2e}; core vs bf16 {err:.4f}")
    assert 0 < err < VS_BF16["fp8_e4m3fn_scaled"]  # core applied the weight scales
    assert same < 0.02


def test_convert_node_runs_in_comfyui(server, source):
    info = server.object_info("LowVRAMConvert")["LowVRAMConvert"]
    assert info["category"] == "Kontext LowVRAM/utils" and info["output"] == ["STRING"]
    req = info["input"]["required"]
    assert f"diffusion_models/{source[0]}" in req["source"][0] and "Q4_K_M" in req["target_type"][0]
    graph = {"convert": H.node("LowVRAMConvert", source=f"diffusion_models/{source[0]}", target_type="Q8_0",
                               output_name="klv_node_q8", overwrite=True, verify=True)}
    out = server.run(graph, timeout=1800)
    text = "\n".join(out["convert"]["text"])
    assert "klv_node_q8.gguf" in text and "relative L2 error" in text and "Q8_0 x" in text
    assert (server.models_dir / "diffusion_models" / "klv_node_q8.gguf").is_file()
    assert (server.models_dir / "diffusion_models" / "klv_node_q8.gguf.sha256").is_file()
    loader = server.object_info("LowVRAMModelLoader")["LowVRAMModelLoader"]["input"]["required"]["model_name"][0]
    assert "klv_node_q8.gguf" in loader  # listed by the loaders at once
