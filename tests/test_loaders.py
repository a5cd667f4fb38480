"""Readers on real files written in the test (gguf's GGUFWriter, safetensors), against independent references."""
import json
import struct

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kontext_lowvram.loaders import ModelFileError, convert_state_dict, load_model_file, load_state_dict
from kontext_lowvram.loaders.writers import write_gguf, write_safetensors
from kontext_lowvram.optimizations import QTensor, dequantize

BLOCK_KEY = "double_blocks.0.img_attn.qkv.weight"


def quantized(sd, fmt):
    return convert_state_dict(sd, fmt, {})


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_bf16_safetensors_is_plain(tmp_path, tiny_sd, tiny_cfg):
    p = tmp_path / "m.safetensors"
    save_file({"model.diffusion_model." + k: v for k, v in tiny_sd.items()}, str(p))
    sd, info = load_model_file(p)
    assert set(sd) == set(tiny_sd)  # prefix stripped
    assert all(torch.equal(sd[k], tiny_sd[k]) for k in sd)
    assert info["format"] == "bfloat16" and info["flux_config"] == tiny_cfg


@pytest.mark.parametrize("style,label", [("scaled", "fp8 (scaled)"), ("comfy_quant", "fp8 (comfy_quant)")])
def test_scaled_fp8_round_trip(tmp_path, tiny_sd, style, label):
    q = quantized(tiny_sd, "fp8_e4m3fn_scaled")
    p = write_safetensors(tmp_path / "m.safetensors", q, fp8_style=style)
    sd, info = load_model_file(p)
    assert info["format"] == label
    t = sd[BLOCK_KEY]
    assert isinstance(t, QTensor) and t.qformat == "fp8" and t.shape == tiny_sd[BLOCK_KEY].shape
    # independent reference: fp8 values times the scale, in float32
    ref = q[BLOCK_KEY].raw.float() * q[BLOCK_KEY].aux["scale"]
    assert torch.equal(dequantize(t), ref)
    assert rel_err(dequantize(t), tiny_sd[BLOCK_KEY].float()) < 0.04
    assert not any(k.endswith(("scale_weight", "weight_scale", "comfy_quant")) or k == "scaled_fp8" for k in sd)


def test_plain_fp8_e5m2(tmp_path, tiny_sd):
    flat = {k: (v.to(torch.float8_e5m2) if k == BLOCK_KEY else v) for k, v in tiny_sd.items()}
    save_file(flat, str(tmp_path / "m.safetensors"))
    sd, info = load_model_file(tmp_path / "m.safetensors")
    assert info["format"] == "fp8 (plain)"
    assert torch.equal(dequantize(sd[BLOCK_KEY]), flat[BLOCK_KEY].float())


def test_nf4_bnb_round_trip(tmp_path, tiny_sd):
    q = quantized(tiny_sd, "nf4")
    p = write_safetensors(tmp_path / "m.safetensors", {"model.diffusion_model." + k: v for k, v in q.items()})
    header_keys = json.loads(open(p, "rb").read()[8:8 + struct.unpack("<Q", open(p, "rb").read(8))[0]])
    assert "model.diffusion_model." + BLOCK_KEY + ".quant_state.bitsandbytes__nf4" in header_keys
    sd, info = load_model_file(p)
    assert info["format"] == "nf4" and sd[BLOCK_KEY].qformat == "nf4"
    assert torch.equal(dequantize(sd[BLOCK_KEY]), dequantize(q[BLOCK_KEY]))
    assert rel_err(dequantize(sd[BLOCK_KEY]), tiny_sd[BLOCK_KEY]) < 0.15


@pytest.mark.parametrize("qtype", ["Q8_0", "Q5_1", "Q4_0"])
def test_gguf_round_trip_vs_gguf_py(tmp_path, tiny_sd, qtype):
    q = quantized({k: v.float() for k, v in tiny_sd.items()}, "q8_0") if qtype == "Q8_0" else \
        {k: (QTensor(torch.from_numpy(gguf.quants.quantize(v.float().numpy(), gguf.GGMLQuantizationType[qtype])),
                     qformat="gguf", shape=v.shape, meta={"qtype": qtype}) if k.startswith("double_blocks") and v.ndim == 2 else v)
         for k, v in tiny_sd.items()}
    p = write_gguf(tmp_path / "m.gguf", q)
    sd, info = load_model_file(p)
    assert info["architecture"] == "flux" and qtype in info["tensor_types"]
    # independent reference: gguf-py reads the file and dequantizes with its own numpy code
    reader = gguf.GGUFReader(str(p))
    t = next(t for t in reader.tensors if t.name == BLOCK_KEY)
    ref = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
    assert torch.equal(dequantize(sd[BLOCK_KEY]), ref.reshape(sd[BLOCK_KEY].shape))
    assert torch.equal(sd["img_in.weight"].to(torch.bfloat16), tiny_sd["img_in.weight"])  # kept full precision


def test_on_load_conversion_error_bounds(tiny_sd):
    w = tiny_sd[BLOCK_KEY].float()
    for fmt, bound in [("q8_0", 0.01), ("fp8_e4m3fn_scaled", 0.04), ("nf4", 0.15)]:
        sd = quantized(tiny_sd, fmt)
        assert isinstance(sd[BLOCK_KEY], QTensor)
        assert not isinstance(sd["img_in.weight"], QTensor)  # input/output projections stay full precision
        assert rel_err(dequantize(sd[BLOCK_KEY]), w) < bound, fmt


def test_conversion_skips_quantized_file(tiny_sd):
    q = quantized(tiny_sd, "nf4")
    info = {}
    assert convert_state_dict(q, "q8_0", info) is q and info["conversion"].startswith("q8_0 skipped: file is already")


# ---- bad input: clear errors naming the file, never a crash or a pickle load ----

def _gguf_file(tmp_path, tiny_sd, arch="flux"):
    return write_gguf(tmp_path / "m.gguf", quantized({k: v.float() for k, v in tiny_sd.items()}, "q8_0"), arch=arch)


def test_truncated_gguf(tmp_path, tiny_sd):
    p = _gguf_file(tmp_path, tiny_sd)
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="m.gguf.*(truncated|corrupt)"):
        load_state_dict(p)


def test_corrupt_gguf_header(tmp_path, tiny_sd):
    p = _gguf_file(tmp_path, tiny_sd)
    data = bytearray(open(p, "rb").read())
    data[8:24] = b"\xff" * 16  # tensor/kv counts become absurd
    open(p, "wb").write(bytes(data))
    with pytest.raises(ModelFileError, match="m.gguf"):
        load_state_dict(p)


def _set_gguf_type_id(path, tensor_name, type_id):
    """Rewrite one tensor's ggml type id in a GGUF file's tensor-info table; returns the old id."""
    data = bytearray(open(path, "rb").read())
    name = tensor_name.encode()
    pos = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)  # after the length-prefixed name
    type_pos = pos + 4 + 8 * struct.unpack_from("<I", data, pos)[0]  # skip n_dims (u32) and the dims (u64 each)
    old = struct.unpack_from("<I", data, type_pos)[0]
    struct.pack_into("<I", data, type_pos, type_id)
    open(path, "wb").write(bytes(data))
    return old


def test_unknown_gguf_quant_type(tmp_path, tiny_sd):
    p = _gguf_file(tmp_path, tiny_sd)
    assert _set_gguf_type_id(p, BLOCK_KEY, 9999) == gguf.GGMLQuantizationType.Q8_0
    with pytest.raises(ModelFileError, match="m.gguf.*quant type"):
        load_state_dict(p)


def test_gguf_type_known_to_gguf_but_unsupported(tmp_path, tiny_sd):
    p = _gguf_file(tmp_path, tiny_sd)
    _set_gguf_type_id(p, BLOCK_KEY, int(gguf.GGMLQuantizationType.IQ2_XXS))
    with pytest.raises(ModelFileError, match="m.gguf.*IQ2_XXS"):
        load_state_dict(p)


def test_wrong_architecture(tmp_path, tiny_sd):
    with pytest.raises(ModelFileError, match="text-encoder"):
        load_state_dict(_gguf_file(tmp_path, tiny_sd, arch="t5encoder"))
    p = tmp_path / "vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(8, 16, 3, 3)}, str(p))
    with pytest.raises(ModelFileError, match="vae.safetensors.*not a FLUX transformer"):
        load_state_dict(p)


def test_truncated_and_corrupt_safetensors(tmp_path, tiny_sd):
    p = tmp_path / "m.safetensors"
    save_file(tiny_sd, str(p))
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) - 1000])
    with pytest.raises(ModelFileError, match="m.safetensors.*ends at byte"):
        load_state_dict(p)
    n = struct.unpack("<Q", data[:8])[0]
    open(p, "wb").write(data[:8] + b"{" + b"x" * (n - 1) + data[8 + n:])
    with pytest.raises(ModelFileError, match="m.safetensors.*corrupt safetensors header"):
        load_state_dict(p)


def test_paths_that_are_not_model_files(tmp_path):
    with pytest.raises(ModelFileError, match="no such file"):
        load_state_dict(tmp_path / "missing.gguf")
    with pytest.raises(ModelFileError, match="is a directory"):
        load_state_dict(tmp_path)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ModelFileError, match="empty"):
        load_state_dict(tmp_path / "empty.gguf")
    pkl = tmp_path / "model.ckpt"
    torch.save({"a": torch.zeros(1)}, str(pkl))
    with pytest.raises(ModelFileError, match="never loaded"):
        load_state_dict(pkl)


def test_writer_leaves_no_partial_file(tmp_path, tiny_sd):
    bad = dict(quantized(tiny_sd, "nf4"))
    with pytest.raises(ValueError):
        write_gguf(tmp_path / "out.gguf", bad)  # nf4 cannot go into GGUF
    assert list(tmp_path.iterdir()) == []


def test_gguf_with_diffusion_model_prefix(tmp_path, tiny_sd):
    q = quantized({k: v.float() for k, v in tiny_sd.items()}, "q8_0")
    p = write_gguf(tmp_path / "m.gguf", {"model.diffusion_model." + k: v for k, v in q.items()})
    sd = load_state_dict(p)
    assert set(sd) == set(tiny_sd)
    assert torch.equal(dequantize(sd[BLOCK_KEY]), dequantize(q[BLOCK_KEY]))


def test_comfy_quant_per_layer_keys(tmp_path, tiny_sd):
    """The layout ComfyUI itself produces (`<layer>.comfy_quant` JSON tensors + `weight_scale`)."""
    q = quantized(tiny_sd, "fp8_e4m3fn_scaled")
    flat = {}
    for k, v in q.items():
        if isinstance(v, QTensor):
            layer = k[: -len(".weight")]
            flat[k] = v.raw
            flat[layer + ".weight_scale"] = v.aux["scale"]
            flat[layer + ".input_scale"] = torch.tensor(1.0)
            flat[layer + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
        else:
            flat[k] = v
    save_file(flat, str(tmp_path / "m.safetensors"))
    sd, info = load_model_file(tmp_path / "m.safetensors")
    assert info["format"] == "fp8 (comfy_quant)" and set(sd) == set(tiny_sd)
    assert torch.equal(dequantize(sd[BLOCK_KEY]), dequantize(q[BLOCK_KEY]))


def test_comfy_quant_format_we_do_not_run_points_to_core(tmp_path, tiny_sd):
    flat = dict(tiny_sd)
    flat[BLOCK_KEY[: -len(".weight")] + ".comfy_quant"] = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    save_file(flat, str(tmp_path / "m.safetensors"))
    with pytest.raises(ModelFileError, match="nvfp4.*Load Diffusion Model"):
        load_state_dict(tmp_path / "m.safetensors")


def test_load_summary_says_what_the_load_did(tmp_path, tiny_sd):
    """The loader's one log line: file, format, resident GiB, quantized count, and a skipped conversion."""
    from kontext_lowvram.loaders import load_summary, resident_bytes
    q = quantized({k: v.float() for k, v in tiny_sd.items()}, "q8_0")
    p = write_gguf(tmp_path / "m.gguf", q)
    sd, info = load_model_file(p, convert="nf4")
    line = load_summary(sd, info)
    n_quant = sum(isinstance(v, QTensor) for v in sd.values())
    assert line.startswith("m.gguf: GGUF ") and "Q8_0 x" in line and f"{n_quant} of {len(sd)} tensors quantized" in line
    assert f"{resident_bytes(sd) / 2**30:.2f} GiB resident" in line
    assert line.endswith("; convert_on_load=nf4 skipped: file is already GGUF Q8_0")
    sd, info = load_model_file(write_safetensors(tmp_path / "b.safetensors", tiny_sd), convert="q8_0")
    n_quant = sum(isinstance(v, QTensor) for v in sd.values())
    assert n_quant > 0 and "b.safetensors: bfloat16;" in load_summary(sd, info)
    assert load_summary(sd, info).endswith(f"; convert_on_load=q8_0: {n_quant} tensors quantized")
    sd, info = load_model_file(tmp_path / "b.safetensors")
    assert load_summary(sd, info).endswith("0 of %d tensors quantized; no conversion" % len(sd))


def test_skipped_conversion_names_the_files_own_format(tiny_sd):
    """convert_on_load on a file that is already quantized is skipped, and the load line says what the file is."""
    q, info = quantized(tiny_sd, "nf4"), {"format": "nf4"}
    assert convert_state_dict(q, "q8_0", info) is q and info["conversion"] == "q8_0 skipped: file is already nf4"
    info = {"format": "fp8 (scaled)"}
    convert_state_dict(quantized(tiny_sd, "fp8_e4m3fn_scaled"), "nf4", info)
    assert info["conversion"] == "nf4 skipped: file is already fp8 (scaled)"
    # a Q4_K_M-style mix: the block types, most frequent first, the float ones left out
    info = {"container": "gguf", "tensor_types": {"F32": 500, "Q4_K": 300, "Q6_K": 40}}
    convert_state_dict(quantized(tiny_sd, "q8_0"), "q8_0", info)
    assert info["conversion"] == "q8_0 skipped: file is already GGUF Q4_K/Q6_K"
