"""FLUX.1 tensor layout (transformer + VAE) as BFL / ComfyUI checkpoints name it.

Names and shapes only, no ComfyUI import (tests/fixtures/flux.py fills them with random values). They were
checked against the modules ComfyUI builds (``comfy/ldm/flux/model.py`` and
``comfy/ldm/modules/diffusionmodules/model.py``, instantiated on the meta device) in ComfyUI v0.3.64 and v0.29,
and are generated here programmatically from a :class:`FluxConfig`.

The RMSNorm (QK-norm) scales are named ``*_norm.scale`` as in the files; ComfyUI v0.4+ renames
them to ``*_norm.weight`` in memory when it loads a FLUX model.

Transformer keys carry no prefix (``img_in.weight``, ``double_blocks.0.img_attn.qkv.weight``, ...);
full ComfyUI checkpoints prefix them with ``model.diffusion_model.`` which
:func:`detect_flux_config` strips.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = [
    "FluxConfig",
    "FLUX_DEV",
    "FLUX_SCHNELL",
    "TRANSFORMER_PREFIXES",
    "flux_tensor_shapes",
    "detect_flux_config",
    "strip_transformer_prefix",
    "FluxVAEConfig",
    "FLUX_VAE",
    "FLUX_VAE_SHAPES",
    "flux_vae_tensor_shapes",
]


# --------------------------------------------------------------------------------------------
# Transformer
# --------------------------------------------------------------------------------------------

class DiTConfigChecks:
    """What FLUX.1's and FLUX.2's configs share: the checks, the derived widths and the parameter count (from the
    config's own `tensor_shapes()`)."""

    def __post_init__(self):
        if self.hidden_size <= 0 or self.num_heads <= 0:
            raise ValueError(f"hidden_size and num_heads must be positive, got {self.hidden_size}, {self.num_heads}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.depth < 0 or self.depth_single_blocks < 0:
            raise ValueError("depth and depth_single_blocks must be >= 0")
        if self.mlp_hidden_dim <= 0 or self.in_channels <= 0 or self.out_channels <= 0 or self.context_in_dim <= 0:
            raise ValueError("mlp_ratio, in/out channels and context_in_dim must be positive")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        """The MLP's inner width (FLUX.2's SwiGLU input projection is twice this: gate and value)."""
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def num_params(self) -> int:
        n = 0
        for shape in self.tensor_shapes().values():
            k = 1
            for d in shape:
                k *= d
            n += k
        return n


@dataclass(frozen=True)
class FluxConfig(DiTConfigChecks):
    """Shape-relevant hyper-parameters of a FLUX.1 transformer.

    ``in_channels`` / ``out_channels`` are the *packed* widths (latent channels x 2 x 2 patch):
    64 for dev / schnell / Kontext, 384 in (64 out) for Fill.
    """

    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    in_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    mlp_ratio: float = 4.0
    guidance_embed: bool = True
    out_channels: int = 64

    def tensor_shapes(self) -> dict[str, tuple]:
        return flux_tensor_shapes(self)


FLUX_DEV = FluxConfig()
FLUX_SCHNELL = FluxConfig(guidance_embed=False)

#: Prefixes under which checkpoints store the transformer (longest first).
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def flux_tensor_shapes(cfg: FluxConfig = FLUX_DEV) -> dict[str, tuple]:
    """Every transformer key -> shape, in the order ComfyUI's ``Flux`` module registers them."""
    h = cfg.hidden_size
    mlp = cfg.mlp_hidden_dim
    hd = cfg.head_dim
    shapes: dict[str, tuple] = {}

    def linear(name: str, out_f: int, in_f: int) -> None:
        shapes[f"{name}.weight"] = (out_f, in_f)
        shapes[f"{name}.bias"] = (out_f,)

    def mlp_embedder(name: str, in_dim: int) -> None:
        linear(f"{name}.in_layer", h, in_dim)
        linear(f"{name}.out_layer", h, h)

    def qk_norm(name: str) -> None:
        shapes[f"{name}.query_norm.scale"] = (hd,)
        shapes[f"{name}.key_norm.scale"] = (hd,)

    linear("img_in", h, cfg.in_channels)
    mlp_embedder("time_in", 256)
    mlp_embedder("vector_in", cfg.vec_in_dim)
    if cfg.guidance_embed:
        mlp_embedder("guidance_in", 256)
    linear("txt_in", h, cfg.context_in_dim)

    for i in range(cfg.depth):
        p = f"double_blocks.{i}"
        for stream in ("img", "txt"):
            linear(f"{p}.{stream}_mod.lin", 6 * h, h)
            linear(f"{p}.{stream}_attn.qkv", 3 * h, h)
            qk_norm(f"{p}.{stream}_attn.norm")
            linear(f"{p}.{stream}_attn.proj", h, h)
            linear(f"{p}.{stream}_mlp.0", mlp, h)
            linear(f"{p}.{stream}_mlp.2", h, mlp)

    for i in range(cfg.depth_single_blocks):
        p = f"single_blocks.{i}"
        linear(f"{p}.linear1", 3 * h + mlp, h)
        linear(f"{p}.linear2", h, h + mlp)
        qk_norm(f"{p}.norm")
        linear(f"{p}.modulation.lin", 3 * h, h)

    linear("final_layer.linear", cfg.out_channels, h)
    linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return shapes


def strip_transformer_prefix(key: str) -> str:
    for p in TRANSFORMER_PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


_QK_NORM_WEIGHT = re.compile(r"(.*\.(?:query|key)_norm)\.weight$")


def _canonical_key(key: str) -> str:
    """``...query_norm.weight`` (ComfyUI >= 0.4 in-memory name) -> ``...query_norm.scale`` (file name)."""
    m = _QK_NORM_WEIGHT.match(key)
    return f"{m.group(1)}.scale" if m else key


def _shape_of(v: Any) -> tuple:
    if hasattr(v, "shape"):
        return tuple(int(d) for d in v.shape)
    return tuple(int(d) for d in v)


def _count_blocks(keys, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = {int(m.group(1)) for k in keys if (m := pat.match(k))}
    if not idx:
        return 0
    n = max(idx) + 1
    missing = sorted(set(range(n)) - idx)
    if missing:
        raise ValueError(f"FLUX checkpoint has gaps in {prefix}N: missing block(s) {missing[:8]}")
    return n


def detect_flux_config(shapes: Mapping[str, Any], *, strict: bool = True) -> FluxConfig:
    """Infer the :class:`FluxConfig` from a key -> shape mapping (tensors are accepted too).

    Keys may carry a ``model.diffusion_model.`` (or ``diffusion_model.``) prefix; only keys of the
    transformer are considered. QK-norm scales are accepted under either name: ``*_norm.scale``
    (checkpoint files, ComfyUI v0.3.x modules) or ``*_norm.weight`` (ComfyUI v0.4+ modules, whose
    ``Flux.process_unet_state_dict`` renames them on load). Raises :class:`ValueError` when the keys are not a FLUX.1
    transformer (including FLUX.2 / Chroma / diffusers-layout checkpoints) or are incomplete.
    Shapes must be the logical (dequantized) ones; with ``strict=False`` only the keys needed for
    the inference are looked at (no completeness / shape-consistency check).
    """
    sd: dict[str, tuple] = {}
    for k, v in shapes.items():
        if any(k.startswith(p) for p in TRANSFORMER_PREFIXES):
            sd[_canonical_key(strip_transformer_prefix(k))] = _shape_of(v)
    if not sd:  # unprefixed file: keep everything (other components are simply ignored)
        sd = {_canonical_key(k): _shape_of(v) for k, v in shapes.items()}

    if not sd:
        raise ValueError("not a FLUX transformer: the state dict is empty")
    if "double_stream_modulation_img.lin.weight" in sd:
        raise ValueError("not a FLUX.1 transformer: this is a FLUX.2 checkpoint (global modulation)")
    if any(k.startswith("distilled_guidance_layer.") for k in sd):
        raise ValueError("not a FLUX.1 transformer: this is a Chroma checkpoint (distilled_guidance_layer)")
    if any(k.startswith("transformer_blocks.") or k.startswith("single_transformer_blocks.") for k in sd):
        raise ValueError(
            "not a FLUX transformer in BFL/ComfyUI layout: keys look like the diffusers layout "
            "(transformer_blocks.*); convert it to BFL names first"
        )

    required = (
        "img_in.weight",
        "txt_in.weight",
        "time_in.in_layer.weight",
        "vector_in.in_layer.weight",
        "double_blocks.0.img_attn.qkv.weight",
        "double_blocks.0.img_attn.norm.key_norm.scale",
        "double_blocks.0.img_mlp.0.weight",
        "final_layer.linear.weight",
    )
    missing = [k for k in required if k not in sd]
    if missing:
        sample = ", ".join(sorted(sd)[:5])
        raise ValueError(
            f"not a FLUX transformer: missing {missing} (first keys seen: {sample}{', ...' if len(sd) > 5 else ''})"
        )

    img_in = sd["img_in.weight"]
    hidden = img_in[0]
    head_dim = sd["double_blocks.0.img_attn.norm.key_norm.scale"][0]
    if len(img_in) != 2 or head_dim <= 0 or hidden % head_dim:
        raise ValueError(f"not a FLUX transformer: img_in.weight {img_in} / qk-norm dim {head_dim} inconsistent")
    mlp_hidden = sd["double_blocks.0.img_mlp.0.weight"][0]
    cfg = FluxConfig(
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        depth=_count_blocks(sd, "double_blocks."),
        depth_single_blocks=_count_blocks(sd, "single_blocks."),
        in_channels=img_in[1],
        vec_in_dim=sd["vector_in.in_layer.weight"][1],
        context_in_dim=sd["txt_in.weight"][1],
        mlp_ratio=mlp_hidden / hidden,
        guidance_embed="guidance_in.in_layer.weight" in sd,
        out_channels=sd["final_layer.linear.weight"][0],
    )

    if not strict:
        return cfg
    expected = flux_tensor_shapes(cfg)
    absent = [k for k in expected if k not in sd]
    if absent:
        raise ValueError(
            f"incomplete FLUX transformer: {len(absent)} expected tensor(s) missing, e.g. {absent[:5]}"
        )
    wrong = [(k, sd[k], s) for k, s in expected.items() if sd[k] != s]  # rank too: a (N, 1) bias is no bias
    if wrong:
        k, got, want = wrong[0]
        raise ValueError(
            f"inconsistent FLUX transformer shapes ({len(wrong)} mismatches), e.g. {k}: {got} != expected {want}"
        )
    return cfg


# --------------------------------------------------------------------------------------------
# VAE (16-channel AutoencoderKL, BFL ae.safetensors layout: encoder.* / decoder.*, no quant convs)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FluxVAEConfig:
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    in_channels: int = 3
    out_ch: int = 3


FLUX_VAE = FluxVAEConfig()


def flux_vae_tensor_shapes(cfg: FluxVAEConfig = FLUX_VAE) -> dict[str, tuple]:
    """Every FLUX VAE key -> shape (the names ComfyUI's VAELoader detects as the 16-ch flux AE)."""
    shapes: dict[str, tuple] = {}

    def conv(name: str, out_c: int, in_c: int, k: int) -> None:
        shapes[f"{name}.weight"] = (out_c, in_c, k, k)
        shapes[f"{name}.bias"] = (out_c,)

    def norm(name: str, c: int) -> None:
        shapes[f"{name}.weight"] = (c,)
        shapes[f"{name}.bias"] = (c,)

    def resblock(name: str, in_c: int, out_c: int) -> None:
        norm(f"{name}.norm1", in_c)
        conv(f"{name}.conv1", out_c, in_c, 3)
        norm(f"{name}.norm2", out_c)
        conv(f"{name}.conv2", out_c, out_c, 3)
        if in_c != out_c:
            conv(f"{name}.nin_shortcut", out_c, in_c, 1)

    def mid(name: str, c: int) -> None:
        resblock(f"{name}.block_1", c, c)
        norm(f"{name}.attn_1.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{name}.attn_1.{p}", c, c, 1)
        resblock(f"{name}.block_2", c, c)

    ch, mult, nres = cfg.ch, tuple(cfg.ch_mult), cfg.num_res_blocks
    levels = len(mult)

    # encoder
    conv("encoder.conv_in", ch, cfg.in_channels, 3)
    in_mult = (1,) + mult
    block_in = ch
    for i in range(levels):
        block_in = ch * in_mult[i]
        block_out = ch * mult[i]
        for j in range(nres):
            resblock(f"encoder.down.{i}.block.{j}", block_in, block_out)
            block_in = block_out
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
    mid("encoder.mid", block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", 2 * cfg.z_channels, block_in, 3)

    # decoder (ModuleList index i = resolution level, registered 0..levels-1)
    top = ch * mult[-1]
    conv("decoder.conv_in", top, cfg.z_channels, 3)
    mid("decoder.mid", top)
    for i in range(levels):
        block_in = ch * mult[i + 1] if i + 1 < levels else top
        block_out = ch * mult[i]
        for j in range(nres + 1):
            resblock(f"decoder.up.{i}.block.{j}", block_in, block_out)
            block_in = block_out
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", ch * mult[0])
    conv("decoder.conv_out", cfg.out_ch, ch * mult[0], 3)
    return shapes


FLUX_VAE_SHAPES: dict[str, tuple] = flux_vae_tensor_shapes()
