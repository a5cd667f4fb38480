"""Tiny real-layout files under the exact names a bundled workflow asks for, so the workflow runs as shipped.

A workflow's loaders name the files people download (flux1-kontext-dev-Q4_K_M.gguf, t5xxl_fp8_e4m3fn_scaled
.safetensors, ae.safetensors, ...). Each gets a random file of the same format and layout, small enough for a CPU:
the diffusion model at the host's smallest FLUX width (comfy_harness.flux_test_config), GGUF block linears in
the file name's quant type with img_in / txt_in / embedders F16 and 1-D tensors F32 (city96's mix), fp8 files
scaled; a full-size random CLIP-L; a one-layer T5 4096 wide (FLUX's txt_in takes 4096 features); the FLUX VAE; a
kohya-format LoRA; a 128 px input image.

FLUX.2 workflows get a tiny FLUX.2 transformer whose txt_in takes what the named text encoder gives (3 of its layers:
Qwen3-4B 3 x 2560, Qwen3-8B 3 x 4096, Mistral-3 3 x 5120), the text encoder at its real width and depth with a few
heads, a small feed-forward and (Qwen3) the real vocabulary (Qwen3 GGUFs as llama.cpp writes them, Q8_0 blocks
whatever type the name says; Mistral fp8 with a byte-level tekken vocabulary), and a random FLUX.2 VAE.

For a CPU run a workflow also needs fewer steps and a small image: `cpu_sized(workflow)` sets the sampler's steps
and bypasses FluxKontextImageScale / ImageScaleToTotalPixels (which would scale any image to ~1 megapixel), as a
person would by hand.
"""
import copy
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import comfy_harness as H
from fixtures.flux2 import TINY_FLUX2_DEV, TINY_FLUX2_KLEIN, random_flux2_state_dict
from fixtures.flux2_vae import random_flux2_vae_state_dict
from fixtures.gguf_blocks import random_blocks
from fixtures.llm_text_encoders import random_llm_state_dict, tiny_tekken, write_llamacpp_llm
from fixtures.text_encoders import random_state_dict
from kontext_lowvram.loaders.keys import should_quantize
from kontext_lowvram.loaders.text_encoders import clip_l_tensor_shapes, is_linear_weight, t5_tensor_shapes
from kontext_lowvram.loaders.text_encoders_llm import LLM_CONFIGS, TEKKEN, is_llm_linear_weight
from kontext_lowvram.loaders.writers import write_gguf, write_safetensors
from kontext_lowvram.optimizations import QTensor, quantize

WIDE_T5 = {"d_model": 4096, "d_ff": 64, "d_kv": 16, "num_heads": 2, "num_layers": 1}
GGUF_TYPE = re.compile(r"-(Q\d_K|Q\d_\d|IQ4_XS)(?:_[SML])?\.gguf$")
CPU_STEPS = 2
BYPASS = 4
SCALED_TO_A_MEGAPIXEL = ("FluxKontextImageScale", "ImageScaleToTotalPixels")
# FLUX.2 text encoders by file name: (ComfyUI model type, reduced sizes); FLUX.2 reads 3 of their layers
LLM_SMALL = {"intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2}
QWEN3_SMALL = {**LLM_SMALL, "num_hidden_layers": 28}
LLM_FILES = {"Qwen3-4B": ("qwen3_4b", QWEN3_SMALL), "qwen_3_4b": ("qwen3_4b", QWEN3_SMALL),
             "Qwen3-8B": ("qwen3_8b", QWEN3_SMALL), "qwen_3_8b": ("qwen3_8b", QWEN3_SMALL),
             "mistral_3_small_flux2": ("mistral3_24b", {"vocab_size": 272, "intermediate_size": 64,
                                                        "num_attention_heads": 1, "num_key_value_heads": 1,
                                                        "num_hidden_layers": 30})}
# FLUX.2 diffusion models by file name: (tiny config, the text encoder whose width txt_in takes)
FLUX2_FILES = {"flux2-dev": (TINY_FLUX2_DEV, "mistral3_24b"), "flux2_dev": (TINY_FLUX2_DEV, "mistral3_24b"),
               "flux-2-klein-4b": (TINY_FLUX2_KLEIN, "qwen3_4b"), "flux-2-klein-9b": (TINY_FLUX2_KLEIN, "qwen3_8b")}


HOST_RUNS_FLUX2 = H.runs_flux2(H.comfy_root_from_env())
STEP_NODES = {"KSampler": 2, "Flux2Scheduler": 0}  # node type -> index of its steps widget


def loadable(workflow: dict) -> bool:
    """Whether this host knows the workflow's models (FLUX.2 needs a host that has it)."""
    return HOST_RUNS_FLUX2 or not is_flux2_workflow(workflow)


def params(paths, runs=False):
    """pytest params of workflow files: FLUX.2 ones skip on a host that predates it; running a FLUX.2 [dev] one
    also needs core's Mistral tokenizer to build with this transformers."""
    out = []
    for path in paths:
        wf, marks = json.loads(path.read_text(encoding="utf-8")), []
        if is_flux2_workflow(wf):
            marks.append(pytest.mark.skipif(not HOST_RUNS_FLUX2, reason=H.predates_reason(H.comfy_root_from_env())))
            if runs and needs_mistral(wf):
                marks.append(pytest.mark.skipif(HOST_RUNS_FLUX2 and not H.mistral_tokenizer_works(),
                                                reason=H.MISTRAL_TOKENIZER_REASON))
        out.append(pytest.param(path, id=path.stem, marks=marks))
    return out


def is_flux2_workflow(workflow: dict) -> bool:
    return any(n["type"] == "LowVRAMLLMTextEncoderLoader" for n in workflow["nodes"])


def needs_mistral(workflow: dict) -> bool:
    return any(n["type"] == "LowVRAMLLMTextEncoderLoader" and n["widgets_values"][0].startswith("mistral")
               for n in workflow["nodes"])


def diffusion_model(path: Path, cfg, seed: int = 0) -> None:
    """A random FLUX transformer in the format its file name says."""
    write_model(path, H.random_flux_state_dict(cfg, seed=seed, dtype=torch.bfloat16, std=H.init_std(cfg)),
                H.init_std(cfg), seed)


def flux2_diffusion_model(path: Path, seed: int = 0) -> None:
    """A tiny FLUX.2 [dev] / [klein] transformer that takes its text encoder's 3 stacked layers."""
    cfg, encoder = next(v for k, v in FLUX2_FILES.items() if path.name.startswith(k))
    cfg = replace(cfg, context_in_dim=3 * LLM_CONFIGS[encoder]["hidden_size"])
    std = 1.2 / cfg.hidden_size ** 0.5
    write_model(path, random_flux2_state_dict(cfg, seed=seed, std=std), std, seed)


def write_model(path: Path, sd: dict, std: float, seed: int) -> None:
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
                out[k] = QTensor(random_blocks(qtype, v.shape, std=std, seed=seed + i), qformat="gguf",
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


def llm_text_encoder(path: Path, seed: int = 3) -> None:
    model_type, cfg = next(v for k, v in LLM_FILES.items() if path.name.startswith(k))
    sd = random_llm_state_dict(model_type, cfg, seed=seed, std=0.05, pruned=model_type == "mistral3_24b")
    if path.suffix == ".gguf":
        write_llamacpp_llm(path, model_type, sd, {**LLM_CONFIGS[model_type], **cfg})
        return
    fp8 = {k: quantize(v.float(), "fp8_e4m3fn") if is_llm_linear_weight(k) else v for k, v in sd.items()}
    if model_type == "mistral3_24b":
        fp8[TEKKEN] = tiny_tekken()  # the byte-level tekken vocabulary core's tokenizer reads
    write_safetensors(path, fp8, fp8_style="scaled")


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
        if t == "LowVRAMModelLoader" and w[0].startswith(tuple(FLUX2_FILES)):
            want(models / "diffusion_models" / w[0], flux2_diffusion_model)
        elif t == "LowVRAMModelLoader":
            want(models / "diffusion_models" / w[0], lambda p: diffusion_model(p, cfg))
        elif t == "LowVRAMLLMTextEncoderLoader":
            want(models / "text_encoders" / w[0], llm_text_encoder)
        elif t == "LowVRAMTextEncoderLoader":
            want(models / "text_encoders" / w[0], lambda p: text_encoder(p, 1))
            want(models / "text_encoders" / w[1], lambda p: text_encoder(p, 2))
        elif t == "VAELoader" and w[0].startswith("flux2"):
            want(models / "vae" / w[0], lambda p: H.save_safetensors(random_flux2_vae_state_dict(), p))
        elif t == "VAELoader":
            want(models / "vae" / w[0], H.write_flux_vae)
        elif t in ("LowVRAMLoraLoader", "LoraLoaderModelOnly"):
            want(models / "loras" / w[0], lambda p: H.write_flux_lora(p, cfg))
        elif t == "LoadImage":
            want(server.input_dir / w[0], lambda p: H.write_input_image(p, size=128))
    return written


def cpu_sized(workflow: dict, steps: int = CPU_STEPS) -> dict:
    """A copy that a CPU runs in seconds: `steps` sampler steps, the scale to a megapixel bypassed."""
    wf = copy.deepcopy(workflow)
    for node in wf["nodes"]:
        if node["type"] in STEP_NODES:
            node["widgets_values"][STEP_NODES[node["type"]]] = steps
        elif node["type"] in SCALED_TO_A_MEGAPIXEL:
            node["mode"] = BYPASS
    return wf
