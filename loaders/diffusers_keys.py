"""diffusers-layout FLUX transformer names -> BFL names (what ComfyUI, city96's GGUFs and this pack use).

The same correspondence as ComfyUI's `comfy.utils.flux_to_diffusers` and diffusers' own
`convert_flux_to_diffusers.py`, run the other way: diffusers splits BFL's fused tensors, so a BFL tensor is the
concatenation (along dim 0) of one or more diffusers tensors, and `norm_out.linear` stores the final modulation's
two halves as (shift, scale) where BFL has (scale, shift).
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


def is_diffusers_flux(keys) -> bool:
    keys = set(keys)
    return "x_embedder.weight" in keys and any(k.startswith("transformer_blocks.") for k in keys) and \
        "context_embedder.weight" in keys


def _count(keys, pattern) -> int:
    idx = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(idx) + 1 if idx else 0


def bfl_recipes(keys) -> tuple[dict[str, Recipe], list[str]]:
    """({BFL name: Recipe}, diffusers names no recipe uses). Only names present in `keys` are used; a fused
    tensor whose parts are not all present is left out (the caller's shape check reports it as missing)."""
    keys = set(keys)
    out: dict[str, Recipe] = {}

    def add(bfl, parts, transform=None):
        if all(p in keys for p in parts):
            out[bfl] = Recipe(tuple(parts), transform)

    for end in ("weight", "bias"):
        for d, b in GLOBAL_1TO1.items():
            add(f"{b}.{end}", [f"{d}.{end}"])
        for d, b in GLOBAL_SWAPPED.items():
            add(f"{b}.{end}", [f"{d}.{end}"], SWAP_SCALE_SHIFT)
    for i in range(_count(keys, _DOUBLE)):
        src, dst = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for end in ("weight", "bias"):
            for d, b in DOUBLE_1TO1.items():
                add(f"{dst}{b}.{end}", [f"{src}{d}.{end}"])
            for b, ds in DOUBLE_FUSED.items():
                add(f"{dst}{b}.{end}", [f"{src}{d}.{end}" for d in ds])
        for d, b in DOUBLE_NORMS.items():
            add(dst + b, [src + d])
    for i in range(_count(keys, _SINGLE)):
        src, dst = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for end in ("weight", "bias"):
            for d, b in SINGLE_1TO1.items():
                add(f"{dst}{b}.{end}", [f"{src}{d}.{end}"])
            for b, ds in SINGLE_FUSED.items():
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
    """diffusers' norm_out.linear (shift, scale) -> BFL's final_layer.adaLN_modulation.1 (scale, shift)."""
    import torch
    shift, scale = t.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)
