"""FLUX.2 ([dev], [klein] 4B / 9B) in the loaders (pure torch, no ComfyUI): the layout, format detection on files
written as people publish them (BFL names with and without the checkpoint prefix, city96-style GGUF mixes written
with gguf-py's GGUFWriter, fp8 / scaled fp8 / comfy_quant, NF4, on-load conversion), the memory model's numbers,
and clear errors on bad files. That ComfyUI builds exactly these layouts and runs them is
tests/integration/test_flux2_loader.py."""
import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fixtures.flux2 import TINY_FLUX2_DEV, TINY_FLUX2_KLEIN, random_flux2_state_dict
from fixtures.gguf_blocks import random_blocks
from kontext_lowvram.loaders import ModelFileError, load_model_file, load_state_dict, quantize_state_dict
from kontext_lowvram.loaders.flux2_layout import (
    FLUX2_DEV,
    FLUX2_KLEIN_4B,
    FLUX2_KLEIN_9B,
    FLUX2_MODELS,
    Flux2Config,
    detect_flux2_config,
    flux2_tensor_shapes,
    flux2_variant,
)
from kontext_lowvram.loaders.flux_layout import FluxConfig, detect_flux_config, flux_tensor_shapes
from kontext_lowvram.loaders.keys import should_quantize
from kontext_lowvram.loaders.transformer import check_transformer
from kontext_lowvram.loaders.writers import write_gguf, write_safetensors
from kontext_lowvram.optimizations import QTensor, dequantize
from kontext_lowvram.optimizations import memory_model as mm
from kontext_lowvram.optimizations.planner import Request, format_plan, plan

# 256 wide: every GGUF block type (256-value K-quant super-blocks) fits every 2-D tensor
CFG = Flux2Config(hidden_size=256, num_heads=2, depth=2, depth_single_blocks=2, context_in_dim=256)
KLEIN = Flux2Config(hidden_size=256, num_heads=2, depth=1, depth_single_blocks=2, context_in_dim=512,
                    guidance_embed=False)
PREFIX = "model.diffusion_model."


def numel(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def sd():
    return random_flux2_state_dict(CFG, seed=0)


# ---- the layout ----

def test_shapes_of_a_small_flux2():
    s = flux2_tensor_shapes(CFG)
    h, mlp, hd = 256, 768, 128
    assert s["img_in.weight"] == (h, 128) and s["final_layer.linear.weight"] == (128, h)
    assert s["time_in.in_layer.weight"] == (h, 256) and s["time_in.out_layer.weight"] == (h, h)
    assert s["guidance_in.in_layer.weight"] == (h, 256) and s["txt_in.weight"] == (h, 256)
    for stream in ("img", "txt"):
        p = f"double_blocks.1.{stream}"
        assert s[f"{p}_attn.qkv.weight"] == (3 * h, h) and s[f"{p}_attn.proj.weight"] == (h, h)
        assert s[f"{p}_attn.norm.query_norm.scale"] == (hd,) and s[f"{p}_attn.norm.key_norm.scale"] == (hd,)
        assert s[f"{p}_mlp.0.weight"] == (2 * mlp, h)  # SwiGLU: gate and value in one projection
        assert s[f"{p}_mlp.2.weight"] == (h, mlp)
    assert s["single_blocks.1.linear1.weight"] == (3 * h + 2 * mlp, h)
    assert s["single_blocks.1.linear2.weight"] == (h, h + mlp)
    assert s["double_stream_modulation_img.lin.weight"] == (6 * h, h)
    assert s["double_stream_modulation_txt.lin.weight"] == (6 * h, h)
    assert s["single_stream_modulation.lin.weight"] == (3 * h, h)
    assert s["final_layer.adaLN_modulation.1.weight"] == (2 * h, h)
    # no biases, no vector_in, no per-block modulation
    assert not any(k.endswith(".bias") or k.startswith("vector_in.") or "_mod." in k or ".modulation." in k for k in s)
    # img_in, time_in 2, guidance_in 2, txt_in; 12 per double, 4 per single; final 2; shared modulations 3
    assert len(s) == 1 + 2 + 2 + 1 + 2 * 12 + 2 * 4 + 2 + 3
    assert "guidance_in.in_layer.weight" not in flux2_tensor_shapes(KLEIN)


def test_published_configs():
    """[dev] 32 B (BFL: "32B"), [klein] 4 B and 9 B; text widths 3 x the encoder's (Mistral-3 24B 5120, Qwen3-4B
    2560, Qwen3-8B 4096); heads of 128; [klein] has no guidance embedding."""
    h = 6144
    # blocks 26 h² per double, 13 h² per single; shared modulations 15 h²; time / guidance out layers, adaLN 4 h²;
    # img_in, time / guidance in layers, txt_in, final linear; the QK-norm scales
    assert FLUX2_DEV.num_params == (8 * 26 + 48 * 13 + 15 + 4) * h * h + h * (128 + 256 + 256 + 15360 + 128) \
        + (8 * 2 * 2 + 48 * 2) * 128
    assert 32.0e9 < FLUX2_DEV.num_params < 32.5e9
    assert 3.8e9 < FLUX2_KLEIN_4B.num_params < 4.0e9 and 9.0e9 < FLUX2_KLEIN_9B.num_params < 9.2e9
    assert [c.context_in_dim for c in (FLUX2_DEV, FLUX2_KLEIN_4B, FLUX2_KLEIN_9B)] == [3 * 5120, 3 * 2560, 3 * 4096]
    assert all(c.head_dim == 128 and c.mlp_ratio == 3.0 and c.in_channels == c.out_channels == 128
               for c in FLUX2_MODELS.values())
    assert FLUX2_DEV.guidance_embed and not FLUX2_KLEIN_4B.guidance_embed and not FLUX2_KLEIN_9B.guidance_embed
    assert [flux2_variant(c) for c in FLUX2_MODELS.values()] == ["[dev]", "[klein] 4B", "[klein] 9B"]
    assert flux2_variant(CFG).startswith("[dev]-like") and flux2_variant(KLEIN).startswith("[klein]-like")


@pytest.mark.parametrize("prefix", ["", PREFIX])
@pytest.mark.parametrize("cfg", [CFG, KLEIN, TINY_FLUX2_DEV, TINY_FLUX2_KLEIN, FLUX2_DEV, FLUX2_KLEIN_4B, FLUX2_KLEIN_9B],
                         ids=["tiny-dev", "tiny-klein", "test-dev", "test-klein", "dev", "klein-4b", "klein-9b"])
def test_detect_round_trip(cfg, prefix):
    shapes = {prefix + k: v for k, v in flux2_tensor_shapes(cfg).items()}
    if prefix:  # a full checkpoint also carries other components
        shapes["vae.decoder.conv_in.weight"] = (512, 32, 3, 3)
        shapes["text_encoders.qwen3_4b.transformer.model.norm.weight"] = (2560,)
    assert detect_flux2_config(shapes) == cfg
    found = check_transformer(shapes)
    assert found.family == "FLUX.2" and found.config == cfg and found.name.startswith("FLUX.2 [")
    norm_weight = {k.replace("_norm.scale", "_norm.weight"): v for k, v in shapes.items()}  # ComfyUI's in-memory names
    assert detect_flux2_config(norm_weight) == cfg


def test_flux1_detection_still_refuses_flux2_and_flux2_refuses_flux1():
    with pytest.raises(ValueError, match="FLUX.2"):
        detect_flux_config(flux2_tensor_shapes(CFG))
    with pytest.raises(ValueError, match="not a FLUX.2"):
        detect_flux2_config(flux_tensor_shapes(FluxConfig(hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1)))


def test_incomplete_or_inconsistent_flux2_is_named():
    s = dict(flux2_tensor_shapes(CFG))
    del s["single_blocks.1.linear2.weight"]
    with pytest.raises(ValueError, match="incomplete FLUX.2.*single_blocks.1.linear2.weight"):
        detect_flux2_config(s)
    assert detect_flux2_config(s, strict=False) == CFG
    s = dict(flux2_tensor_shapes(CFG))
    s["double_blocks.1.txt_mlp.0.weight"] = (1024, 256)  # a GELU-width MLP in a SwiGLU model
    with pytest.raises(ValueError, match="inconsistent FLUX.2.*txt_mlp.0.weight"):
        detect_flux2_config(s)
    s = {k: v for k, v in flux2_tensor_shapes(CFG).items() if not k.startswith("double_blocks.0.")}
    with pytest.raises(ValueError, match="missing|gaps"):
        check_transformer(s)


def test_random_state_dict_is_deterministic_and_scaled():
    a, b = random_flux2_state_dict(CFG, seed=3), random_flux2_state_dict(CFG, seed=3)
    assert list(a) == list(flux2_tensor_shapes(CFG))
    for k, v in a.items():
        assert v.dtype == torch.bfloat16 and tuple(v.shape) == flux2_tensor_shapes(CFG)[k]
        assert torch.equal(v, b[k]) and v.abs().sum() > 0 and torch.isfinite(v.float()).all(), k
    assert not torch.equal(a["img_in.weight"], random_flux2_state_dict(CFG, seed=4)["img_in.weight"])
    assert 0.06 < a["double_blocks.0.img_mlp.0.weight"].float().std().item() < 0.09  # 1.2 / sqrt(256)
    assert (a["single_blocks.0.norm.query_norm.scale"].float() - 1).abs().max() < 0.1


def test_shared_modulations_are_quantized_like_block_linears():
    s = flux2_tensor_shapes(CFG)
    picked = {k for k, v in s.items() if should_quantize(k, v)}
    assert {"double_stream_modulation_img.lin.weight", "double_stream_modulation_txt.lin.weight",
            "single_stream_modulation.lin.weight", "double_blocks.0.img_mlp.0.weight"} <= picked
    assert not picked & {"img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "guidance_in.out_layer.weight",
                         "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight"}
    assert all(len(s[k]) == 2 for k in picked)
    # FLUX.1 picks what it always did
    f1 = flux_tensor_shapes(FluxConfig(hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1))
    assert {k for k, v in f1.items() if should_quantize(k, v)} == \
        {k for k, v in f1.items() if k.startswith(("double_blocks.", "single_blocks.")) and k.endswith(".weight")
         and len(v) == 2}


# ---- files as people make them ----

@pytest.mark.parametrize("prefix", ["", PREFIX])
def test_bf16_safetensors_with_and_without_prefix(tmp_path, sd, prefix):
    p = tmp_path / "flux2.safetensors"
    save_file({prefix + k: v for k, v in sd.items()}, str(p))
    back, info = load_model_file(p)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    assert info["format"] == "bfloat16" and info["flux2_config"] == CFG and "flux_config" not in info
    assert info["transformer"].startswith("FLUX.2 [dev]-like")


@pytest.mark.parametrize("fmt,style,label,bound", [
    ("fp8_e4m3fn_scaled", "scaled", "fp8 (scaled)", 0.04),
    ("fp8_e4m3fn_scaled", "comfy_quant", "fp8 (comfy_quant)", 0.04),
    ("fp8_e5m2", "scaled", "fp8 (plain)", 0.08),
    ("nf4", "scaled", "nf4", 0.12),
])
def test_fp8_and_nf4_files(tmp_path, sd, fmt, style, label, bound):
    q = quantize_state_dict(sd, fmt)
    p = write_safetensors(tmp_path / "m.safetensors", q, fp8_style=style)
    back, info = load_model_file(p)
    assert info["format"] == label and info["flux2_config"] == CFG
    for k, v in sd.items():
        if should_quantize(k, v.shape):
            assert isinstance(back[k], QTensor), k
            assert tuple(back[k].shape) == tuple(v.shape)
            assert 0 < rel(dequantize(back[k], torch.float32), v.float()) < bound, k
        else:
            assert not isinstance(back[k], QTensor) and torch.equal(back[k].to(v.dtype), v), k


def city96_gguf(path, sd, qtype_for, arch="flux"):
    """A GGUF as city96's tools/convert.py + llama.cpp (tools/lcpp.patch) write one: general.architecture "flux"
    (convert.py detects FLUX.2 as flux: it has double_blocks.0.img_attn.proj.weight), BFL key names, 1-D tensors F32,
    the input/output projections (img_in, txt_in, time_in, guidance_in, final_layer) BF16 as in the bf16 source,
    block linears and FLUX.2's shared modulations in `qtype_for(key)`: gguf-py's quantizer for the types it has,
    random valid blocks for the K-quants. Returns {key: what a reader must give back, as float32}."""
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    expect = {}
    for i, (k, v) in enumerate(sd.items()):
        qt = qtype_for(k) if should_quantize(k, v.shape) else None
        if v.ndim == 1:
            w.add_tensor(k, v.float().numpy(), raw_dtype=gguf.GGMLQuantizationType.F32)
            expect[k] = v.float()
        elif qt is None:
            w.add_tensor(k, v.contiguous().view(torch.uint8).numpy().reshape(v.shape[0], -1),
                         raw_dtype=gguf.GGMLQuantizationType.BF16)
            expect[k] = v.float()
        else:
            t = gguf.GGMLQuantizationType[qt]
            if qt in ("Q8_0", "Q5_1", "Q4_0"):
                blocks = gguf.quants.quantize(v.float().numpy(), t)
            else:
                blocks = random_blocks(qt, tuple(v.shape), std=0.05, seed=i).numpy()
            w.add_tensor(k, blocks, raw_dtype=t)
            expect[k] = torch.from_numpy(gguf.quants.dequantize(blocks, t).astype(np.float32)).reshape(v.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expect


@pytest.mark.parametrize("mix", ["Q8_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M", "Q2_K", "Q4_0", "Q5_1"])
def test_city96_style_gguf_mixes(tmp_path, sd, mix):
    """Each published mix: the _M ones put the double blocks' qkv one type up (lcpp.patch's fused-qkv rule)."""
    up = {"Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K", "Q3_K_M": "Q4_K"}

    def qtype_for(key):
        base = mix.replace("_M", "")
        return up[mix] if mix in up and key.startswith("double_blocks.") and key.endswith("_attn.qkv.weight") else base

    p = tmp_path / f"flux2-dev-{mix}.gguf"
    expect = city96_gguf(p, sd, qtype_for)
    back, info = load_model_file(p)
    assert info["container"] == "gguf" and info["architecture"] == "flux" and info["flux2_config"] == CFG
    assert set(back) == set(sd)
    for k, v in expect.items():
        got = dequantize(back[k], torch.float32) if isinstance(back[k], QTensor) else back[k].float()
        assert tuple(got.shape) == tuple(v.shape) and torch.equal(got, v), k  # exactly gguf-py's values
        assert isinstance(back[k], QTensor) == should_quantize(k, v.shape), k
    types = info["tensor_types"]
    assert types["F32"] == sum(v.ndim == 1 for v in sd.values()) and types["BF16"] == 8  # img/txt/time/guidance/final
    if mix in up:
        assert types[up[mix]] == 2 * CFG.depth


@pytest.mark.parametrize("conversion,bound", [("q8_0", 0.01), ("nf4", 0.12), ("fp8_e4m3fn_scaled", 0.04)])
def test_convert_on_load(tmp_path, conversion, bound):
    src = random_flux2_state_dict(KLEIN, seed=1)
    p = tmp_path / "klein.safetensors"
    save_file(src, str(p))
    back, info = load_model_file(p, convert=conversion)
    n = sum(should_quantize(k, v.shape) for k, v in src.items())
    assert info["conversion"] == f"{conversion}: {n} tensors quantized" and info["flux2_config"] == KLEIN
    for k, v in src.items():
        assert isinstance(back[k], QTensor) == should_quantize(k, v.shape), k
    w = "single_stream_modulation.lin.weight"
    assert 0 < rel(dequantize(back[w], torch.float32), src[w].float()) < bound


def test_our_gguf_writer_every_2d_tensor_quantized(tmp_path, sd):
    """gguf-py-style files that quantize every 2-D tensor (img_in too) load at their logical shapes."""
    q = quantize_state_dict({k: v.float() for k, v in sd.items()}, "Q8_0", select=lambda k, s: len(s) == 2)
    p = write_gguf(tmp_path / "all.gguf", q)
    back, info = load_model_file(p)
    assert info["flux2_config"] == CFG and isinstance(back["img_in.weight"], QTensor)
    assert tuple(back["img_in.weight"].shape) == (256, 128)  # logical, not the raw 136-byte rows


# ---- bad files: errors that name the file and the fix ----

def test_truncated_flux2_files(tmp_path, sd):
    p = tmp_path / "t.gguf"
    city96_gguf(p, sd, lambda k: "Q8_0")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ModelFileError, match=r"t\.gguf.*(truncated|corrupt|download it again)"):
        load_state_dict(p)
    s = tmp_path / "t.safetensors"
    save_file(sd, str(s))
    data = s.read_bytes()
    s.write_bytes(data[:-4096])
    with pytest.raises(ModelFileError, match=r"t\.safetensors.*ends at byte"):
        load_state_dict(s)


def test_wrong_architecture_gguf(tmp_path, sd):
    with pytest.raises(ModelFileError, match=r"sd3\.gguf.*architecture 'sd3' is not supported"):
        load_state_dict(write_gguf(tmp_path / "sd3.gguf", sd, arch="sd3"))
    with pytest.raises(ModelFileError, match=r"qwen\.gguf.*text-encoder.*qwen3"):
        load_state_dict(write_gguf(tmp_path / "qwen.gguf", sd, arch="qwen3"))


def test_damaged_flux2_tensors_are_named(tmp_path, sd):
    cases = {
        "rank.safetensors": ("double_blocks.0.img_attn.qkv.weight", (768, 256, 1), "2-D"),
        "norm.safetensors": ("single_blocks.1.norm.key_norm.scale", (1, 128), "1-D"),
        "empty.safetensors": ("txt_in.weight", (256, 0), "empty dimension"),
        "width.safetensors": ("double_blocks.1.txt_attn.proj.weight", (256, 255), "inconsistent FLUX.2"),
        "bias.safetensors": ("img_in.bias", (255,), "255 values for a weight of 256 rows"),
    }
    for name, (key, shape, words) in cases.items():
        bad = dict(sd)
        bad[key] = torch.zeros(shape, dtype=torch.bfloat16)
        save_file(bad, str(tmp_path / name))
        with pytest.raises(ModelFileError, match=rf"{name}.*{key}.*|{name}.*{words}") as e:
            load_state_dict(tmp_path / name)
        assert key in str(e.value) and words in str(e.value), str(e.value)
        assert "FLUX-family" in str(e.value)  # the fix says what this loader takes


def test_non_transformers_are_still_refused(tmp_path):
    p = tmp_path / "vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(8, 32, 3, 3)}, str(p))
    with pytest.raises(ModelFileError, match=r"vae\.safetensors.*not a FLUX transformer"):
        load_state_dict(p)
    p = tmp_path / "diffusers.safetensors"
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.zeros(8, 8), "x_embedder.weight": torch.zeros(8, 4)},
              str(p))
    with pytest.raises(ModelFileError, match="diffusers layout"):
        load_state_dict(p)


def test_other_flux_family_files_pass_the_generic_checks():
    """Chroma (no img_in-based FLUX.1 layout) and FLUX.1 variants this pack has no layout for (LongCat: no
    vector_in) pass to the host, whose detection decides; FLUX.1 files are still held to their layout."""
    f1 = flux_tensor_shapes(FluxConfig(hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1))
    found = check_transformer(f1)
    assert found.family == "FLUX.1" and found.config.hidden_size == 256
    longcat = {k: v for k, v in f1.items() if not k.startswith("vector_in.")}
    assert check_transformer(longcat).family == "FLUX-family" and check_transformer(longcat).config is None
    chroma = {k: v for k, v in f1.items() if "_mod." not in k and ".modulation." not in k}
    chroma.update({"distilled_guidance_layer.in_proj.weight": (5120, 64), "distilled_guidance_layer.in_proj.bias": (5120,),
                   "distilled_guidance_layer.norms.0.scale": (5120,)})
    assert check_transformer(chroma).name == "Chroma"
    bad = dict(chroma)
    bad["distilled_guidance_layer.in_proj.bias"] = (5120, 1)
    with pytest.raises(ValueError, match="in_proj.bias"):
        check_transformer(bad)


# ---- the planner's numbers ----

@pytest.mark.parametrize("key", ["flux2-dev", "flux2-klein-4b", "flux2-klein-9b"])
def test_memory_model_weights_come_from_the_real_shapes(key):
    spec = mm.model_spec(key)
    cfg = FLUX2_MODELS[key]
    blocks, rest = mm.flux_parameters(cfg)
    shapes = flux2_tensor_shapes(cfg)
    assert blocks == sum(numel(s) for k, s in shapes.items() if should_quantize(k, s))
    assert blocks + rest == cfg.num_params
    by = {f.name: f for f in spec.formats}
    assert "nf4" not in by  # nobody publishes an NF4 FLUX.2
    assert mm.weight_bytes(by["bf16"], cfg=cfg) == cfg.num_params * 2
    assert mm.weight_bytes(by["Q8_0"], cfg=cfg) == pytest.approx(blocks * 34 / 32 + rest * 2)
    qkv = sum(numel(s) for k, s in shapes.items() if k.startswith("double_blocks.") and k.endswith("qkv.weight"))
    assert mm.weight_bytes(by["Q4_K_M"], cfg=cfg) == pytest.approx(((blocks - qkv) * 4.5 + qkv * 5.5) / 8 + rest * 2,
                                                                   rel=1e-3)
    assert [f.file for f in spec.formats][:2] == [mm.FLUX2_FILES[key][2], f"{mm.FLUX2_FILES[key][1]}-Q8_0.gguf"]
    assert not any(f.measured for f in spec.formats) and not spec.measured


def test_flux2_dev_sizes_match_the_published_files():
    """bf16 ≈ 64 GB, fp8 ≈ 32 GB, Q4_K_M ≈ 18.7 GB (decimal GB)."""
    by = {f.name: f for f in mm.model_spec("flux2-dev").formats}
    assert mm.weight_bytes(by["bf16"], cfg=FLUX2_DEV) / 1e9 == pytest.approx(64.4, abs=0.2)
    assert mm.weight_bytes(by["fp8_e4m3fn"], cfg=FLUX2_DEV) / 1e9 == pytest.approx(32.5, abs=0.3)
    assert mm.weight_bytes(by["Q4_K_M"], cfg=FLUX2_DEV) / 1e9 == pytest.approx(18.7, abs=0.1)


@pytest.mark.parametrize("key", ["flux2-dev", "flux2-klein-4b", "flux2-klein-9b"])
def test_plans_for_flux2(key):
    spec = mm.model_spec(key)
    for vram in (8, 12, 16, 24, 32, 48, 96):
        p = plan(Request(vram_gib=vram, ram_gib=96, model=key))
        text = format_plan(p)
        assert spec.title in text and "ESTIMATES" in text and "Text Encode FLUX.2 (cached)" in text
        if p.fits:
            for ph in p.phases:
                assert ph.vram_gib <= vram
            assert p.model_format.file in text
    ranks = [spec.formats.index(plan(Request(vram_gib=v, model=key)).model_format)
             for v in (12, 16, 24, 32, 48, 96) if plan(Request(vram_gib=v, model=key)).model_format]
    assert ranks == sorted(ranks, reverse=True)
    assert plan(Request(vram_gib=160, model=key)).model_format.name == "bf16"
    n = mm.tokens(1024, 1024, 1)
    assert mm.denoise_gib(spec.formats[0], n, spec.cfg) > mm.weight_gib(spec.formats[0], cfg=spec.cfg)


def test_flux1_answers_do_not_move():
    """FLUX.1's planner numbers come from the same functions with cfg None (tests/test_planner.py and the README
    table hold them); a FLUX.2 config changes them only through its own shapes."""
    fmt = mm.FORMAT_BY_NAME["Q4_K_M"]
    n = mm.tokens(1024, 1024, 1)
    assert mm.denoise_gib(fmt, n) == mm.weight_gib(fmt) + mm.activation_gib(n) + mm.fixed_gib(fmt.family)
    assert mm.streaming_denoise_gib(fmt, n) == mm.activation_gib(n) + mm.fixed_gib(fmt.family) + 4 * mm.weight_gib(fmt) / 57
    assert mm.model_spec("kontext").formats is mm.FORMATS
    assert plan(Request(vram_gib=12)).model_format == plan(Request(vram_gib=12, model="kontext")).model_format


def test_cli_plan_for_flux2(capsys):
    from kontext_lowvram.cli import main
    assert main(["plan", "--model", "flux2-klein-4b", "--vram", "12", "--ram", "32"]) == 0
    out = capsys.readouterr().out
    assert "FLUX.2 [klein] 4B on 12 GB VRAM / 32 GB RAM" in out and "qwen_3_4b.safetensors" in out
    with pytest.raises(SystemExit):
        main(["plan", "--model", "flux3", "--vram", "12"])


def test_inspect_names_a_flux2_file(tmp_path, sd):
    from kontext_lowvram.loaders.identify import identify
    p = tmp_path / "f.safetensors"
    save_file({PREFIX + k: v for k, v in sd.items()}, str(p))
    _, info = identify(p)
    assert info["kind"] == "flux2"
    assert info["what"].startswith("FLUX.2 transformer: hidden 256, 2 double + 2 single blocks, 2 heads, text width 256")
    assert "FLUX.2 [dev]-like" in info["what"]
