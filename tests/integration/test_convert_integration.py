"""The converter's files in a real ComfyUI: our Q4_K_M / Q8_0 GGUFs load in city96's ComfyUI-GGUF (UnetLoaderGGUF,
linked into the server's custom_nodes from GGUF_NODE_PATH) and in our loader with the same latents; our
fp8_e4m3fn_scaled (comfy_quant) file loads in core's own UNETLoader where core reads comfy_quant natively (v0.29) and
matches ours; and the Convert node runs inside the server (progress, summary, file next to its source).

FLUX.2 ([dev]- and [klein]-shaped tiny models, tests/fixtures/flux2.py): the converted GGUFs / fp8 / NF4 files run
through our LowVRAMModelLoader (and the GGUFs through ComfyUI-GGUF) in ComfyUI's FLUX.2 edit graph
(test_flux2_loader.py's), against core's UNETLoader on the bf16 original; on a host that predates FLUX.2 (v0.3.64)
those tests skip.

Metric: relative L2 distance of the sampled latents (SaveLatent, 2 euler steps, same seed), as in
test_lowvram_model_loader.py and test_flux2_loader.py.
"""
import os

import pytest
import torch

import comfy_harness as H
from fixtures.flux2 import random_flux2_state_dict
from kontext_lowvram.loaders.convert import convert
from test_flux2_loader import MODELS as FLUX2_MODELS
from test_flux2_loader import TEST_NODES as FLUX2_TEST_NODES
from test_flux2_loader import flux2_edit_graph, needs_flux2

# bound vs core bf16 on the source (2 steps, ~1.5x the errors test_lowvram_model_loader.py measures per base type)
VS_BF16 = {"Q8_0": 0.03, "Q4_K_M": 0.30, "fp8_e4m3fn_scaled": 0.10}
SAME = 5e-3  # two loaders dequantizing the same blocks: only their compute order differs
# FLUX.2, vs core bf16 on the source: above the errors measured on v0.29 (CPU, 2 steps, fixed seeds; dev / klein:
# Q8_0 0.016 / 0.011, Q4_K_M 0.198 / 0.134, fp8 0.078 / 0.055, nf4 0.269 / 0.184). These random tiny models are far
# from a trained model's error, so this bound is loose; the same-file comparisons against ComfyUI-GGUF and core's
# comfy_quant below are the tight ones.
FLUX2_VS_BF16 = {"Q8_0": 0.03, "Q4_K_M": 0.25, "fp8_e4m3fn_scaled": 0.10, "nf4": 0.30}


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
    # random text tensors / reference latents for the FLUX.2 graph (test-only nodes)
    (s.custom_nodes_dir / "klv_flux2_test_nodes.py").write_text(FLUX2_TEST_NODES, encoding="utf-8")
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


# ---------------------------------------------------------------- FLUX.2

def flux2_latent(server, model_node, kind, prefix):
    lat = server.saved_latent(server.run(flux2_edit_graph(model_node, kind, prefix=prefix), timeout=900))
    assert lat.shape == (1, 128, 8, 8) and torch.isfinite(lat).all()
    return lat


@pytest.fixture(scope="module")
def flux2_sources(server):
    """{kind: path} of random bf16 FLUX.2 single files ([dev]: no prefix; [klein]: a model.diffusion_model.-prefixed
    checkpoint, as ComfyUI saves them) in models/diffusion_models."""
    out = {}
    for kind, cfg in FLUX2_MODELS.items():
        sd = random_flux2_state_dict(cfg, seed=31 if kind == "dev" else 32)
        if kind == "klein":
            sd = {f"model.diffusion_model.{k}": v for k, v in sd.items()}
        path = server.models_dir / "diffusion_models" / f"klv_convert_flux2_{kind}_bf16.safetensors"
        H.save_safetensors(sd, path)
        out[kind] = path
    return out


@pytest.fixture(scope="module")
def flux2_baselines(server, flux2_sources):
    """Core's UNETLoader on each bf16 original."""
    return {kind: flux2_latent(server, H.unet_loader_node(path.name), kind, f"conv2_ref_{kind}")
            for kind, path in flux2_sources.items()}


@pytest.fixture(scope="module")
def flux2_converted(server, flux2_sources):
    cache = {}

    def get(kind, to):
        if (kind, to) not in cache:
            suffix = ".gguf" if to not in ("fp8_e4m3fn_scaled", "nf4") else ".safetensors"
            out = server.models_dir / "diffusion_models" / f"klv_converted_flux2_{kind}_{to}{suffix}"
            report = convert(flux2_sources[kind], out, to)
            assert report.kind == "flux2"
            print(report.summary())
            cache[(kind, to)] = out.name
        return cache[(kind, to)]
    return get


@needs_flux2
@pytest.mark.parametrize("kind", list(FLUX2_MODELS))
@pytest.mark.parametrize("to", ["Q8_0", "Q4_K_M", "fp8_e4m3fn_scaled", "nf4"])
def test_converted_flux2_runs_in_our_loader(server, flux2_converted, flux2_baselines, kind, to):
    lat = flux2_latent(server, ours(flux2_converted(kind, to)), kind, f"conv2_ours_{kind}_{to}")
    err = rel(lat, flux2_baselines[kind])
    print(f"{server.version} FLUX.2 {kind} {to}: ours vs core bf16 {err:.4f} (bound {FLUX2_VS_BF16[to]})")
    assert 0 < err < FLUX2_VS_BF16[to]  # > 0: the quantized weights were really used


@needs_flux2
@pytest.mark.parametrize("kind", list(FLUX2_MODELS))
@pytest.mark.parametrize("to", ["Q8_0", "Q4_K_M"])
def test_converted_flux2_gguf_runs_in_comfyui_gguf_like_ours(server, flux2_converted, flux2_baselines, kind, to):
    if not server.gguf_node:
        pytest.skip("set GGUF_NODE_PATH to city96's ComfyUI-GGUF checkout to load our GGUFs in it")
    name = flux2_converted(kind, to)
    assert not server.custom_node_import_failed("ComfyUI-GGUF"), server.log_tail()
    theirs = flux2_latent(server, H.node("UnetLoaderGGUF", unet_name=name), kind, f"conv2_gguf_{kind}_{to}")
    mine = flux2_latent(server, ours(name), kind, f"conv2_ours_{kind}_{to}")
    same, err = rel(mine, theirs), rel(theirs, flux2_baselines[kind])
    print(f"{server.version} FLUX.2 {kind} {to}: ours vs ComfyUI-GGUF {same:.2e}; ComfyUI-GGUF vs bf16 {err:.4f}")
    assert same < SAME
    assert 0 < err < FLUX2_VS_BF16[to]


@needs_flux2
def test_converted_flux2_fp8_loads_in_core_natively_and_matches_ours(server, comfy_root, flux2_converted,
                                                                      flux2_baselines):
    if not core_reads_comfy_quant(comfy_root):
        pytest.skip(f"ComfyUI {server.version} predates comfy_quant")
    name = flux2_converted("dev", "fp8_e4m3fn_scaled")
    core = flux2_latent(server, H.unet_loader_node(name), "dev", "conv2_core_fp8")
    mine = flux2_latent(server, ours(name), "dev", "conv2_ours_fp8_again")
    same, err = rel(mine, core), rel(core, flux2_baselines["dev"])
    print(f"{server.version} FLUX.2 dev fp8_e4m3fn_scaled: ours vs core's native comfy_quant {same:.2e}; "
          f"core vs bf16 {err:.4f}")
    assert 0 < err < FLUX2_VS_BF16["fp8_e4m3fn_scaled"]
    assert same < 0.02
