"""FLUX.2's LLM text-encoder files (Qwen3-4B / 8B, Mistral-3 24B) -> ComfyUI-named state dicts (no ComfyUI needed).

Detection is checked on shape tables of the real layouts (full size: no tensors needed) and on tiny real-layout
files; GGUF names against gguf-py's own TensorNameMap, values against gguf-py's own quantizer/dequantizer, and the
llama-arch q/k row order against llama.cpp's converter permute (written out in fixtures/llm_text_encoders.py).
"""
import json

import gguf
import pytest
import torch
from safetensors.torch import save_file

from fixtures.llm_text_encoders import (TINY_QWEN3_4B, TINY_QWEN3_8B, llamacpp_llm_names, llamacpp_permute,
                                        random_llm_state_dict, write_llamacpp_llm)
from kontext_lowvram.loaders import ModelFileError
from kontext_lowvram.loaders.text_encoders_llm import (LLM_CONFIGS, TEKKEN, _unpermute, describe_llm,
                                                       is_llm_linear_weight, llamacpp_llm_name, llm_config_overrides,
                                                       llm_tensor_shapes, probe_llm_text_encoder, read_llm_text_encoder)
from kontext_lowvram.loaders.writers import write_safetensors
from kontext_lowvram.optimizations import QTensor, dequantize, quantize


@pytest.mark.parametrize("model_type,pruned,layers", [("qwen3_4b", False, 36), ("qwen3_8b", False, 36),
                                                      ("mistral3_24b", False, 40), ("mistral3_24b", True, 30)])
def test_full_size_layouts_are_detected_as_comfyui_does(model_type, pruned, layers):
    shapes = llm_tensor_shapes(model_type, pruned=pruned)
    d = describe_llm(shapes)
    assert d["model_type"] == model_type and d["pruned"] == pruned and d["num_layers"] == layers
    assert d["overrides"] == {} and llm_config_overrides(d) == {}
    assert d["layers"] == ([10, 20, 30] if model_type.startswith("mistral") else [9, 18, 27])
    if pruned:
        assert "model.norm.weight" not in shapes and d["config"]["num_hidden_layers"] == 30


def test_reduced_size_gives_the_host_config_override():
    d = describe_llm(llm_tensor_shapes("qwen3_4b", TINY_QWEN3_4B))
    assert d["model_type"] == "qwen3_4b"
    assert llm_config_overrides(d) == {"qwen3_4b_model_config": TINY_QWEN3_4B}
    d = describe_llm(llm_tensor_shapes("qwen3_8b", TINY_QWEN3_8B))
    assert d["model_type"] == "qwen3_8b" and d["overrides"] == TINY_QWEN3_8B
    small = {"vocab_size": 300, "intermediate_size": 64, "num_attention_heads": 1, "num_key_value_heads": 1}
    d = describe_llm(llm_tensor_shapes("mistral3_24b", {**small, "num_hidden_layers": 30}, pruned=True))
    assert d["pruned"] and d["overrides"] == small  # ComfyUI's pruned variant sets its 30 layers itself
    d = describe_llm(llm_tensor_shapes("mistral3_24b", {**small, "num_hidden_layers": 40}))
    assert not d["pruned"] and d["overrides"] == small


@pytest.mark.parametrize("change,match", [
    (lambda s: s.update({"model.layers.0.self_attn.k_proj.bias": (1024,)}), "Qwen2.5"),
    (lambda s: [s.pop(k) for k in [k for k in s if k.startswith("model.layers.30.")]], "layer\\(s\\) \\[30\\]"),
    (lambda s: [s.pop(k) for k in [k for k in s if k.startswith(("model.layers.2", "model.layers.3"))
                                   and not k.startswith(("model.layers.2.", "model.layers.3."))]], "has 20 layers"),
    (lambda s: s.update({"model.layers.3.mlp.up_proj.weight": (9728, 2048)}), "has shape"),
    (lambda s: s.pop("model.layers.5.mlp.down_proj.weight"), "incomplete"),
])
def test_damaged_or_other_llms_are_refused_by_name(change, match):
    s = dict(llm_tensor_shapes("qwen3_4b"))
    change(s)
    with pytest.raises(ModelFileError, match=match):
        describe_llm(s, "/m/qwen_3_4b.safetensors")


def test_other_models_are_named():
    qwen2b = {k: tuple(2048 if d == 2560 else d for d in v) for k, v in llm_tensor_shapes("qwen3_4b").items()}
    with pytest.raises(ModelFileError, match="2048-wide Qwen3"):
        describe_llm(qwen2b, "q.safetensors")
    llama = {k: tuple(4096 if d == 5120 else d for d in v) for k, v in llm_tensor_shapes("mistral3_24b").items()}
    with pytest.raises(ModelFileError, match="Llama-3-8B"):
        describe_llm(llama, "l.safetensors")
    with pytest.raises(ModelFileError, match="T5 encoder"):
        describe_llm({"encoder.block.0.layer.0.SelfAttention.q.weight": (4096, 4096)}, "t5.safetensors")
    with pytest.raises(ModelFileError, match="FLUX diffusion model"):
        describe_llm({"double_blocks.0.img_attn.qkv.weight": (9, 3)}, "f.safetensors")


def test_llamacpp_names_invert_gguf_py_map():
    for model_type in ("qwen3_4b", "mistral3_24b"):
        shapes = llm_tensor_shapes(model_type, {"num_hidden_layers": 31} if "mistral" in model_type else None)
        name = llamacpp_llm_names(model_type, 40)
        for hf in shapes:
            assert llamacpp_llm_name(name(hf)) == hf
    assert llamacpp_llm_name("output.weight") == "lm_head.weight" and llamacpp_llm_name("rope_freqs.weight") is None
    with pytest.raises(KeyError):
        llamacpp_llm_name("blk.0.mystery.weight")


def test_linear_weights_are_the_ones_comfyui_builds_as_linear():
    shapes = llm_tensor_shapes("qwen3_4b")
    linear = [k for k in shapes if is_llm_linear_weight(k)]
    assert len(linear) == 7 * 36 and not any("norm" in k or "embed" in k for k in linear)


def test_unpermute_inverts_llamacpp_permute_plain_and_q8_0():
    w = torch.randn(8 * 128, 64)
    for heads in (8, 2):
        assert torch.equal(_unpermute(torch.from_numpy(llamacpp_permute(w.numpy(), heads)), heads), w)
    q = gguf.quants.quantize(llamacpp_permute(w.numpy(), 8), gguf.GGMLQuantizationType.Q8_0)
    qt = QTensor(torch.from_numpy(q), qformat="gguf", shape=w.shape, meta={"qtype": "Q8_0"})
    got = dequantize(_unpermute(qt, 8), torch.float32)
    want = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0),
                                  gguf.GGMLQuantizationType.Q8_0).reshape(w.shape)
    assert torch.equal(got, torch.from_numpy(want))


@pytest.fixture(scope="module")
def qwen_sd():
    return random_llm_state_dict("qwen3_4b", TINY_QWEN3_4B, seed=3)


def test_bf16_qwen3_roundtrip_with_prefix_and_probe(tmp_path, qwen_sd):
    p = tmp_path / "qwen_3_4b.safetensors"
    save_file({"text_encoders.qwen3_4b.transformer." + k: v for k, v in qwen_sd.items()}
              | {"lm_head.weight": torch.zeros(64, 2560, dtype=torch.bfloat16)}, p)
    sd, info = read_llm_text_encoder(p)
    assert sd.keys() == qwen_sd.keys() and all(torch.equal(sd[k], qwen_sd[k]) for k in sd)
    assert info["model_type"] == "qwen3_4b" and info["quantized_tensors"] == 0 and not info["pruned"]
    probe = probe_llm_text_encoder(p)  # header only
    assert {k: probe[k] for k in ("model_type", "pruned", "overrides", "layers")} == \
        {k: info[k] for k in ("model_type", "pruned", "overrides", "layers")}


@pytest.mark.parametrize("style", ["plain", "scaled", "comfy_quant"])
def test_fp8_qwen3_linear_weights_stay_quantized(tmp_path, qwen_sd, style):
    fmt = "fp8_e4m3fn" if style == "plain" else "fp8_e4m3fn_scaled"
    q = {k: quantize(v.float(), fmt) if is_llm_linear_weight(k) else v for k, v in qwen_sd.items()}
    p = tmp_path / f"qwen_{style}.safetensors"
    write_safetensors(p, q, fp8_style="scaled" if style == "plain" else style)
    sd, info = read_llm_text_encoder(p)
    assert sd.keys() == qwen_sd.keys() and info["quantized_tensors"] == 7 * 28
    for k, v in q.items():
        if isinstance(v, QTensor):
            assert isinstance(sd[k], QTensor) and sd[k].qformat == "fp8" and sd[k].shape == v.shape
            want = v.raw.float() * (v.aux["scale"].float() if "scale" in v.aux else 1.0)
            assert torch.equal(dequantize(sd[k], torch.float32), want)
        else:
            assert torch.equal(sd[k], v)


def test_gguf_qwen3_q8_0_as_llamacpp_writes_it(tmp_path, qwen_sd):
    p = tmp_path / "Qwen3-4B-Q8_0.gguf"
    ref = write_llamacpp_llm(p, "qwen3_4b", qwen_sd, {**LLM_CONFIGS["qwen3_4b"], **TINY_QWEN3_4B})
    sd, info = read_llm_text_encoder(p)
    assert info["architecture"] == "qwen3" and info["model_type"] == "qwen3_4b" and sd.keys() == ref.keys()
    assert info["quantized_tensors"] == 7 * 28 and info["tensor_types"].get("Q8_0") == 7 * 28
    for k in ref:
        got = dequantize(sd[k], torch.float32) if isinstance(sd[k], QTensor) else sd[k].float()
        assert torch.equal(got, ref[k]), k
    assert probe_llm_text_encoder(p)["overrides"] == TINY_QWEN3_4B


def test_gguf_mistral_llama_arch_is_unpermuted_and_needs_tekken(tmp_path):
    cfg = {"vocab_size": 64, "intermediate_size": 32, "num_hidden_layers": 30, "num_attention_heads": 2,
           "num_key_value_heads": 1}
    sd = random_llm_state_dict("mistral3_24b", cfg, seed=4, pruned=True)
    p = tmp_path / "mistral-pruned-Q8_0.gguf"
    ref = write_llamacpp_llm(p, "mistral3_24b", sd, {**LLM_CONFIGS["mistral3_24b"], **cfg})
    with pytest.raises(ModelFileError, match="tekken"):
        read_llm_text_encoder(p)
    (tmp_path / "mistral-pruned-Q8_0.tekken.json").write_text(json.dumps({"config": {}}))
    got, info = read_llm_text_encoder(p)
    assert info["architecture"] == "llama" and info["pruned"] and TEKKEN in got
    for k in ref:
        v = dequantize(got[k], torch.float32) if isinstance(got[k], QTensor) else got[k].float()
        assert torch.equal(v, ref[k]), k


def test_mistral_safetensors_without_tokenizer_is_refused(tmp_path):
    cfg = {"vocab_size": 64, "intermediate_size": 32, "num_hidden_layers": 30, "num_attention_heads": 1,
           "num_key_value_heads": 1}
    sd = random_llm_state_dict("mistral3_24b", cfg, seed=5, pruned=True)
    p = tmp_path / "m.safetensors"
    save_file(sd, p)
    with pytest.raises(ModelFileError, match="tekken_model"):
        read_llm_text_encoder(p)
    save_file({**sd, TEKKEN: torch.frombuffer(bytearray(b'{"config": {}}'), dtype=torch.uint8)}, p)
    got, info = read_llm_text_encoder(p)
    assert info["model_type"] == "mistral3_24b" and info["pruned"] and got[TEKKEN].dtype == torch.uint8
