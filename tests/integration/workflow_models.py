"""Tiny real-layout files under the exact names a bundled workflow asks for, so the workflow runs as shipped.

A workflow's loaders name the files people download (flux1-kontext-dev-Q4_K_M.gguf, t5xxl_fp8_e4m3fn_scaled
.safetensors, ae.safetensors, ...). Each gets a random file of the same format and layout, small enough for a CPU:
the diffusion model at the host's smallest FLUX width (comfy_harness.flux_test_config), GGUF block linears in
the file name's quant type with img_in / txt_in / embedders F16 and 1-D tensors F32 (city96's mix), fp8 files
scaled; a full-size random CLIP-L; a one-layer T5 4096 wide (FLUX's txt_in takes 4096 features); the FLUX VAE; a
kohya-format LoRA; a 128 px input image.

For a CPU run a workflow also needs fewer steps and a small image: `cpu_sized(workflow)` sets the sampler's steps
and bypasses FluxKontextImageScale (which would scale any image to ~1 megapixel), as a person would by hand.
"""
import copy
import re
from pathlib import Path

import torch

import comfy_harness as H
from fixtures.gguf_blocks import random_blocks
from fixtures.text_encoders import random_state_dict
from kontext_lowvram.loaders.keys import should_quantize
from kontext_lowvram.loaders.text_encoders import clip_l_tensor_shapes, is_linear_weight, t5_tensor_shapes
from kontext_lowvram.loaders.writers import write_gguf, write_safetensors
from kontext_lowvram.optimizations import QTensor, quantize

WIDE_T5 = {"d_model": 4096, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 1}
GGUF_TYPE = re.compile(r"-(Q\d_K|Q\d_\d|IQ4_XS)(?:_[SML])?\.gguf$")
CPU_STEPS = 2
BYPASS = 4


def diffusion_model(path: Path, cfg, seed: int = 0) -> None:
    """A random FLUX transformer in the format its file name says."""
    sd = H.random_flux_state_dict(cfg, seed=seed, dtype=torch.bfloat16, std=H.init_std(cfg))
    m = GGUF_TYPE.search(path.name)
    if path.suffix == ".gguf":
        if not m:
            raise ValueError(f"no GGUF quant type in {path.name}")
        qtype = m.group(1)
        out = {}
        for i, (k, v) in enumerate(sd.items()):
            if not should_quantize(k, v.shape):
                out[k] = v.float() if v.ndim == 1 else v.half()
            elif qtype == "Q8_0":
                out[k] = quantize(v.float(), "Q8_0")
            else:  # K-quants: gguf-py cannot quantize them, random valid blocks at the same scale
                out[k] = QTensor(random_blocks(qtype, v.shape, std=H.init_std(cfg), seed=seed + i), qformat="gguf",
                                 shape=v.shape, meta={"qtype": qtype})
        write_gguf(path, out)
    elif "fp8" in path.name:
        write_safetensors(path, {k: quantize(v.float(), "fp8_e4m3fn_scaled") if should_quantize(k, v.shape) else v
                                 for k, v in sd.items()}, fp8_style="scaled")
    else:
        H.save_safetensors(sd, path)


def text_encoder(path: Path, seed: int) -> None:
    if "clip_l" in path.name:
        H.save_safetensors(random_state_dict(clip_l_tensor_shapes(), seed=seed, std=0.02), path)
        return
    t5 = random_state_dict(t5_tensor_shapes(WIDE_T5), seed=seed, std=0.05)
    if "fp8" in path.name:
        write_safetensors(path, {k: quantize(v.float(), "fp8_e4m3fn_scaled") if is_linear_weight(k) else v
                                 for k, v in t5.items()}, fp8_style="scaled")
    elif path.suffix == ".safetensors":
        H.save_safetensors({k: v.half() for k, v in t5.items()}, path)
    else:
        raise ValueError(f"no test T5 writer for {path.name}")


def write_files(server, workflow: dict, cfg) -> list[Path]:
    """Write every file the workflow's loaders and image loaders name (once per server). Returns the paths."""
    models, written = server.models_dir, []

    def want(path: Path, make):
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            make(path)
        written.append(path)
    for node in workflow["nodes"]:
        t, w = node["type"], node.get("widgets_values") or []
        if t == "LowVRAMModelLoader":
            want(models / "diffusion_models" / w[0], lambda p: diffusion_model(p, cfg))
        elif t == "LowVRAMTextEncoderLoader":
            want(models / "text_encoders" / w[0], lambda p: text_encoder(p, 1))
            want(models / "text_encoders" / w[1], lambda p: text_encoder(p, 2))
        elif t == "VAELoader":
            want(models / "vae" / w[0], H.write_flux_vae)
        elif t in ("LowVRAMLoraLoader", "LoraLoaderModelOnly"):
            want(models / "loras" / w[0], lambda p: H.write_flux_lora(p, cfg))
        elif t == "LoadImage":
            want(server.input_dir / w[0], lambda p: H.write_input_image(p, size=128))
    return written


def cpu_sized(workflow: dict, steps: int = CPU_STEPS) -> dict:
    """A copy that a CPU runs in seconds: `steps` sampler steps, FluxKontextImageScale bypassed."""
    wf = copy.deepcopy(workflow)
    for node in wf["nodes"]:
        if node["type"] == "KSampler":
            node["widgets_values"][2] = steps
        elif node["type"] == "FluxKontextImageScale":
            node["mode"] = BYPASS
    return wf
