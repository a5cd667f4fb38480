"""Unit tests for loaders/flux_layout.py (pure torch, no ComfyUI)."""
import pytest
import torch

from kontext_lowvram.loaders.flux_layout import (
    FLUX_DEV,
    FLUX_VAE_SHAPES,
    FluxConfig,
    detect_flux_config,
    flux_tensor_shapes,
    flux_vae_tensor_shapes,
)
from fixtures.flux import random_flux_state_dict, random_flux_vae_state_dict

TINY = FluxConfig(
    hidden_size=256, num_heads=2, depth=2, depth_single_blocks=3,
    in_channels=64, vec_in_dim=32, context_in_dim=48, mlp_ratio=4.0, guidance_embed=True,
)


def test_tiny_shapes():
    s = flux_tensor_shapes(TINY)
    h, mlp, hd = 256, 1024, 128
    assert s["img_in.weight"] == (h, 64)
    assert s["img_in.bias"] == (h,)
    assert s["time_in.in_layer.weight"] == (h, 256)
    assert s["time_in.out_layer.weight"] == (h, h)
    assert s["vector_in.in_layer.weight"] == (h, 32)
    assert s["guidance_in.in_layer.weight"] == (h, 256)
    assert s["txt_in.weight"] == (h, 48)
    for stream in ("img", "txt"):
        p = f"double_blocks.1.{stream}"
        assert s[f"{p}_mod.lin.weight"] == (6 * h, h)
        assert s[f"{p}_attn.qkv.weight"] == (3 * h, h)
        assert s[f"{p}_attn.qkv.bias"] == (3 * h,)
        assert s[f"{p}_attn.proj.weight"] == (h, h)
        assert s[f"{p}_attn.norm.query_norm.scale"] == (hd,)
        assert s[f"{p}_attn.norm.key_norm.scale"] == (hd,)
        assert s[f"{p}_mlp.0.weight"] == (mlp, h)
        assert s[f"{p}_mlp.2.weight"] == (h, mlp)
    assert s["single_blocks.2.linear1.weight"] == (3 * h + mlp, h)
    assert s["single_blocks.2.linear2.weight"] == (h, h + mlp)
    assert s["single_blocks.2.modulation.lin.weight"] == (3 * h, h)
    assert s["single_blocks.2.norm.key_norm.scale"] == (hd,)
    assert s["final_layer.linear.weight"] == (64, h)
    assert s["final_layer.adaLN_modulation.1.weight"] == (2 * h, h)
    assert "double_blocks.2.img_mod.lin.weight" not in s
    assert "single_blocks.3.linear1.weight" not in s
    # img_in 2, time_in 4, vector_in 4, guidance_in 4, txt_in 2; 24 per double, 8 per single; final 4
    assert len(s) == 2 + 4 + 4 + 4 + 2 + 2 * 24 + 3 * 8 + 4


def test_no_guidance_drops_guidance_in():
    s = flux_tensor_shapes(FluxConfig(hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1, guidance_embed=False))
    assert not any(k.startswith("guidance_in.") for k in s)


def test_flux_dev_param_count():
    assert FLUX_DEV.num_params == 11_901_408_320  # FLUX.1-dev: 11.9 B
    assert len(flux_tensor_shapes(FLUX_DEV)) == 780


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("cfg", [TINY, FLUX_DEV, FluxConfig(hidden_size=3072, depth=1, depth_single_blocks=1, guidance_embed=False)])
def test_detect_round_trip(cfg, prefix):
    shapes = {prefix + k: v for k, v in flux_tensor_shapes(cfg).items()}
    if prefix:  # a full checkpoint also carries other components, which are ignored
        shapes["vae.decoder.conv_in.weight"] = (512, 16, 3, 3)
        shapes["text_encoders.t5xxl.foo.weight"] = (4, 4)
    assert detect_flux_config(shapes) == cfg


def test_detect_accepts_tensors_and_fill_channels():
    cfg = FluxConfig(hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1, in_channels=384, out_channels=64)
    sd = {k: torch.empty(v, device="meta") for k, v in flux_tensor_shapes(cfg).items()}
    assert detect_flux_config(sd) == cfg


@pytest.mark.parametrize(
    "keys",
    [
        {},
        {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3), "model.diffusion_model.out.2.weight": (4, 320, 3, 3)},
        {"transformer_blocks.0.attn.to_q.weight": (3072, 3072), "x_embedder.weight": (3072, 64)},
        dict(FLUX_VAE_SHAPES),
        {"img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096)},
    ],
    ids=["empty", "sd-unet", "diffusers", "vae", "truncated"],
)
def test_detect_rejects_non_flux(keys):
    with pytest.raises(ValueError, match="FLUX"):
        detect_flux_config(keys)


def test_detect_rejects_flux2_and_missing_blocks():
    s = dict(flux_tensor_shapes(TINY))
    s["double_stream_modulation_img.lin.weight"] = (1536, 256)
    with pytest.raises(ValueError, match="FLUX.2"):
        detect_flux_config(s)
    s = {k: v for k, v in flux_tensor_shapes(TINY).items() if not k.startswith("double_blocks.0.txt_mlp.2")}
    with pytest.raises(ValueError, match="missing"):
        detect_flux_config(s)
    assert detect_flux_config(s, strict=False) == TINY
    s = {k: v for k, v in flux_tensor_shapes(TINY).items() if not k.startswith("single_blocks.1.")}
    with pytest.raises(ValueError, match="gaps"):
        detect_flux_config(s)


def test_detect_rejects_inconsistent_shapes():
    s = dict(flux_tensor_shapes(TINY))
    s["double_blocks.1.txt_attn.proj.weight"] = (256, 255)
    with pytest.raises(ValueError, match="inconsistent"):
        detect_flux_config(s)


def test_random_state_dict_deterministic_and_nonzero():
    a = random_flux_state_dict(TINY, seed=3)
    b = random_flux_state_dict(TINY, seed=3)
    c = random_flux_state_dict(TINY, seed=4)
    assert list(a) == list(flux_tensor_shapes(TINY))
    for k, v in a.items():
        assert v.dtype == torch.bfloat16
        assert tuple(v.shape) == flux_tensor_shapes(TINY)[k]
        assert torch.equal(v, b[k]), k
        assert v.abs().sum() > 0, k
        assert torch.isfinite(v.float()).all()
    assert not torch.equal(a["img_in.weight"], c["img_in.weight"])
    w = a["double_blocks.0.img_mlp.0.weight"].float()
    assert 0.015 < w.std().item() < 0.025
    scale = a["single_blocks.0.norm.query_norm.scale"].float()
    assert (scale - 1).abs().max() < 0.1
    assert a["img_in.bias"].float().abs().max() < 0.02
    f32 = random_flux_state_dict(TINY, seed=3, dtype=torch.float32, std=0.05)
    assert f32["txt_in.weight"].dtype == torch.float32
    assert 0.04 < f32["txt_in.weight"].std().item() < 0.06


def test_vae_shapes():
    s = flux_vae_tensor_shapes()
    assert s is not FLUX_VAE_SHAPES and s == FLUX_VAE_SHAPES
    assert len(s) == 244
    assert s["encoder.conv_in.weight"] == (128, 3, 3, 3)
    assert s["encoder.conv_out.weight"] == (32, 512, 3, 3)
    assert s["decoder.conv_in.weight"] == (512, 16, 3, 3)
    assert s["decoder.conv_out.weight"] == (3, 128, 3, 3)
    assert s["encoder.down.1.block.0.nin_shortcut.weight"] == (256, 128, 1, 1)
    assert s["decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)
    assert s["decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    assert s["decoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    assert "encoder.down.3.downsample.conv.weight" not in s
    assert "decoder.up.0.upsample.conv.weight" not in s
    # BFL ae.safetensors has no quant convs (ComfyUI then builds an AutoencodingEngine)
    assert not any("quant_conv" in k for k in s)
    n = sum(torch.Size(v).numel() for v in s.values())
    assert n == 83_819_683


def test_random_vae_state_dict():
    a = random_flux_vae_state_dict(seed=1)
    b = random_flux_vae_state_dict(seed=1)
    assert list(a) == list(FLUX_VAE_SHAPES)
    for k, v in a.items():
        assert tuple(v.shape) == FLUX_VAE_SHAPES[k]
        assert v.dtype == torch.float32
        assert torch.equal(v, b[k])
        if k.endswith(".bias"):
            assert not v.any()
        elif v.ndim == 1:
            assert torch.equal(v, torch.ones_like(v))
        else:
            assert v.abs().sum() > 0
    assert random_flux_vae_state_dict(seed=0, dtype=torch.bfloat16)["decoder.conv_in.weight"].dtype == torch.bfloat16


def test_detect_accepts_norm_weight_names():
    # ComfyUI v0.4+ keeps QK-norm scales as "*_norm.weight" in its modules
    s = {k.replace("_norm.scale", "_norm.weight"): v for k, v in flux_tensor_shapes(TINY).items()}
    assert detect_flux_config(s) == TINY
