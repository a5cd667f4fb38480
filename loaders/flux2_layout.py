"""FLUX.2 transformer layout ([dev], [klein] 4B / 9B) as BFL / ComfyUI checkpoints name it.

Names and shapes only, no ComfyUI import (tests/fixtures/flux2.py fills them with random values). They follow the
modules ComfyUI v0.29 builds for ``image_model="flux2"`` (``comfy/ldm/flux/model.py`` and ``layers.py`` with
``global_modulation``, ``mlp_silu_act``, ``ops_bias=False``, ``qkv_bias=False``; tests/integration/test_flux2_loader.py
instantiates them on the meta device and compares): compared with FLUX.1

- no biases anywhere, no ``vector_in`` (no pooled text vector), ``guidance_in`` only where the model has a guidance
  embedding ([dev]; [klein] has none);
- no per-block modulation: three shared layers, ``double_stream_modulation_img`` / ``_txt`` (6 x hidden out) and
  ``single_stream_modulation`` (3 x hidden out), computed once per step;
- a SwiGLU MLP (``mlp_ratio`` 3): the MLP's input projection is ``2 x mlp_hidden`` wide (gate and value), its output
  projection takes ``mlp_hidden``; the single blocks' ``linear1`` is ``3 x hidden + 2 x mlp_hidden`` wide;
- patch size 1 on a 128-channel latent (the 32-channel VAE latent, 2 x 2 packed by the VAE): ``img_in`` takes 128,
  ``final_layer.linear`` gives 128; head dim 128 (ComfyUI: heads = hidden / sum(axes_dim) = hidden / 128).

QK-norm scales are ``*_norm.scale`` as in the files (ComfyUI renames them ``*_norm.weight`` in memory).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .flux_layout import (TRANSFORMER_PREFIXES, DiTConfigChecks, _canonical_key, _count_blocks, _shape_of,
                          strip_transformer_prefix)

__all__ = [
    "Flux2Config",
    "FLUX2_DEV",
    "FLUX2_KLEIN_4B",
    "FLUX2_KLEIN_9B",
    "FLUX2_MODELS",
    "FLUX2_MARK",
    "SHARED_MODULATIONS",
    "flux2_tensor_shapes",
    "detect_flux2_config",
    "flux2_variant",
]

#: The key ComfyUI's model detection tells FLUX.2 by (comfy/model_detection.py, v0.29).
FLUX2_MARK = "double_stream_modulation_img.lin.weight"
#: The shared modulation layers (outside the blocks, but as big as a block's attention: quantized like the blocks).
SHARED_MODULATIONS = ("double_stream_modulation_img.", "double_stream_modulation_txt.", "single_stream_modulation.")


@dataclass(frozen=True)
class Flux2Config(DiTConfigChecks):
    """Shape-relevant hyper-parameters of a FLUX.2 transformer. ``in_channels`` / ``out_channels`` are the packed
    latent widths (patch size 1): 128 for every published FLUX.2."""

    hidden_size: int = 6144
    num_heads: int = 48
    depth: int = 8
    depth_single_blocks: int = 48
    in_channels: int = 128
    context_in_dim: int = 15360
    mlp_ratio: float = 3.0
    guidance_embed: bool = True
    out_channels: int = 128

    def tensor_shapes(self) -> dict[str, tuple]:
        return flux2_tensor_shapes(self)


# The published models. context_in_dim is the text encoder's width x 3 (ComfyUI v0.29 stacks three of its hidden
# layers: comfy/text_encoders/flux.py Flux2TEModel; Mistral-Small-3 24B 5120 wide, Qwen3-4B 2560, Qwen3-8B 4096).
# [dev]'s hidden 6144 / 48 heads / 8 + 48 blocks: BFL's flux2 model.py (Flux2Params), 32.2 B parameters here
# (BFL: "32B"). [klein]: BFL's flux2 model.py Klein4BParams / Klein9BParams as ported in public repositories (3072 /
# 24 heads / 5 + 20 blocks, 3.9 B; 4096 / 32 heads / 8 + 24 blocks, 9.1 B) and neither has a guidance embedding —
# ComfyUI reads all of them from the weights, so these numbers only feed the planner and the bench (estimates
# where no real file was at hand to check them against).
FLUX2_DEV = Flux2Config()
FLUX2_KLEIN_4B = Flux2Config(hidden_size=3072, num_heads=24, depth=5, depth_single_blocks=20, context_in_dim=7680,
                             guidance_embed=False)
FLUX2_KLEIN_9B = Flux2Config(hidden_size=4096, num_heads=32, depth=8, depth_single_blocks=24, context_in_dim=12288,
                             guidance_embed=False)
FLUX2_MODELS = {"flux2-dev": FLUX2_DEV, "flux2-klein-4b": FLUX2_KLEIN_4B, "flux2-klein-9b": FLUX2_KLEIN_9B}


def flux2_tensor_shapes(cfg: Flux2Config = FLUX2_DEV) -> dict[str, tuple]:
    """Every FLUX.2 transformer key -> shape, in the order ComfyUI's ``Flux`` module registers them."""
    h, mlp, hd = cfg.hidden_size, cfg.mlp_hidden_dim, cfg.head_dim
    shapes: dict[str, tuple] = {}

    def linear(name: str, out_f: int, in_f: int) -> None:
        shapes[f"{name}.weight"] = (out_f, in_f)  # FLUX.2 has no biases

    def qk_norm(name: str) -> None:
        shapes[f"{name}.query_norm.scale"] = (hd,)
        shapes[f"{name}.key_norm.scale"] = (hd,)

    linear("img_in", h, cfg.in_channels)
    linear("time_in.in_layer", h, 256)
    linear("time_in.out_layer", h, h)
    if cfg.guidance_embed:
        linear("guidance_in.in_layer", h, 256)
        linear("guidance_in.out_layer", h, h)
    linear("txt_in", h, cfg.context_in_dim)

    for i in range(cfg.depth):
        p = f"double_blocks.{i}"
        for stream in ("img", "txt"):
            linear(f"{p}.{stream}_attn.qkv", 3 * h, h)
            qk_norm(f"{p}.{stream}_attn.norm")
            linear(f"{p}.{stream}_attn.proj", h, h)
            linear(f"{p}.{stream}_mlp.0", 2 * mlp, h)  # SwiGLU: gate and value
            linear(f"{p}.{stream}_mlp.2", h, mlp)

    for i in range(cfg.depth_single_blocks):
        p = f"single_blocks.{i}"
        linear(f"{p}.linear1", 3 * h + 2 * mlp, h)
        linear(f"{p}.linear2", h, h + mlp)
        qk_norm(f"{p}.norm")

    linear("final_layer.linear", cfg.out_channels, h)
    linear("final_layer.adaLN_modulation.1", 2 * h, h)
    linear("double_stream_modulation_img.lin", 6 * h, h)
    linear("double_stream_modulation_txt.lin", 6 * h, h)
    linear("single_stream_modulation.lin", 3 * h, h)
    return shapes


def _transformer_shapes(shapes: Mapping[str, Any]) -> dict[str, tuple]:
    sd = {}
    for k, v in shapes.items():
        if any(k.startswith(p) for p in TRANSFORMER_PREFIXES):
            sd[_canonical_key(strip_transformer_prefix(k))] = _shape_of(v)
    return sd or {_canonical_key(k): _shape_of(v) for k, v in shapes.items()}


def detect_flux2_config(shapes: Mapping[str, Any], *, strict: bool = True) -> Flux2Config:
    """Infer the :class:`Flux2Config` from a key -> shape mapping (tensors are accepted too), with or without the
    ``model.diffusion_model.`` prefix, QK-norm scales under ``.scale`` or ``.weight``. Raises :class:`ValueError`
    when the keys are not a FLUX.2 transformer or are incomplete / inconsistent (``strict``: every expected tensor
    present at its shape, rank included). Shapes must be the logical (dequantized) ones."""
    sd = _transformer_shapes(shapes)
    if not sd:
        raise ValueError("not a FLUX.2 transformer: the state dict is empty")
    if FLUX2_MARK not in sd:
        raise ValueError(f"not a FLUX.2 transformer: no {FLUX2_MARK} (FLUX.2's shared modulation)")
    required = ("img_in.weight", "txt_in.weight", "double_blocks.0.img_attn.norm.key_norm.scale",
                "double_blocks.0.img_mlp.2.weight", "final_layer.linear.weight")
    missing = [k for k in required if k not in sd]
    if missing:
        raise ValueError(f"incomplete FLUX.2 transformer: missing {missing}")
    img_in, mlp_out = sd["img_in.weight"], sd["double_blocks.0.img_mlp.2.weight"]
    head_dim = sd["double_blocks.0.img_attn.norm.key_norm.scale"]
    if len(img_in) != 2 or len(head_dim) != 1 or len(mlp_out) != 2 or head_dim[0] <= 0 or img_in[0] % head_dim[0]:
        raise ValueError(f"not a FLUX.2 transformer: img_in.weight {img_in} / qk-norm dim {head_dim} / "
                         f"img_mlp.2.weight {mlp_out} inconsistent")
    hidden = img_in[0]
    cfg = Flux2Config(
        hidden_size=hidden,
        num_heads=hidden // head_dim[0],
        depth=_count_blocks(sd, "double_blocks."),
        depth_single_blocks=_count_blocks(sd, "single_blocks."),
        in_channels=img_in[1],
        context_in_dim=sd["txt_in.weight"][-1],
        mlp_ratio=mlp_out[1] / hidden,
        guidance_embed="guidance_in.in_layer.weight" in sd,
        out_channels=sd["final_layer.linear.weight"][0],
    )
    if not strict:
        return cfg
    expected = flux2_tensor_shapes(cfg)
    absent = [k for k in expected if k not in sd]
    if absent:
        raise ValueError(f"incomplete FLUX.2 transformer: {len(absent)} expected tensor(s) missing, e.g. {absent[:5]}")
    wrong = [(k, sd[k], s) for k, s in expected.items() if sd[k] != s]
    if wrong:
        k, got, want = wrong[0]
        raise ValueError(f"inconsistent FLUX.2 transformer shapes ({len(wrong)} mismatches), e.g. {k}: {got} != "
                         f"expected {want}")
    return cfg


def flux2_variant(cfg: Flux2Config) -> str:
    """Which published FLUX.2 a config is, in words: "[dev]", "[klein] 4B", "[klein] 9B", or its shape."""
    for name, known in FLUX2_MODELS.items():
        if cfg == known:
            return {"flux2-dev": "[dev]", "flux2-klein-4b": "[klein] 4B", "flux2-klein-9b": "[klein] 9B"}[name]
    return ("[dev]-like" if cfg.guidance_embed else "[klein]-like") + \
        f" (hidden {cfg.hidden_size}, {cfg.depth} + {cfg.depth_single_blocks} blocks)"
