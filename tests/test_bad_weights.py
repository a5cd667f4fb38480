"""Files whose container is sound but whose contents are wrong: each is rejected at load with the file (and the
tensor) named, or accepted with its values checked. Container-level damage (headers, counts, offsets) is in
test_hostile_files.py."""
import json
import logging
import os
import struct

import gguf
import pytest
import torch
from safetensors.torch import save_file

from kontext_lowvram.loaders import ModelFileError, load_model_file, load_state_dict, quantize_state_dict
from kontext_lowvram.loaders.text_encoders import (clip_l_tensor_shapes, read_text_encoder,
                                                   t5_tensor_shapes)
from kontext_lowvram.loaders.writers import to_safetensors_dict, write_gguf, write_safetensors
from kontext_lowvram.optimizations import QTensor, dequantize, quantize
from fixtures.text_encoders import random_state_dict

BLOCK = "double_blocks.0.img_attn.qkv"
TINY_T5 = {"d_model": 64, "d_ff": 128, "d_kv": 16, "num_heads": 4, "num_layers": 2}
TINY_CLIP = {"intermediate_size": 64, "num_hidden_layers": 1, "vocab_size": 1000}


def fp8_file(tmp_path, tiny_sd, edit, style="scaled", name="m.safetensors"):
    """A scaled-fp8 file of the tiny model with `edit(flat state dict)` applied before writing."""
    flat, meta = to_safetensors_dict(quantize_state_dict(tiny_sd, "fp8_e4m3fn_scaled"), fp8_style=style)
    edit(flat, meta)
    p = tmp_path / name
    save_file(flat, str(p), metadata=meta or None)
    return p


def scale_key(style):
    return BLOCK + (".scale_weight" if style == "scaled" else ".weight_scale")


# ---- detection ----

def test_safetensors_whose_header_length_starts_like_a_pickle_loads(tmp_path, tiny_sd):
    """The 8-byte header length's low byte is 0x80 (a pickle's first byte) in one file of 256."""
    for pad in range(256):
        p = tmp_path / "m.safetensors"
        save_file(tiny_sd, str(p), metadata={"pad": "x" * pad})
        if open(p, "rb").read(1) == b"\x80":
            break
    else:
        pytest.fail("no padding gave a header length with low byte 0x80")
    assert set(load_state_dict(p)) == set(tiny_sd)


def test_pickles_are_still_refused(tmp_path):
    legacy = tmp_path / "legacy.pt"
    torch.save({"a": torch.zeros(1)}, str(legacy), _use_new_zipfile_serialization=False)
    assert open(legacy, "rb").read(2) == b"\x80\x02"
    with pytest.raises(ModelFileError, match="legacy.pt.*never loaded"):
        load_state_dict(legacy)


# ---- fp8 scales ----

@pytest.mark.parametrize("style", ["scaled", "comfy_quant"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 0.0])
def test_fp8_scale_that_breaks_the_layer_is_rejected(tmp_path, tiny_sd, style, value):
    def edit(flat, meta):
        flat[scale_key(style)] = torch.tensor(value)
    p = fp8_file(tmp_path, tiny_sd, edit, style)
    with pytest.raises(ModelFileError, match=rf"m\.safetensors.*{BLOCK}.*weight scale"):
        load_state_dict(p)


def test_negative_fp8_scale_loads_with_a_warning(tmp_path, tiny_sd, caplog):
    def edit(flat, meta):
        flat[scale_key("scaled")] = -flat[scale_key("scaled")]
    p = fp8_file(tmp_path, tiny_sd, edit)
    with caplog.at_level(logging.WARNING, logger="kontext_lowvram"):
        sd = load_state_dict(p)
    assert "negative fp8 weight scale" in caplog.text and BLOCK in caplog.text
    assert sd[BLOCK + ".weight"].aux["scale"] < 0


def test_fp8_scale_of_the_wrong_size_or_type_is_named(tmp_path, tiny_sd):
    def three(flat, meta):
        flat[scale_key("scaled")] = torch.ones(3)
    with pytest.raises(ModelFileError, match=rf"m\.safetensors.*{BLOCK}.*3-element weight scale.*per-tensor"):
        load_state_dict(fp8_file(tmp_path, tiny_sd, three))

    def integer(flat, meta):
        flat[scale_key("scaled")] = torch.tensor(2, dtype=torch.int32)
    with pytest.raises(ModelFileError, match=rf"{BLOCK}.*int32 weight scale"):
        load_state_dict(fp8_file(tmp_path, tiny_sd, integer, name="i.safetensors"))


# ---- comfy_quant layer configs ----

@pytest.mark.parametrize("config", ['["float8_e4m3fn"]', '"float8_e4m3fn"', "7", "null"])
def test_comfy_quant_config_that_is_not_an_object(tmp_path, tiny_sd, config):
    def edit(flat, meta):
        table = json.loads(meta["_quantization_metadata"])
        table["layers"][BLOCK] = json.loads(config)
        meta["_quantization_metadata"] = json.dumps(table)
    with pytest.raises(ModelFileError, match=rf"m\.safetensors.*{BLOCK}.*not an object"):
        load_state_dict(fp8_file(tmp_path, tiny_sd, edit, "comfy_quant"))


def test_comfy_quant_layer_table_that_is_not_an_object(tmp_path, tiny_sd):
    def edit(flat, meta):
        meta["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": [BLOCK]})
    with pytest.raises(ModelFileError, match=r"m\.safetensors.*corrupt _quantization_metadata"):
        load_state_dict(fp8_file(tmp_path, tiny_sd, edit, "comfy_quant"))


def test_comfy_quant_tensor_of_the_wrong_dtype(tmp_path, tiny_sd):
    def edit(flat, meta):
        flat[BLOCK + ".comfy_quant"] = torch.tensor([1.5, 2.5])
    with pytest.raises(ModelFileError, match=rf"m\.safetensors.*{BLOCK}\.comfy_quant"):
        load_state_dict(fp8_file(tmp_path, tiny_sd, edit))


# ---- NF4 statistics ----

def nf4_file(tmp_path, tiny_sd, edit):
    flat, _ = to_safetensors_dict(quantize_state_dict(tiny_sd, "nf4"))
    edit(flat)
    p = tmp_path / "n.safetensors"
    save_file(flat, str(p))
    return p


@pytest.mark.parametrize("key,value", [(".nested_absmax", float("nan")), (".nested_absmax", float("inf")),
                                       (".quant_map", float("nan")), (".nested_quant_map", float("-inf"))])
def test_nf4_statistics_that_are_not_finite(tmp_path, tiny_sd, key, value):
    def edit(flat):
        flat[BLOCK + ".weight" + key][0] = value
    with pytest.raises(ModelFileError, match=rf"n\.safetensors.*{BLOCK}.*(NaN|infinite)"):
        load_state_dict(nf4_file(tmp_path, tiny_sd, edit))


def test_nf4_layer_whose_every_scale_is_zero(tmp_path, tiny_sd):
    def edit(flat):
        flat[BLOCK + ".weight.nested_absmax"].zero_()
        flat[BLOCK + ".weight.nested_quant_map"].zero_()
        flat[BLOCK + ".weight.quant_state.bitsandbytes__nf4"] = _quant_state(flat, nested_offset=0.0)
    with pytest.raises(ModelFileError, match=rf"n\.safetensors.*{BLOCK}.*every block scale is 0"):
        load_state_dict(nf4_file(tmp_path, tiny_sd, edit))


def _quant_state(flat, **changes):
    key = BLOCK + ".weight.quant_state.bitsandbytes__nf4"
    qs = json.loads(bytes(flat[key].tolist()).decode())
    qs.update(changes)
    return torch.tensor(list(json.dumps(qs).encode()), dtype=torch.uint8)


def test_nf4_negative_scales_load_with_a_warning(tmp_path, tiny_sd, caplog):
    def edit(flat):
        flat[BLOCK + ".weight.nested_absmax"].neg_()
        flat[BLOCK + ".weight.quant_state.bitsandbytes__nf4"] = _quant_state(flat, nested_offset=-1.0)
    with caplog.at_level(logging.WARNING, logger="kontext_lowvram"):
        sd = load_state_dict(nf4_file(tmp_path, tiny_sd, edit))
    assert "negative NF4 block scales" in caplog.text and BLOCK in caplog.text
    assert torch.isfinite(dequantize(sd[BLOCK + ".weight"])).all()


# ---- tensors of the wrong rank ----

@pytest.mark.parametrize("key,shape", [(BLOCK + ".bias", lambda s: (*s, 1)), (BLOCK + ".weight", lambda s: (*s, 1)),
                                       ("img_in.bias", lambda s: (1, *s)), ("final_layer.linear.bias", lambda s: ())])
def test_flux_tensor_of_the_wrong_rank_is_named(tmp_path, tiny_sd, key, shape):
    sd = dict(tiny_sd)
    sd[key] = torch.zeros(shape(tuple(sd[key].shape)), dtype=sd[key].dtype)
    save_file(sd, str(tmp_path / "r.safetensors"))
    with pytest.raises(ModelFileError, match=rf"r\.safetensors.*{key}"):
        load_state_dict(tmp_path / "r.safetensors")


def t5_file(tmp_path, edit):
    sd = random_state_dict(t5_tensor_shapes(TINY_T5), seed=1)
    edit(sd)
    p = tmp_path / "t5.safetensors"
    save_file(sd, str(p))
    return p


@pytest.mark.parametrize("key,shape", [
    ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", (32, 0)),  # zero heads
    ("encoder.block.0.layer.0.SelfAttention.q.weight", (64,)),
    ("encoder.final_layer_norm.weight", ()),
    ("encoder.block.1.layer.1.DenseReluDense.wo.weight", (64, 128, 1)),
    ("encoder.block.1.layer.0.layer_norm.weight", (64, 1)),
])
def test_t5_tensor_of_the_wrong_rank_or_size_is_named(tmp_path, key, shape):
    def edit(sd):
        sd[key] = torch.ones(shape, dtype=torch.bfloat16)
    with pytest.raises(ModelFileError, match=r"t5\.safetensors"):
        read_text_encoder(t5_file(tmp_path, edit))


@pytest.mark.parametrize("key,shape", [("text_model.encoder.layers.0.mlp.fc1.weight", (64,)),
                                       ("text_model.encoder.layers.0.self_attn.q_proj.weight", (768, 768, 1)),
                                       ("text_model.embeddings.token_embedding.weight", (1000,))])
def test_clip_tensor_of_the_wrong_rank_is_named(tmp_path, key, shape):
    sd = random_state_dict(clip_l_tensor_shapes(TINY_CLIP), seed=2)
    sd[key] = torch.ones(shape, dtype=torch.bfloat16)
    save_file(sd, str(tmp_path / "clip.safetensors"))
    with pytest.raises(ModelFileError, match=r"clip\.safetensors"):
        read_text_encoder(tmp_path / "clip.safetensors")


# ---- names ----

@pytest.mark.skipif(os.name == "nt", reason="file names must be valid UTF-16 on Windows")
def test_file_name_that_is_not_utf8_prints(tmp_path, tiny_sd):
    name = os.fsdecode(b"m\xff\xfe.safetensors")
    sd = dict(tiny_sd)
    sd["img_in.bias"] = torch.zeros(1, 1)
    save_file(sd, str(tmp_path / name))
    with pytest.raises(ModelFileError) as e:
        load_state_dict(tmp_path / name)
    text = str(e.value)
    text.encode("utf-8")  # would raise UnicodeEncodeError with the raw surrogates
    assert "m\\xff\\xfe.safetensors" in text and e.value.path.endswith(name)


# ---- GGUF shapes ----

def test_gguf_writer_keeps_the_logical_shape(tmp_path, tiny_sd):
    """A QTensor whose raw bytes are flat (not rows) and a 5-D tensor (over ggml's 4 dims) come back with their
    logical shapes; the 5-D one through city96's comfy.gguf.orig_shape metadata, which gguf-py sees as INT32s."""
    sd = {k: v.float() for k, v in tiny_sd.items()}
    q = quantize(sd[BLOCK + ".weight"], "Q8_0")
    sd[BLOCK + ".weight"] = QTensor(q.raw.reshape(-1), qformat="gguf", shape=q.shape, meta=q.meta)
    five = torch.randn(2, 3, 2, 2, 32)
    sd["extra.five_d"] = five
    p = write_gguf(tmp_path / "s.gguf", sd)
    reader = gguf.GGUFReader(p)
    field = reader.fields["comfy.gguf.orig_shape.extra.five_d"]
    assert field.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
    t = {t.name: t for t in reader.tensors}[BLOCK + ".weight"]
    assert tuple(reversed([int(d) for d in t.shape])) == tuple(q.shape)  # gguf-py reads the logical shape
    back, _ = load_model_file(p, check_arch=False)
    assert back[BLOCK + ".weight"].shape == q.shape
    assert torch.equal(dequantize(back[BLOCK + ".weight"]), dequantize(q))
    assert torch.equal(back["extra.five_d"], five)


def _gguf_with_orig_shape(tmp_path, tiny_sd, values):
    sd = {k: v.float() for k, v in tiny_sd.items()}
    p = tmp_path / "o.gguf"
    w = gguf.GGUFWriter(str(p), arch="flux")
    w.add_array("comfy.gguf.orig_shape.img_in.weight", values)
    for k, v in sd.items():
        w.add_tensor(k, v.numpy())
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return p


def test_gguf_orig_shape_that_holds_other_values_is_rejected(tmp_path, tiny_sd):
    rows, cols = tiny_sd["img_in.weight"].shape
    assert load_state_dict(_gguf_with_orig_shape(tmp_path, tiny_sd, [rows, cols]))["img_in.weight"].shape == (rows, cols)
    with pytest.raises(ModelFileError, match=r"o\.gguf.*img_in\.weight.*recorded shape"):
        load_state_dict(_gguf_with_orig_shape(tmp_path, tiny_sd, [rows, cols + 1]))
    with pytest.raises(ModelFileError, match=r"o\.gguf.*orig_shape\.img_in\.weight.*integers"):
        load_state_dict(_gguf_with_orig_shape(tmp_path, tiny_sd, ["64", "4"]))
    with pytest.raises(ModelFileError, match=r"o\.gguf.*orig_shape\.img_in\.weight.*invalid shape"):
        load_state_dict(_gguf_with_orig_shape(tmp_path, tiny_sd, [rows * cols, 0]))

