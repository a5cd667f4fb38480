"""Is a state dict a FLUX-family transformer in BFL / ComfyUI naming, and which one: the checks every diffusion-model
file passes before the host sees it. No ComfyUI import.

Which architecture a file is, and whether this ComfyUI runs it, is the host's own model detection's call
(host/model.py asks comfy.model_detection and checks the module it builds against the file). Here:

- the FLUX family, by the keys ComfyUI's detection tells it by (double_blocks.0.img_attn.norm.key_norm + img_in, or
  Chroma's distilled_guidance_layer): FLUX.1 (dev / schnell / Kontext / Fill / Depth / Canny), FLUX.2 ([dev],
  [klein]), Chroma, and whatever else the host builds from those keys;
- bounded checks that hold for any of them, so a hostile or damaged file fails naming itself, the tensor and what is
  wrong: no empty dimension, biases and norm scales 1-D, other weights 2-D (linear) or 4-D (conv), a bias as long as
  its weight's rows, block numbers without gaps;
- a file that has a layout this pack knows (FLUX.1: per-block modulation + GELU MLP + vector_in; FLUX.2: the shared
  modulation) is held to it exactly (loaders/flux_layout.py, loaders/flux2_layout.py), and its config recorded.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .flux_layout import TRANSFORMER_PREFIXES, FluxConfig, _canonical_key, _count_blocks, _shape_of, \
    detect_flux_config, strip_transformer_prefix
from .flux2_layout import FLUX2_MARK, Flux2Config, detect_flux2_config, flux2_variant

__all__ = ["Transformer", "check_transformer", "check_ranks", "in_words", "FAMILY_KEYS"]

#: What ComfyUI's model detection tells the FLUX family by (comfy/model_detection.py, v0.3.64 and v0.29).
FAMILY_KEYS = ("double_blocks.0.img_attn.norm.key_norm.scale",
               ("img_in.weight", "distilled_guidance_layer.norms.0.scale", "distilled_guidance_layer.0.norms.0.scale"))
FLUX1_KEYS = ("double_blocks.0.img_mod.lin.weight", "double_blocks.0.img_mlp.0.weight", "vector_in.in_layer.weight")
CHROMA_MARK = "distilled_guidance_layer."
DIFFUSERS_MARKS = ("transformer_blocks.", "single_transformer_blocks.")
BLOCK_LISTS = ("double_blocks.", "single_blocks.", "distilled_guidance_layer.layers.", "nerf_blocks.")
_NORM = re.compile(r"(^|[._])norms?([._]|\d|$)|_norm(\.|$)")


@dataclass(frozen=True)
class Transformer:
    """What check_transformer found: `name` in words ("FLUX.1", "FLUX.2 [dev]", "Chroma", ...), `family` (the part
    before any variant: "FLUX.1", "FLUX.2", "Chroma", "FLUX-family") and the config of a layout this pack knows."""
    name: str
    family: str
    config: FluxConfig | Flux2Config | None = None


def _shapes(state_dict) -> dict[str, tuple]:
    sd = {}
    for k, v in state_dict.items():
        if any(k.startswith(p) for p in TRANSFORMER_PREFIXES):
            sd[_canonical_key(strip_transformer_prefix(k))] = _shape_of(v)
    return sd or {_canonical_key(k): _shape_of(v) for k, v in state_dict.items()}


def _is_norm(key: str) -> bool:
    layer = key.rsplit(".", 1)[0]
    return bool(_NORM.search(layer))


def check_ranks(sd: dict[str, tuple]) -> None:
    """The bounded checks every FLUX-family file passes (ValueError naming the first tensor that does not)."""
    for key, shape in sd.items():
        if key.split(".")[-1].startswith("__"):  # flag tensors (Chroma Radiance's __x0__, ...): never a weight
            continue
        if any(d <= 0 for d in shape):
            raise ValueError(f"tensor {key} has an empty dimension {shape}")
        leaf = key.rsplit(".", 1)[-1]
        if leaf in ("bias", "scale") or (leaf == "weight" and _is_norm(key)):
            if len(shape) != 1:
                raise ValueError(f"tensor {key} has shape {shape}: a {'bias' if leaf == 'bias' else 'norm scale'} "
                                 "is 1-D")
        elif leaf == "weight" and len(shape) not in (2, 4):
            raise ValueError(f"tensor {key} has shape {shape}: a layer's weight is 2-D (linear) or 4-D (conv)")
        if leaf == "bias":
            w = sd.get(key[: -len("bias")] + "weight")
            if w is not None and len(w) in (2, 4) and w[0] != shape[0]:
                raise ValueError(f"tensor {key} has {shape[0]} values for a weight of {w[0]} rows {w}")
    for prefix in BLOCK_LISTS:
        _count_blocks(sd, prefix)  # ValueError on gaps in the block numbering


def check_transformer(state_dict) -> Transformer:
    """The FLUX-family transformer a key -> shape mapping (or state dict) holds; ValueError saying why when it holds
    none, or when its tensors fail the checks above."""
    sd = _shapes(state_dict)
    if not sd:
        raise ValueError("the state dict is empty")
    if any(k.startswith(DIFFUSERS_MARKS) for k in sd):
        raise ValueError("keys look like the diffusers layout (transformer_blocks.*); convert it to BFL names first")
    norm, inputs = FAMILY_KEYS
    if norm not in sd or not any(k in sd for k in inputs):
        want = [k for k in (norm, inputs[0]) if k not in sd]
        sample = ", ".join(sorted(sd)[:5])
        raise ValueError(f"missing {want} (first keys seen: {sample}{', ...' if len(sd) > 5 else ''})")
    check_ranks(sd)
    if FLUX2_MARK in sd:
        cfg = detect_flux2_config(sd)
        return Transformer(f"FLUX.2 {flux2_variant(cfg)}", "FLUX.2", cfg)
    if any(k.startswith(CHROMA_MARK) for k in sd):
        return Transformer("Chroma" + (" Radiance" if "img_in.weight" not in sd else ""), "Chroma")
    if all(k in sd for k in FLUX1_KEYS):
        return Transformer("FLUX.1", "FLUX.1", detect_flux_config(sd))
    return Transformer("FLUX-family transformer", "FLUX-family")


def in_words(name) -> str:
    """'a FLUX.2 [dev] transformer' for messages, from a Transformer's name (None: 'a diffusion model')."""
    if not name:
        return "a diffusion model"
    return f"a {name}" + ("" if name.endswith("transformer") else " transformer")
