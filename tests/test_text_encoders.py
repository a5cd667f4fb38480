"""CLIP-L / T5 text-encoder files in every supported format -> ComfyUI-named state dicts (no ComfyUI needed).

References are independent of our code: gguf-py's own T5 name map (TensorNameMap) and dequantizer, and the fp8
values computed here from the stored bytes and scale.
"""
import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kontext_lowvram.loaders import ModelFileError
from kontext_lowvram.loaders.text_encoders import (T5_XXL, clip_l_tensor_shapes, is_linear_weight, llamacpp_t5_name,
                                                   pair_by_kind, pick_device_policy,
                                                   read_text_encoder, t5_config_overrides, t5_tensor_shapes)
from kontext_lowvram.loaders.writers import write_gguf, write_safetensors
from kontext_lowvram.optimizations import QTensor, dequantize, quantize
from fixtures.text_encoders import random_state_dict
from t5_files import TINY_T5, llamacpp_names, write_llamacpp_t5

TINY_CLIP = {"intermediate_size": 64, "num_hidden_layers": 1, "vocab_size": 1000}


@pytest.fixture(scope="module")
def t5_sd():
    return random_state_dict(t5_tensor_shapes(TINY_T5), seed=1)


@pytest.fixture(scope="module")
def clip_sd():
    return random_state_dict(clip_l_tensor_shapes(TINY_CLIP), seed=2)


def test_llamacpp_names_invert_gguf_py_map(t5_sd):
    name = llamacpp_names(TINY_T5["num_layers"])
    for hf in t5_sd:
        assert llamacpp_t5_name(name(hf)) == hf
    assert llamacpp_t5_name("dec.blk.0.attn_q.weight") is None and llamacpp_t5_name("output.weight") is None
    with pytest.raises(KeyError):
        llamacpp_t5_name("enc.blk.0.mystery.weight")


def test_bf16_t5_and_clip_roundtrip(tmp_path, t5_sd, clip_sd):
    save_file(t5_sd, tmp_path / "t5.safetensors")
    save_file({"text_encoders.clip_l.transformer." + k: v for k, v in clip_sd.items()}, tmp_path / "clip.safetensors")
    sd, info = read_text_encoder(tmp_path / "t5.safetensors")
    assert info["kind"] == "t5" and info["quantized_tensors"] == 0
    assert info["t5_config"] == {**T5_XXL, **TINY_T5}
    assert t5_config_overrides(info["t5_config"]) == TINY_T5
    assert sd.keys() == t5_sd.keys() and all(torch.equal(sd[k], t5_sd[k]) for k in sd)
    sd, info = read_text_encoder(tmp_path / "clip.safetensors")  # prefix stripped
    assert info["kind"] == "clip_l" and sd.keys() == clip_sd.keys()
    assert all(torch.equal(sd[k], clip_sd[k]) for k in sd)


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "fp8_e4m3fn_scaled", "fp8_e5m2"])
def test_fp8_t5_values(tmp_path, t5_sd, fmt):
    q = {k: quantize(v.float(), fmt) if v.ndim == 2 else v for k, v in t5_sd.items()}
    write_safetensors(tmp_path / "t5.safetensors", q, fp8_style="scaled")
    sd, info = read_text_encoder(tmp_path / "t5.safetensors")
    assert sd.keys() == t5_sd.keys() and info["kind"] == "t5"
    n_linear = 0
    for k, v in q.items():
        if not isinstance(v, QTensor):
            assert torch.equal(sd[k], v)
            continue
        expected = v.raw.float() * (v.aux["scale"].float() if "scale" in v.aux else 1.0)
        if is_linear_weight(k):  # stays quantized: our ops dequantize it on the fly
            n_linear += 1
            assert isinstance(sd[k], QTensor) and sd[k].qformat == "fp8" and sd[k].shape == v.shape
            assert torch.equal(dequantize(sd[k], torch.float32), expected)
        else:  # embedding / relative bias: ComfyUI builds these as float layers
            assert not isinstance(sd[k], QTensor) and sd[k].dtype == torch.float32
            assert torch.equal(sd[k], expected)
    assert info["quantized_tensors"] == n_linear == 7 * TINY_T5["num_layers"]


def test_llamacpp_gguf_t5_q8_0(tmp_path, t5_sd):
    decoder = {"dec.blk.0.attn_q.weight": torch.randn(64, 64), "output.weight": torch.randn(32128, 64)}
    ref = write_llamacpp_t5(tmp_path / "t5-q8_0.gguf", t5_sd, extra=decoder)
    sd, info = read_text_encoder(tmp_path / "t5-q8_0.gguf")
    assert info["kind"] == "t5" and info["architecture"] == "t5encoder"
    assert sd.keys() == t5_sd.keys()  # decoder and LM head dropped, names mapped
    for k, v in sd.items():
        assert tuple(v.shape) == tuple(t5_sd[k].shape), k
        assert isinstance(v, QTensor) == is_linear_weight(k), k
        assert torch.equal(dequantize(v, torch.float32), ref[k]), k
    assert (dequantize(sd["shared.weight"]) - t5_sd["shared.weight"].float()).abs().max() < 0.02  # Q8_0 is close
    plain, _ = read_text_encoder(tmp_path / "t5-q8_0.gguf", keep_quantized=False)
    assert not any(isinstance(v, QTensor) for v in plain.values())


def test_comfy_named_gguf_t5_and_clip(tmp_path, t5_sd, clip_sd):
    q = {k: quantize(v.float(), "Q8_0") if is_linear_weight(k) else v for k, v in t5_sd.items()}
    write_gguf(tmp_path / "t5.gguf", q, arch="t5encoder")
    sd, info = read_text_encoder(tmp_path / "t5.gguf")
    assert info["kind"] == "t5" and info["quantized_tensors"] == 7 * TINY_T5["num_layers"]
    for k, v in q.items():
        ref = gguf.quants.dequantize(v.raw.numpy(), gguf.GGMLQuantizationType.Q8_0) if isinstance(v, QTensor) else v.float()
        assert torch.equal(dequantize(sd[k]), torch.as_tensor(np.asarray(ref)).reshape(v.shape).float()), k
    write_gguf(tmp_path / "clip.gguf", clip_sd, arch="clip")
    sd, info = read_text_encoder(tmp_path / "clip.gguf")
    assert info["kind"] == "clip_l" and all(torch.equal(sd[k], clip_sd[k]) for k in clip_sd)


def test_bad_files(tmp_path, t5_sd, tiny_sd, clip_sd):
    cases = {}
    save_file(t5_sd, tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    cases["trunc.safetensors"] = "truncated or corrupt"
    write_llamacpp_t5(tmp_path / "ok.gguf", t5_sd)
    data = (tmp_path / "ok.gguf").read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) // 2])
    cases["trunc.gguf"] = "GGUF"
    save_file(tiny_sd, tmp_path / "flux.safetensors")
    cases["flux.safetensors"] = "FLUX transformer"
    write_gguf(tmp_path / "flux.gguf", tiny_sd)
    cases["flux.gguf"] = "architecture 'flux'"
    save_file(random_state_dict(clip_l_tensor_shapes({**TINY_CLIP, "hidden_size": 1280})), tmp_path / "clip_g.safetensors")
    cases["clip_g.safetensors"] = "CLIP-G"
    v10 = {k.replace("wi_1", "wi"): v for k, v in t5_sd.items() if "wi_0" not in k}
    save_file(v10, tmp_path / "t5v10.safetensors")
    cases["t5v10.safetensors"] = "T5 v1.0"
    umt5 = dict(t5_sd, **{"shared.weight": torch.zeros(256384, 64, dtype=torch.bfloat16)})
    save_file(umt5, tmp_path / "umt5.safetensors")
    cases["umt5.safetensors"] = "256384-token"
    save_file({k: v for k, v in t5_sd.items() if "relative_attention" not in k}, tmp_path / "partial.safetensors")
    cases["partial.safetensors"] = "incomplete T5"
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x02" + b"\x00" * 64)
    cases["model.ckpt"] = "pickle"
    for name, msg in cases.items():
        with pytest.raises(ModelFileError, match=msg) as e:
            read_text_encoder(tmp_path / name)
        assert name in str(e.value)


def test_pairing_and_device_policy():
    infos = [{"kind": "clip_l"}, {"kind": "t5"}]
    assert pair_by_kind(infos[::-1], ["a", "b"]) == ["t5", "clip_l"]
    with pytest.raises(ModelFileError, match="both text encoder inputs are clip_l"):
        pair_by_kind([infos[0], infos[0]], ["a", "b"])
    gb = 1 << 30
    assert pick_device_policy("auto", None, 5 * gb) == "cpu"  # no GPU
    assert pick_device_policy("gpu_then_release", None, 5 * gb) == "cpu"
    assert pick_device_policy("cpu", 80 * gb, 5 * gb) == "cpu"
    assert pick_device_policy("gpu_then_release", 1 * gb, 5 * gb) == "gpu_then_release"  # asked for: honoured
    assert pick_device_policy("auto", 7 * gb, 5 * gb) == "gpu_then_release"
    assert pick_device_policy("auto", 6 * gb, 5 * gb) == "cpu"  # 5.5 GB + 1 GB headroom does not fit
    with pytest.raises(ValueError):
        pick_device_policy("gpu", 1, 1)
