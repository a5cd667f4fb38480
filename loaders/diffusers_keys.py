"""diffusers-layout FLUX transformer names -> BFL names (what ComfyUI, city96's GGUFs and this pack use).

FLUX.1 (FluxTransformer2DModel): the same correspondence as ComfyUI's `comfy.utils.flux_to_diffusers` and diffusers'
own `scripts/convert_flux_to_diffusers.py`, run the other way. FLUX.2 (Flux2Transformer2DModel): diffusers'
`scripts/convert_flux2_to_diffusers.py` run the other way (its FLUX2_TRANSFORMER_KEYS_RENAME_DICT and the double /
single block maps): the double blocks' qkv are split into to_q / to_k / to_v (add_*_proj for the text stream) as
in FLUX.1, everything else is 1:1 (the single blocks' fused `attn.to_qkv_mlp_proj` stays fused, the SwiGLU's gate /
value halves keep their order). In both, a BFL tensor is the concatenation (along dim 0) of one or more diffusers
tensors, and `norm_out.linear` stores the final modulation's two halves as (scale, shift) (AdaLayerNormContinuous)
where BFL has (shift, scale) (LastLayer).
"""
from __future__ import annotations

import re
from typing import NamedTuple

SWAP_SCALE_SHIFT = "swap_scale_shift"


class Recipe(NamedTuple):
    parts: tuple  # diffusers names, concatenated along dim 0
    transform: str | None = None


_DOUBLE = re.compile(r"^transformer_blocks\.(\d+)\.")
_SINGLE = re.compile(r"^single_transformer_blocks\.(\d+)\.")

# diffusers suffix inside a double block -> BFL suffix (1:1)
DOUBLE_1TO1 = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
}
DOUBLE_NORMS = {
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
}
DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
SINGLE_1TO1 = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
SINGLE_NORMS = {"attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}
SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
GLOBAL_1TO1 = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
}
GLOBAL_SWAPPED = {"norm_out.linear": "final_layer.adaLN_modulation.1"}

# FLUX.2 (Flux2Transformer2DModel; no biases, shared modulations, SwiGLU MLPs)
FLUX2_GLOBAL_1TO1 = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
}
FLUX2_DOUBLE_1TO1 = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
FLUX2_SINGLE_1TO1 = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
#: The key a diffusers FLUX.2 transformer has and a FLUX.1 one does not.
FLUX2_DIFFUSERS_MARK = "double_stream_modulation_img.linear.weight"


class Layout(NamedTuple):
    """One family's diffusers -> BFL tables."""
    family: str
    global_1to1: dict
    double_1to1: dict
    double_fused: dict
    single_1to1: dict
    single_fused: dict


FLUX1 = Layout("FLUX.1", GLOBAL_1TO1, DOUBLE_1TO1, DOUBLE_FUSED, SINGLE_1TO1, SINGLE_FUSED)
FLUX2 = Layout("FLUX.2", FLUX2_GLOBAL_1TO1, FLUX2_DOUBLE_1TO1, DOUBLE_FUSED, FLUX2_SINGLE_1TO1, {})


def is_diffusers_flux(keys) -> bool:
    """A diffusers-layout FLUX.1 or FLUX.2 transformer."""
    keys = set(keys)
    return "x_embedder.weight" in keys and any(k.startswith("transformer_blocks.") for k in keys) and \
        "context_embedder.weight" in keys


def diffusers_layout(keys) -> Layout:
    """FLUX2 for a Flux2Transformer2DModel's names, else FLUX1."""
    return FLUX2 if FLUX2_DIFFUSERS_MARK in set(keys) else FLUX1


def _count(keys, pattern) -> int:
    idx = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(idx) + 1 if idx else 0


def bfl_recipes(keys, layout: Layout | None = None) -> tuple[dict[str, Recipe], list[str]]:
    """({BFL name: Recipe}, diffusers names no recipe uses), by `layout`'s tables (default: diffusers_layout(keys)).
    Only names present in `keys` are used; a fused tensor whose parts are not all present is left out (the caller's
    shape check reports it as missing)."""
    keys = set(keys)
    lay = layout or diffusers_layout(keys)
    out: dict[str, Recipe] = {}

    def add(bfl, parts, transform=None):
        if all(p in keys for p in parts):
            out[bfl] = Recipe(tuple(parts), transform)

    for end in ("weight", "bias"):
        for d, b in lay.global_1to1.items():
            add(f"{b}.{end}", [f"{d}.{end}"])
        for d, b in GLOBAL_SWAPPED.items():
            add(f"{b}.{end}", [f"{d}.{end}"], SWAP_SCALE_SHIFT)
    for i in range(_count(keys, _DOUBLE)):
        src, dst = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for end in ("weight", "bias"):
            for d, b in lay.double_1to1.items():
                add(f"{dst}{b}.{end}", [f"{src}{d}.{end}"])
            for b, ds in lay.double_fused.items():
                add(f"{dst}{b}.{end}", [f"{src}{d}.{end}" for d in ds])
        for d, b in DOUBLE_NORMS.items():
            add(dst + b, [src + d])
    for i in range(_count(keys, _SINGLE)):
        src, dst = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for end in ("weight", "bias"):
            for d, b in lay.single_1to1.items():
                add(f"{dst}{b}.{end}", [f"{src}{d}.{end}"])
            for b, ds in lay.single_fused.items():
                add(f"{dst}{b}.{end}", [f"{src}{d}.{end}" for d in ds])
        for d, b in SINGLE_NORMS.items():
            add(dst + b, [src + d])
    used = {p for r in out.values() for p in r.parts}
    return out, sorted(keys - used)


def recipe_shape(recipe: Recipe, shapes) -> tuple:
    """The BFL tensor's shape from its parts' shapes (concatenated along dim 0)."""
    first = tuple(shapes[recipe.parts[0]])
    return (sum(int(shapes[p][0]) for p in recipe.parts),) + first[1:]


def swap_scale_shift(t):
    """diffusers' norm_out.linear (scale, shift) -> BFL's final_layer.adaLN_modulation.1 (shift, scale)."""
    import torch
    scale, shift = t.chunk(2, dim=0)
    return torch.cat([shift, scale], dim=0)
