"""The converter (loaders/convert.py) on tiny real-layout models: every type round trips through gguf-py and through
our loader, BFL / prefixed / diffusers / GGUF inputs give the same tensors, T5 encoders get llama.cpp's names,
files appear only when complete, and bad inputs get clear errors."""
import json
import os

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fixtures.diffusers_flux import bfl_to_diffusers, write_sharded
from fixtures.flux import random_flux_state_dict, random_flux_vae_state_dict
from fixtures.text_encoders import random_state_dict
from kontext_lowvram.loaders import load_model_file
from kontext_lowvram.loaders import convert as C
from kontext_lowvram.loaders.convert_mix import GGUF_TYPES, TARGETS
from kontext_lowvram.loaders.errors import ModelFileError
from kontext_lowvram.loaders.flux_layout import FluxConfig
from kontext_lowvram.loaders.integrity import verify_sidecar
from kontext_lowvram.loaders.text_encoders import read_text_encoder, t5_tensor_shapes
from kontext_lowvram.optimizations import QTensor, dequantize, quantize
from t5_files import TINY_T5, llamacpp_names

# the smallest FLUX layout whose block linears are whole K-quant blocks (rows of 256): ~2.2 M block values
KCFG = FluxConfig(hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1, context_in_dim=256, vec_in_dim=256,
                  mlp_ratio=1.0)
# relative L2 bound per base type on N(0, 0.02) weights (measured: Q8_0 0.5 %, Q6_K 1.8 %, Q5_K 3.6 %, Q4_K 7.1 %,
# Q3_K 15 %, Q2_K 30 %, Q5_1 3.8 %, Q5_0 4.3 %, Q4_1 7.8 %, Q4_0 8.6 %, nf4 9.2 %, fp8 2.6 %)
BOUND = {"Q8_0": 0.01, "Q6_K": 0.03, "Q5_K_M": 0.06, "Q5_K_S": 0.06, "Q4_K_M": 0.11, "Q4_K_S": 0.11, "Q3_K_M": 0.22,
         "Q3_K_S": 0.22, "Q2_K": 0.4, "Q5_1": 0.06, "Q5_0": 0.06, "Q4_1": 0.11, "Q4_0": 0.12, "BF16": 0.0,
         "F16": 1e-3, "fp8_e4m3fn_scaled": 0.04, "nf4": 0.12}


def rel(a, b):
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return ((a - b).norm() / b.norm()).item()


def out_name(tmp_path, to, stem="model"):
    return str(tmp_path / f"{stem}-{to}{TARGETS[to].suffix}")


@pytest.fixture(scope="module")
def ksd():
    return random_flux_state_dict(KCFG, seed=3)


@pytest.fixture(scope="module")
def kfile(tmp_path_factory, ksd):
    path = tmp_path_factory.mktemp("src") / "flux-tiny.safetensors"
    save_file(ksd, str(path))
    return str(path)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, kfile):
    """convert(kfile, ..., to) once per type: (path, report)."""
    folder = tmp_path_factory.mktemp("out")
    cache = {}

    def get(to):
        if to not in cache:
            path = out_name(folder, to)
            cache[to] = (path, C.convert(kfile, path, to))
        return cache[to]
    return get


# ---- the mix ---------------------------------------------------------------------------------------------------

def flux_dev_plan(to):
    """The plan for a full-size FLUX.1 [dev] (shapes only, no data)."""
    from kontext_lowvram.loaders.convert_source import Source, SourceTensor
    from kontext_lowvram.loaders.flux_layout import FLUX_DEV, flux_tensor_shapes
    tensors = [SourceTensor(k, s, "bfloat16", ()) for k, s in flux_tensor_shapes(FLUX_DEV).items()]
    return {i.name: i for i in C.plan(Source("flux1-dev.safetensors", [], "flux", "", tensors, FLUX_DEV), TARGETS[to])}


@pytest.mark.parametrize("to,qkv,rest", [
    ("Q8_0", "Q8_0", "Q8_0"), ("Q6_K", "Q6_K", "Q6_K"), ("Q5_K_M", "Q6_K", "Q5_K"), ("Q5_K_S", "Q5_K", "Q5_K"),
    ("Q4_K_M", "Q5_K", "Q4_K"), ("Q4_K_S", "Q4_K", "Q4_K"), ("Q3_K_M", "Q4_K", "Q3_K"), ("Q3_K_S", "Q3_K", "Q3_K"),
    ("Q2_K", "Q2_K", "Q2_K"), ("Q5_1", "Q5_1", "Q5_1"), ("Q4_0", "Q4_0", "Q4_0"), ("BF16", "BF16", "BF16"),
    ("F16", "F16", "F16")])
def test_flux_mix_follows_city96_and_lcpp_patch(to, qkv, rest):
    p = flux_dev_plan(to)
    unq = "BF16" if to == "BF16" else "F16"
    for k, it in p.items():
        if len(it.src.shape) == 1:
            want = "F32"
        elif k.startswith(("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")):
            want = unq
        elif k.startswith("double_blocks.") and k.endswith("_attn.qkv.weight"):
            want = qkv
        else:
            want = rest
        assert it.out_type == want, (k, it.out_type, it.rule)
    # every block weight but the 38 double-block qkv has the base type; nothing of single blocks is raised
    assert sum(it.out_type == qkv for k, it in p.items() if k.endswith("_attn.qkv.weight")) == 38
    assert all(p[f"single_blocks.{i}.linear1.weight"].out_type == rest for i in range(38))


def test_flux_mix_sizes_match_the_published_files():
    """File sizes of the full-size FLUX.1 [dev] plan, against the numbers people download (ARCHITECTURE.md:
    Q8_0 12.7 GB, bf16 23.8 GB, Q4_K 6.9 GB) and the _M extra: 38 qkv tensors of 3072 x 9216 one bit wider."""
    size = {to: sum(i.nbytes for i in flux_dev_plan(to).values()) for to in ("Q8_0", "BF16", "Q4_K_S", "Q4_K_M")}
    assert size["Q8_0"] / 1e9 == pytest.approx(12.7, abs=0.1)
    assert size["BF16"] / 1e9 == pytest.approx(23.8, abs=0.1)
    assert size["Q4_K_S"] / 1e9 == pytest.approx(6.8, abs=0.1)
    assert size["Q4_K_M"] - size["Q4_K_S"] == 38 * 3072 * 9216 // 256 * (176 - 144)


def test_flux_mix_falls_back_to_f16_for_rows_that_are_not_whole_blocks():
    from kontext_lowvram.loaders.convert_mix import flux_tensor_type
    assert flux_tensor_type("double_blocks.0.img_mlp.2.weight", (64, 320), TARGETS["Q4_K_M"])[0] == "F16"
    assert flux_tensor_type("double_blocks.0.img_mlp.2.weight", (64, 320), TARGETS["Q8_0"])[0] == "Q8_0"
    assert flux_tensor_type("double_blocks.0.img_mlp.2.weight", (64, 48), TARGETS["Q8_0"])[0] == "F16"
    assert flux_tensor_type("double_blocks.0.img_mlp.2.weight", (4, 256), TARGETS["Q4_K_M"])[0] == "F32"  # small
    assert flux_tensor_type("double_blocks.0.img_mlp.2.weight", (8, 256), TARGETS["nf4"])[0] == "nf4"
    assert flux_tensor_type("txt_in.weight", (3072, 4096), TARGETS["nf4"])[0] == "keep"


def t5_xxl_plan(to):
    from kontext_lowvram.loaders.convert_source import Source, SourceTensor
    from kontext_lowvram.loaders.text_encoders import T5_XXL
    tensors = [SourceTensor(k, s, "float16", ()) for k, s in t5_tensor_shapes().items()]
    return {i.name: i for i in C.plan(Source("t5xxl_fp16.safetensors", [], "t5", "", tensors, dict(T5_XXL)),
                                      TARGETS[to])}


def test_t5_mix_follows_llama_cpp():
    m = t5_xxl_plan("Q4_K_M")
    more = {i for i in range(24) if i < 3 or i >= 21 or (i - 3) % 3 == 2}  # use_more_bits(i, 24)
    assert more == {0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23}
    for i in range(24):
        for part in ("attn_v", "ffn_down"):
            assert m[f"enc.blk.{i}.{part}.weight"].out_type == ("Q6_K" if i in more else "Q4_K")
        for part in ("attn_q", "attn_k", "attn_o", "ffn_gate", "ffn_up"):
            assert m[f"enc.blk.{i}.{part}.weight"].out_type == "Q4_K"
        assert m[f"enc.blk.{i}.attn_norm.weight"].out_type == "F32"
    assert m["token_embd.weight"].out_type == "Q6_K"  # an encoder's embedding is its output tensor
    assert m["enc.blk.0.attn_rel_b.weight"].out_type == "F16"
    assert m["enc.output_norm.weight"].out_type == "F32"
    s = t5_xxl_plan("Q3_K_M")
    assert [s[f"enc.blk.{i}.attn_v.weight"].out_type for i in range(3)] == ["Q5_K", "Q5_K", "Q4_K"]
    assert [s[f"enc.blk.{i}.ffn_down.weight"].out_type for i in range(2)] == ["Q5_K", "Q4_K"]
    q = t5_xxl_plan("Q4_K_S")
    assert [q[f"enc.blk.{i}.attn_v.weight"].out_type for i in (3, 4)] == ["Q5_K", "Q4_K"]
    assert [q[f"enc.blk.{i}.ffn_down.weight"].out_type for i in (2, 3)] == ["Q5_K", "Q4_K"]
    assert t5_xxl_plan("Q8_0")["token_embd.weight"].out_type == "Q8_0"
    assert {i.out_type for i in t5_xxl_plan("Q5_K_S").values()} == {"Q5_K", "Q6_K", "F16", "F32"}
    fp8 = t5_xxl_plan("fp8_e4m3fn_scaled")
    assert fp8["encoder.block.0.layer.0.SelfAttention.q.weight"].out_type == "fp8_e4m3fn_scaled"
    assert fp8["shared.weight"].out_type == "keep"


def test_readme_documents_the_mix_table():
    from kontext_lowvram.loaders.convert_mix import mix_table_markdown
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    assert "## Converter" in readme
    assert mix_table_markdown() in readme, "README's converter mix table is out of date:\n" + mix_table_markdown()


# ---- round trips -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("to", GGUF_TYPES)
def test_gguf_round_trip_through_gguf_py_and_our_loader(converted, ksd, to):
    path, report = converted(to)
    t = TARGETS[to]
    r = gguf.GGUFReader(path)
    field = lambda name: r.fields[name].contents()  # noqa: E731
    assert field("general.architecture") == "flux"
    assert field("general.file_type") == int(gguf.LlamaFileType[t.file_type])
    assert field("general.quantization_version") == gguf.GGML_QUANT_VERSION
    planned = {i.name: i.out_type for i in report.items}
    assert [x.name for x in r.tensors] == list(planned) and set(planned) == set(ksd)
    sd, info = load_model_file(path)
    assert info["flux_config"] == KCFG
    total_err = total_ref = 0.0
    for x in r.tensors:
        assert x.tensor_type.name == planned[x.name]
        shape = tuple(reversed([int(d) for d in x.shape]))
        ref = gguf.quants.dequantize(np.asarray(x.data), x.tensor_type).reshape(shape)  # gguf-py's own reading
        ours = dequantize(sd[x.name], torch.float32)
        assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32))), x.name
        e = (ours.double() - ksd[x.name].double()).pow(2).sum().item()
        total_err, total_ref = total_err + e, total_ref + ksd[x.name].double().pow(2).sum().item()
        assert report.errors[x.name] == pytest.approx(rel(ours, ksd[x.name]), rel=1e-3, abs=1e-7)
    assert (total_err / total_ref) ** 0.5 <= BOUND[to]
    assert report.overall_error == pytest.approx((total_err / total_ref) ** 0.5, rel=1e-3, abs=1e-7)
    if to == "BF16":
        assert all(torch.equal(dequantize(sd[k], torch.bfloat16), v) for k, v in ksd.items())
    # the quantized bytes are optimizations.quantize's, whole tensor at once (the converter goes row chunk by chunk)
    k = "double_blocks.0.img_attn.qkv.weight"
    qt = planned[k]
    if qt not in ("F32", "F16"):
        want = quantize(ksd[k].float(), qt).raw.contiguous().view(torch.uint8).numpy().reshape(-1)
        assert np.array_equal(np.asarray(next(x for x in r.tensors if x.name == k).data).reshape(-1), want)
    assert verify_sidecar(path).sidecar == path + ".sha256"  # the sidecar matches the file


def test_fp8_round_trip_is_comfy_quant(converted, ksd):
    path, report = converted("fp8_e4m3fn_scaled")
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["_quantization_metadata"])
        keys = set(f.keys())
        layers = {k[: -len(".weight")] for k in ksd if k.startswith(("double_blocks.", "single_blocks."))
                  and k.endswith(".weight") and ksd[k].dim() == 2}
        assert meta["layers"] == {layer: {"format": "float8_e4m3fn"} for layer in layers}
        for layer in layers:
            assert f.get_tensor(layer + ".weight").dtype == torch.float8_e4m3fn
            scale = f.get_tensor(layer + ".weight_scale")
            assert scale.dtype == torch.float32 and scale.shape == ()
        assert keys == set(ksd) | {layer + ".weight_scale" for layer in layers}
        assert f.get_tensor("txt_in.weight").dtype == torch.bfloat16  # everything else as stored
        assert torch.equal(f.get_tensor("txt_in.weight"), ksd["txt_in.weight"])
    sd, info = load_model_file(path)
    assert info["format"] == "fp8 (comfy_quant)" and info["flux_config"] == KCFG
    for k, v in ksd.items():
        if k.split(".")[0].rstrip("0123456789") in ("double_blocks", "single_blocks") and v.dim() == 2:
            assert isinstance(sd[k], QTensor) and 0 < rel(dequantize(sd[k]), v) <= BOUND["fp8_e4m3fn_scaled"]
        else:
            assert torch.equal(sd[k], v), k
    assert 0 < report.overall_error <= BOUND["fp8_e4m3fn_scaled"]


def test_nf4_round_trip_is_bitsandbytes_layout(converted, ksd):
    path, report = converted("nf4")
    flat = load_file(path)  # the safetensors library reads what the streaming writer wrote
    k = "single_blocks.0.linear1.weight"
    qs = json.loads(bytes(flat[k + ".quant_state.bitsandbytes__nf4"].tolist()))
    assert qs["quant_type"] == "nf4" and qs["blocksize"] == 64 and qs["shape"] == list(ksd[k].shape)
    assert qs["dtype"] == "bfloat16"
    assert flat[k].dtype == torch.uint8 and flat[k].shape == (ksd[k].numel() // 2, 1)
    sd, info = load_model_file(path)
    assert info["format"] == "nf4" and isinstance(sd[k], QTensor)
    assert rel(dequantize(sd[k]), ksd[k]) <= BOUND["nf4"]
    assert torch.equal(sd["txt_in.weight"], ksd["txt_in.weight"])
    assert 0 < report.overall_error <= BOUND["nf4"]


def test_report_summary_names_what_was_done(converted):
    path, report = converted("Q4_K_M")
    text = report.summary()
    assert "Q4_K_M" in text and "Q5_K x2" in text and "F32 x" in text and "relative L2 error" in text
    assert "Mparam/s" in text and os.path.basename(path) + ".sha256" in text


# ---- inputs ----------------------------------------------------------------------------------------------------

def gguf_tensors(path):
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


def test_prefixed_checkpoint_converts_like_the_plain_file(tmp_path, converted, ksd):
    full = {f"model.diffusion_model.{k}": v for k, v in ksd.items()}
    full.update({f"first_stage_model.{k}": v for k, v in list(random_flux_vae_state_dict().items())[:4]})
    src = tmp_path / "checkpoint.safetensors"
    save_file(full, str(src))
    report = C.convert(src, tmp_path / "p.gguf", "Q8_0")
    assert gguf_tensors(tmp_path / "p.gguf") == gguf_tensors(converted("Q8_0")[0])
    assert any("model.diffusion_model." in n for n in report.notes)


@pytest.mark.parametrize("given", ["folder", "index", "pipeline"])
def test_diffusers_folder_converts_to_the_same_tensors_as_its_bfl_twin(tmp_path, converted, ksd, given):
    dif = bfl_to_diffusers(ksd, KCFG)
    assert "transformer_blocks.0.attn.to_q.weight" in dif and not any(k.startswith("double_blocks") for k in dif)
    folder = tmp_path / "FLUX.1-tiny" / "transformer"
    index = write_sharded(str(folder), dif, shards=3)
    src = {"folder": folder, "index": index, "pipeline": tmp_path / "FLUX.1-tiny"}[given]
    for to in ("BF16", "Q8_0"):
        report = C.convert(src, tmp_path / f"d-{to}.gguf", to)
        assert gguf_tensors(tmp_path / f"d-{to}.gguf") == gguf_tensors(converted(to)[0])  # byte for byte
        assert report.layout.startswith("diffusers") and "3 shards" in report.layout
    assert C.default_output_name(src, "Q4_K_M") == "FLUX.1-tiny-Q4_K_M.gguf"


def test_unquantized_gguf_converts_like_its_source(tmp_path, converted):
    bf16_gguf = converted("BF16")[0]
    C.convert(bf16_gguf, tmp_path / "from-gguf.gguf", "Q8_0")
    assert gguf_tensors(tmp_path / "from-gguf.gguf") == gguf_tensors(converted("Q8_0")[0])


@pytest.fixture(scope="module")
def t5_sd():
    return random_state_dict(t5_tensor_shapes(TINY_T5), seed=5, dtype=torch.bfloat16)


@pytest.mark.parametrize("to", ["Q8_0", "Q4_K_M", "F16"])
def test_t5_to_gguf_has_llama_cpp_names_and_loads(tmp_path, t5_sd, to):
    src = tmp_path / "t5.safetensors"
    save_file({**t5_sd, "encoder.embed_tokens.weight": t5_sd["shared.weight"].clone()}, str(src))  # HF: tied copy
    out = tmp_path / f"t5-{to}.gguf"
    report = C.convert(src, out, to)
    r = gguf.GGUFReader(str(out))
    assert r.fields["general.architecture"].contents() == "t5encoder"
    assert r.fields["t5encoder.block_count"].contents() == TINY_T5["num_layers"]
    assert r.fields["t5encoder.embedding_length"].contents() == TINY_T5["d_model"]
    assert r.fields["t5encoder.attention.relative_buckets_count"].contents() == 32
    name = llamacpp_names(TINY_T5["num_layers"])  # gguf-py's map, as llama.cpp's converter names T5 files
    assert {t.name for t in r.tensors} == {name(k) for k in t5_sd}
    types = {t.name: t.tensor_type.name for t in r.tensors}
    if to == "Q4_K_M":  # rows of 64: no K-quant fits; llama.cpp then keeps the embedding at Q8_0, the rest F16
        assert types["token_embd.weight"] == "Q8_0" and types["enc.blk.0.attn_q.weight"] == "F16"
    sd, info = read_text_encoder(str(out))
    assert info["kind"] == "t5" and info["t5_config"]["d_model"] == TINY_T5["d_model"]
    assert set(sd) == set(t5_sd)
    for k, v in t5_sd.items():
        assert rel(dequantize(sd[k]), v) <= 0.01
    assert report.overall_error <= 0.01 and report.kind == "t5"


def test_scaled_fp8_t5_converts_from_its_values(tmp_path, t5_sd):
    """A t5xxl_fp8_e4m3fn_scaled-style file (scaled_fp8 marker, per-layer scale_weight) -> GGUF of its values."""
    from kontext_lowvram.loaders.text_encoders import is_linear_weight
    flat, values = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, {}
    for k, v in t5_sd.items():
        if is_linear_weight(k):
            q = quantize(v, "fp8_e4m3fn_scaled")
            flat[k], flat[k[: -len(".weight")] + ".scale_weight"] = q.raw, q.aux["scale"]
            values[k] = dequantize(q)
        else:
            flat[k] = values[k] = v
    src = tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"
    save_file(flat, str(src))
    report = C.convert(src, tmp_path / "t5-fp8src.gguf", "F16")
    sd, _ = read_text_encoder(str(tmp_path / "t5-fp8src.gguf"))
    for k, v in values.items():
        assert torch.allclose(dequantize(sd[k]), v.float(), rtol=1e-3, atol=1e-6), k
    assert any("fp8" in n for n in report.notes)


def test_t5_to_scaled_fp8_loads_in_our_text_encoder_loader(tmp_path, t5_sd):
    src = tmp_path / "t5.safetensors"
    save_file(t5_sd, str(src))
    C.convert(src, tmp_path / "t5-fp8.safetensors", "fp8_e4m3fn_scaled")
    with safe_open(str(tmp_path / "t5-fp8.safetensors"), "pt") as f:
        layers = json.loads(f.metadata()["_quantization_metadata"])["layers"]
    assert "encoder.block.0.layer.0.SelfAttention.q" in layers and "shared" not in layers
    sd, info = read_text_encoder(str(tmp_path / "t5-fp8.safetensors"))
    assert info["kind"] == "t5" and info["quantized_tensors"] == len(layers)
    assert rel(dequantize(sd["encoder.block.1.layer.1.DenseReluDense.wo.weight"]),
               t5_sd["encoder.block.1.layer.1.DenseReluDense.wo.weight"]) < 0.04


# ---- refusals --------------------------------------------------------------------------------------------------

def test_nf4_is_not_offered_for_t5(tmp_path, t5_sd):
    save_file(t5_sd, str(tmp_path / "t5.safetensors"))
    with pytest.raises(C.ConvertError, match="nf4 is not offered for T5"):
        C.convert(tmp_path / "t5.safetensors", tmp_path / "t5-nf4.safetensors", "nf4")


@pytest.mark.parametrize("kind,match", [
    ("vae", "is a VAE"), ("clip", "is a CLIP text encoder"), ("lora", "is a LoRA"),
    ("flux2", "not a complete FLUX.2 transformer"),
    ("incomplete", "not a complete FLUX.1 transformer"), ("quantized_gguf", "already quantized"),
    ("nf4", "bitsandbytes 4-bit"), ("random", "not a model this converter knows")])
def test_refuses_what_it_cannot_convert_naming_the_file(tmp_path, ksd, kind, match):
    from kontext_lowvram.loaders.text_encoders import clip_l_tensor_shapes
    path = tmp_path / f"{kind}.safetensors"
    if kind == "vae":
        save_file(random_flux_vae_state_dict(), str(path))
    elif kind == "clip":
        save_file(random_state_dict(clip_l_tensor_shapes({"num_hidden_layers": 1, "vocab_size": 64}), seed=1),
                  str(path))
    elif kind == "lora":
        save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(8, 2),
                   "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(2.0)}, str(path))
    elif kind == "flux2":
        save_file({**ksd, "double_stream_modulation_img.lin.weight": torch.zeros(6, 4)}, str(path))
    elif kind == "incomplete":
        save_file({k: v for k, v in ksd.items() if "txt_mlp" not in k}, str(path))
    elif kind == "quantized_gguf":
        from kontext_lowvram.loaders import quantize_state_dict
        from kontext_lowvram.loaders.writers import write_gguf
        path = tmp_path / "q.gguf"
        write_gguf(path, quantize_state_dict(ksd, "Q8_0"))
    elif kind == "nf4":
        from kontext_lowvram.loaders import quantize_state_dict
        from kontext_lowvram.loaders.writers import write_safetensors
        write_safetensors(path, quantize_state_dict(ksd, "nf4"))
    else:
        save_file({"a.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(ModelFileError, match=match) as e:
        C.convert(path, tmp_path / "out.gguf", "Q8_0")
    assert str(path) in str(e.value)
    assert not os.path.exists(tmp_path / "out.gguf")


def test_diffusers_index_with_a_missing_shard_is_refused(tmp_path, ksd):
    index = write_sharded(str(tmp_path / "m"), bfl_to_diffusers(ksd, KCFG), shards=2)
    os.remove(tmp_path / "m" / "diffusion_pytorch_model-00002-of-00002.safetensors")
    with pytest.raises(ModelFileError, match="00002-of-00002.*not in its folder"):
        C.convert(index, tmp_path / "out.gguf", "Q8_0")


def test_output_must_match_the_type_and_not_be_the_input(tmp_path, kfile):
    with pytest.raises(C.ConvertError, match="give an output ending in .gguf"):
        C.convert(kfile, tmp_path / "x.safetensors", "Q8_0")
    with pytest.raises(C.ConvertError, match="ending in .safetensors or .sft"):
        C.convert(kfile, tmp_path / "x.gguf", "nf4")
    with pytest.raises(C.ConvertError, match="does not exist"):
        C.convert(kfile, tmp_path / "no" / "x.gguf", "Q8_0")
    with pytest.raises(ValueError, match="unknown type 'Q9'.*Q8_0"):
        C.convert(kfile, tmp_path / "x.gguf", "Q9")


# ---- atomic output ---------------------------------------------------------------------------------------------

def leftovers(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(C.PARTIAL) or ".tmp" in f)


def test_overwrite_needs_force_and_keeps_the_old_file_until_done(tmp_path, kfile):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old model")
    with pytest.raises(C.ConvertError, match="exists; pass --force"):
        C.convert(kfile, out, "Q8_0")
    assert out.read_bytes() == b"old model"

    def interrupt(done, total, nbytes, phase):
        if done == 7:
            assert out.read_bytes() == b"old model"  # replaced only once complete
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        C.convert(kfile, out, "Q8_0", force=True, progress=interrupt)
    assert out.read_bytes() == b"old model" and leftovers(tmp_path) == []
    report = C.convert(kfile, out, "Q8_0", force=True)
    assert out.read_bytes()[:4] == b"GGUF" and report.sidecar == str(out) + ".sha256"
    assert verify_sidecar(out) is not None


@pytest.mark.parametrize("to,phase", [("Q8_0", "convert"), ("Q8_0", "verify"), ("nf4", "convert"),
                                      ("fp8_e4m3fn_scaled", "verify")])
def test_interrupted_run_leaves_nothing(tmp_path, kfile, to, phase):
    out = out_name(tmp_path, to)

    def interrupt(done, total, nbytes, p):
        if p == phase and done == total // 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        C.convert(kfile, out, to, progress=interrupt)
    assert os.listdir(tmp_path) == []


def test_failure_mid_way_leaves_nothing(tmp_path, kfile, monkeypatch):
    calls = []
    real = C.encode_gguf

    def failing(t, qtype):
        calls.append(qtype)
        if len(calls) == 20:
            raise RuntimeError("disk on fire")
        return real(t, qtype)
    monkeypatch.setattr(C, "encode_gguf", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        C.convert(kfile, tmp_path / "m.gguf", "Q8_0")
    assert os.listdir(tmp_path) == []


def test_failed_verification_leaves_nothing(tmp_path, kfile, monkeypatch):
    monkeypatch.setattr(C, "_gguf_values", lambda raw, qtype, shape: torch.zeros(shape))
    with pytest.raises(ModelFileError, match="verification failed"):
        C.convert(kfile, tmp_path / "m.gguf", "Q8_0")
    assert os.listdir(tmp_path) == []


def test_progress_counts_tensors_per_phase(tmp_path, kfile, ksd):
    seen = []
    C.convert(kfile, tmp_path / "m.gguf", "Q8_0", progress=lambda d, t, b, p: seen.append((p, d, t, b)))
    n = len(ksd)
    assert [s[:3] for s in seen] == [("convert", i + 1, n) for i in range(n)] + [("verify", i + 1, n) for i in range(n)]
    assert seen[n - 1][3] == sum(v.numel() * 2 for v in ksd.values())  # bf16 source bytes
    seen.clear()
    C.convert(kfile, tmp_path / "n.gguf", "Q8_0", verify=False, progress=lambda d, t, b, p: seen.append(p))
    assert set(seen) == {"convert"}


def test_streaming_safetensors_writer_reads_back_with_the_library(tmp_path):
    from kontext_lowvram.loaders.safetensors_header import read_header
    from kontext_lowvram.loaders.stream_safetensors import StreamingSafetensorsWriter, header_bound
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.uint8), "c": torch.tensor(2.5),
               "d": torch.randn(4).to(torch.float8_e4m3fn), "e": torch.randn(2, 2).to(torch.bfloat16),
               "f": torch.zeros(0, 3)}
    meta = {"x": json.dumps({"k": [1, 2]})}
    w = StreamingSafetensorsWriter(str(tmp_path / "s.safetensors"), header_bound(list(tensors), meta))
    for k, v in tensors.items():
        w.write(k, v)
    w.close(meta)
    back = load_file(str(tmp_path / "s.safetensors"))
    assert set(back) == set(tensors) and all(torch.equal(back[k].view(torch.uint8) if back[k].dtype ==
                                                         torch.float8_e4m3fn else back[k],
                                                         v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn
                                                         else v) for k, v in tensors.items())
    with safe_open(str(tmp_path / "s.safetensors"), "pt") as f:
        assert f.metadata() == meta
    assert read_header(str(tmp_path / "s.safetensors"))[1] == meta  # our validator takes it too


def test_converts_under_inference_mode(tmp_path, kfile, converted):
    """ComfyUI runs nodes under torch.inference_mode; the quantizers' worker threads do not inherit it."""
    with torch.inference_mode():
        C.convert(kfile, tmp_path / "m.gguf", "Q4_K_M")
    assert gguf_tensors(tmp_path / "m.gguf") == gguf_tensors(converted("Q4_K_M")[0])
