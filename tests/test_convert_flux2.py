"""The converter on FLUX.2 ([dev]- and [klein]-shaped tiny models in the real key layout, tests/fixtures/flux2.py):
every type's tensor names and types against city96's rules computed here independently of convert_mix, values of
the written file (read by gguf-py's own dequantizer / the safetensors library) against the source within the type's
bound, the file read back by our loader as FLUX.2, and the same output from a prefixed checkpoint, fp16 / fp32 / fp8
sources, a diffusers Flux2Transformer2DModel folder and an unquantized GGUF."""
import json
import os

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fixtures.diffusers_flux import write_sharded
from fixtures.diffusers_flux2 import bfl_to_diffusers
from fixtures.flux2 import TINY_FLUX2_DEV, TINY_FLUX2_KLEIN, random_flux2_state_dict
from kontext_lowvram.loaders import load_model_file, quantize_state_dict
from kontext_lowvram.loaders import convert as C
from kontext_lowvram.loaders.convert_mix import GGUF_TYPES, TARGETS, TYPES
from kontext_lowvram.loaders.errors import ModelFileError
from kontext_lowvram.loaders.flux2_layout import FLUX2_MODELS, flux2_tensor_shapes
from kontext_lowvram.loaders.integrity import verify_sidecar
from kontext_lowvram.loaders.writers import write_safetensors
from kontext_lowvram.optimizations import QTensor, dequantize

MODELS = {"dev": TINY_FLUX2_DEV, "klein": TINY_FLUX2_KLEIN}
PREFIX = "model.diffusion_model."

# ---- city96's rules, written out from his files (not from convert_mix) -----------------------------------------
# tools/convert.py: QUANTIZATION_THRESHOLD = 1024; 1-D and <= 1024-value tensors F32 (handle_tensors)
THRESHOLD = 1024
# tools/lcpp.patch, "rules for image models", LLM_ARCH_FLUX: `quantize &= name.find(X) == npos`
NOT_QUANTIZED = ("txt_in.", "img_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")
# the base type llama-quantize gives each file type
BASE = {"Q8_0": "Q8_0", "Q6_K": "Q6_K", "Q5_K_M": "Q5_K", "Q5_K_S": "Q5_K", "Q4_K_M": "Q4_K", "Q4_K_S": "Q4_K",
        "Q3_K_M": "Q3_K", "Q3_K_S": "Q3_K", "Q2_K": "Q2_K", "Q5_1": "Q5_1", "Q5_0": "Q5_0", "Q4_1": "Q4_1",
        "Q4_0": "Q4_0"}
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
TO_V = ("attn_v.weight", ".to_v.weight", ".v.weight", ".attn.w1v.weight", ".attn.w2v.weight", "_attn.v_proj.weight")
QKV = ("attn_qkv.weight", "attn.qkv.weight", "attention.qkv.weight")
FFN = ("ffn_down", ".ffn.2.weight", ".ff.net.2.weight", ".mlp.layer2.weight", ".adaln_modulation_mlp.2.weight",
       ".feed_forward.w2.weight")


def lcpp_img_tensor_type(name, shape, ftype, counters):
    """img_tensor_get_type (lcpp.patch) for one tensor that is quantized."""
    t = BASE[ftype]
    if any(p in name for p in TO_V):
        i = counters["wv"]
        t = {"Q2_K": "Q3_K", "Q3_K_M": "Q5_K" if i < 2 else "Q4_K", "Q4_K_M": "Q6_K", "Q5_K_M": "Q6_K"}.get(ftype, t)
        if ftype == "Q4_K_S" and i < 4:
            t = "Q5_K"
        counters["wv"] += 1
    elif any(p in name for p in QKV):
        t = {"Q3_K_M": "Q4_K", "Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K"}.get(ftype, t)
    elif any(p in name for p in FFN) or ("experts." in name and ".w2.weight" in name):
        t = {"Q3_K_M": "Q4_K", "Q4_K_S": "Q5_K", "Q4_K_M": "Q6_K", "Q5_K_M": "Q6_K", "Q4_0": "Q4_1",
             "Q5_0": "Q5_1"}.get(ftype, t)
    if t in K_TYPES and shape[-1] % 256:
        t = "F16"  # the patch's fallback for rows that are not whole super-blocks
    return t


def expected_types(shapes, to):
    """{name: type} a FLUX.2 file of `shapes` gets from city96's pipeline (convert.py's F32 rules, then the patched
    llama-quantize) for a GGUF `to`; for the safetensors targets, the pack's rule: block linears and the shared
    modulations (loaders/keys.py, as on-load conversion) quantized, the rest as stored."""
    counters = {"wv": 0}
    out = {}
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        if TARGETS[to].container == "safetensors":
            quantized = name.endswith(".weight") and len(shape) == 2 and n > THRESHOLD and name.startswith(
                ("double_blocks.", "single_blocks.", "double_stream_modulation_img.", "double_stream_modulation_txt.",
                 "single_stream_modulation."))
            out[name] = to if quantized else "keep"
        elif len(shape) == 1 or n <= THRESHOLD:
            out[name] = "F32"
        elif to in ("BF16", "F16"):
            out[name] = to
        elif any(p in name for p in NOT_QUANTIZED):
            out[name] = "F16"  # unquantized; city96's FLUX files hold them in F16
        else:
            out[name] = lcpp_img_tensor_type(name, shape, to, counters)
    return out


# relative L2 bound per stored type on these weights (N(0, 1.2/sqrt(256)) like the fixtures; measured on FLUX.1-sized
# rows: Q8_0 0.5 %, Q6_K 1.8 %, Q5_K 3.6 %, Q4_K 7.1 %, Q3_K 15 %, Q2_K 30 %, Q5_1 3.8 %, Q5_0 4.3 %, Q4_1 7.8 %,
# Q4_0 8.6 %, nf4 9.2 %, fp8 2.6 %); F32 / BF16 hold a bf16 source exactly, F16 too but for the few values below
# fp16's normal range (2^-14)
TYPE_BOUND = {"Q8_0": 0.01, "Q6_K": 0.03, "Q5_K": 0.06, "Q4_K": 0.11, "Q3_K": 0.22, "Q2_K": 0.4, "Q5_1": 0.06,
              "Q5_0": 0.06, "Q4_1": 0.11, "Q4_0": 0.12, "F16": 1e-6, "F32": 0.0, "BF16": 0.0,
              "fp8_e4m3fn_scaled": 0.04, "nf4": 0.12, "keep": 0.0}


def rel(a, b):
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return ((a - b).norm() / b.norm()).item()


def gguf_py_values(path):
    """{name: (type name, values as gguf-py's own dequantizer reads them, logical shape)}."""
    out = {}
    for x in gguf.GGUFReader(str(path)).tensors:
        shape = tuple(reversed([int(d) for d in x.shape]))
        vals = gguf.quants.dequantize(np.asarray(x.data), x.tensor_type).reshape(shape)
        out[x.name] = (x.tensor_type.name, torch.from_numpy(np.array(vals, dtype=np.float32)))
    return out


def gguf_bytes(path):
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(str(path)).tensors}


def st_tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def same_safetensors(a, b):
    (ta, ma), (tb, mb) = st_tensors(a), st_tensors(b)
    return ma == mb and set(ta) == set(tb) and all(
        ta[k].dtype == tb[k].dtype
        and torch.equal(ta[k].reshape(-1).view(torch.uint8), tb[k].reshape(-1).view(torch.uint8))
        for k in ta)


@pytest.fixture(scope="module")
def sds():
    return {kind: random_flux2_state_dict(cfg, seed=21 if kind == "dev" else 22) for kind, cfg in MODELS.items()}


@pytest.fixture(scope="module")
def src_files(tmp_path_factory, sds):
    """{(kind, prefixed): path} of bf16 single files, plain and as a ComfyUI checkpoint (prefix + other parts)."""
    d = tmp_path_factory.mktemp("flux2src")
    out = {}
    for kind, sd in sds.items():
        plain = d / f"flux2-{kind}.safetensors"
        save_file(sd, str(plain))
        full = {PREFIX + k: v for k, v in sd.items()}
        full["vae.decoder.conv_in.weight"] = torch.zeros(8, 4, 3, 3, dtype=torch.bfloat16)  # left out
        full["text_encoders.qwen3_4b.transformer.model.norm.weight"] = torch.ones(16, dtype=torch.bfloat16)
        pre = d / f"flux2-{kind}-checkpoint.safetensors"
        save_file(full, str(pre))
        out[(kind, False)], out[(kind, True)] = str(plain), str(pre)
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory, src_files):
    """convert(source, ..., to) once per (kind, prefixed, to): (path, report)."""
    d = tmp_path_factory.mktemp("flux2out")
    cache = {}

    def get(kind, to, prefixed=False):
        key = (kind, to, prefixed)
        if key not in cache:
            path = d / f"{kind}{'-p' if prefixed else ''}-{to}{TARGETS[to].suffix}"
            cache[key] = (path, C.convert(src_files[(kind, prefixed)], path, to))
        return cache[key]
    return get


# ---- the mix ---------------------------------------------------------------------------------------------------

def full_plan(cfg, to):
    from kontext_lowvram.loaders.convert_source import Source, SourceTensor
    tensors = [SourceTensor(k, s, "bfloat16", ()) for k, s in flux2_tensor_shapes(cfg).items()]
    return {i.name: i for i in C.plan(Source("flux2.safetensors", [], "flux2", "", tensors, cfg), TARGETS[to])}


@pytest.mark.parametrize("model", list(FLUX2_MODELS))
@pytest.mark.parametrize("to", TYPES)
def test_full_size_mix_is_city96s_rules(model, to):
    """[dev], [klein] 4B / 9B at full size: every tensor's type is what city96's convert.py + lcpp.patch give."""
    cfg = FLUX2_MODELS[model]
    plan = full_plan(cfg, to)
    want = expected_types(flux2_tensor_shapes(cfg), to)
    assert {k: i.out_type for k, i in plan.items()} == want
    if TARGETS[to].container == "gguf" and to not in ("BF16", "F16"):
        assert not any(i.out_type == "F16" for k, i in plan.items() if k.startswith(("double_", "single_"))), \
            "every FLUX.2 block linear has rows of whole blocks"
        for k in ("double_stream_modulation_img.lin.weight", "double_stream_modulation_txt.lin.weight",
                  "single_stream_modulation.lin.weight"):
            assert plan[k].out_type == BASE[to] and "shared modulation" in plan[k].rule
        assert plan["double_blocks.0.img_mlp.0.weight"].out_type == BASE[to]  # the fused gate/up SwiGLU: base
        assert plan["double_blocks.0.img_mlp.2.weight"].out_type == BASE[to]  # no lcpp ffn rule names it
    if to in ("fp8_e4m3fn_scaled", "nf4"):
        assert plan["single_stream_modulation.lin.weight"].out_type == to
        assert plan["img_in.weight"].out_type == "keep"


def test_full_size_file_sizes():
    """[dev] Q4_K_M ~18.7 GB (the published size, ARCHITECTURE.md), bf16 ~64 GB; the _M extra is the 2 x depth fused
    qkv one K-type up (Q4_K 144 -> Q5_K 176 bytes per 256 values)."""
    size = {(m, to): sum(i.nbytes for i in full_plan(cfg, to).values())
            for m, cfg in FLUX2_MODELS.items() for to in ("BF16", "Q8_0", "Q4_K_S", "Q4_K_M")}
    assert size[("flux2-dev", "BF16")] / 1e9 == pytest.approx(64.4, abs=0.2)
    assert size[("flux2-dev", "Q4_K_M")] / 1e9 == pytest.approx(18.7, abs=0.1)
    for m, cfg in FLUX2_MODELS.items():
        h = cfg.hidden_size
        assert size[(m, "Q4_K_M")] - size[(m, "Q4_K_S")] == 2 * cfg.depth * 3 * h * h // 256 * (176 - 144)
        assert size[(m, "Q8_0")] < 0.55 * size[(m, "BF16")]


# ---- round trips -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("to", GGUF_TYPES)
def test_gguf_types_values_and_our_loader(converted, sds, kind, to):
    path, report = converted(kind, to)
    sd, cfg = sds[kind], MODELS[kind]
    r = gguf.GGUFReader(str(path))
    assert r.fields["general.architecture"].contents() == "flux"  # as city96's convert.py writes FLUX.2
    assert r.fields["general.file_type"].contents() == int(gguf.LlamaFileType[TARGETS[to].file_type])
    assert r.fields["general.quantization_version"].contents() == gguf.GGML_QUANT_VERSION
    want = expected_types({k: tuple(v.shape) for k, v in sd.items()}, to)
    values = gguf_py_values(path)
    assert sorted(values) == sorted(sd)  # names as the BFL file has them
    assert {k: v[0] for k, v in values.items()} == want
    total_err = total_ref = 0.0
    for k, (qtype, got) in values.items():
        e = rel(got, sd[k])
        assert e <= TYPE_BOUND[qtype], (k, qtype, e)
        assert report.errors[k] == pytest.approx(e, rel=1e-3, abs=1e-7)
        total_err += (got.double() - sd[k].double()).pow(2).sum().item()
        total_ref += sd[k].double().pow(2).sum().item()
    assert report.overall_error == pytest.approx((total_err / total_ref) ** 0.5, rel=1e-3, abs=1e-7)
    # our loader: FLUX.2 of this config, values bit-identical to gguf-py's reading
    ours, info = load_model_file(str(path))
    assert info["flux2_config"] == cfg and info["transformer"].startswith("FLUX.2") and "flux_config" not in info
    for k, (_, got) in values.items():
        assert torch.equal(dequantize(ours[k], torch.float32), got), k
    assert verify_sidecar(str(path)).sidecar == str(path) + ".sha256"
    assert report.kind == "flux2" and "FLUX.2 [" in report.summary()


@pytest.mark.parametrize("kind", list(MODELS))
def test_fp8_is_comfy_quant_with_the_shared_modulations(converted, sds, kind):
    path, report = converted(kind, "fp8_e4m3fn_scaled")
    sd = sds[kind]
    want = expected_types({k: tuple(v.shape) for k, v in sd.items()}, "fp8_e4m3fn_scaled")
    layers = {k[: -len(".weight")] for k, t in want.items() if t != "keep"}
    assert "double_stream_modulation_img.lin" in layers and "single_stream_modulation.lin" in layers
    flat, meta = st_tensors(path)
    assert json.loads(meta["_quantization_metadata"])["layers"] == {la: {"format": "float8_e4m3fn"} for la in layers}
    assert set(flat) == set(sd) | {la + ".weight_scale" for la in layers}
    ours, info = load_model_file(str(path))
    assert info["format"] == "fp8 (comfy_quant)" and info["flux2_config"] == MODELS[kind]
    for k, v in sd.items():
        if want[k] == "keep":
            assert flat[k].dtype == torch.bfloat16 and torch.equal(ours[k], v), k
        else:
            assert flat[k].dtype == torch.float8_e4m3fn and flat[k[:-len("weight")] + "weight_scale"].shape == ()
            assert isinstance(ours[k], QTensor) and 0 < rel(dequantize(ours[k]), v) <= TYPE_BOUND["fp8_e4m3fn_scaled"]
    assert 0 < report.overall_error <= TYPE_BOUND["fp8_e4m3fn_scaled"]


@pytest.mark.parametrize("kind", list(MODELS))
def test_nf4_is_bitsandbytes_layout_with_the_shared_modulations(converted, sds, kind):
    path, report = converted(kind, "nf4")
    sd = sds[kind]
    want = expected_types({k: tuple(v.shape) for k, v in sd.items()}, "nf4")
    flat = load_file(str(path))
    ours, info = load_model_file(str(path))
    assert info["format"] == "nf4" and info["flux2_config"] == MODELS[kind]
    for k, v in sd.items():
        if want[k] == "keep":
            assert torch.equal(flat[k], v) and torch.equal(ours[k], v), k
        else:
            qs = json.loads(bytes(flat[k + ".quant_state.bitsandbytes__nf4"].tolist()))
            assert qs["quant_type"] == "nf4" and qs["shape"] == list(v.shape) and qs["dtype"] == "bfloat16"
            assert isinstance(ours[k], QTensor) and rel(dequantize(ours[k]), v) <= TYPE_BOUND["nf4"], k
    assert 0 < report.overall_error <= TYPE_BOUND["nf4"]


# ---- inputs ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("to", ["Q4_K_M", "Q5_0", "BF16", "fp8_e4m3fn_scaled", "nf4"])
def test_prefixed_checkpoint_converts_like_the_plain_file(converted, kind, to):
    """One type per output family: K-quant mix, legacy, unquantized GGUF, comfy_quant fp8, NF4."""
    path, report = converted(kind, to, prefixed=True)
    plain, _ = converted(kind, to)
    if TARGETS[to].container == "gguf":
        assert gguf_bytes(path) == gguf_bytes(plain)
    else:
        assert same_safetensors(path, plain)
    assert any(PREFIX in n and "2 other tensors left out" in n for n in report.notes)
    _, info = load_model_file(str(path))
    assert info["flux2_config"] == MODELS[kind]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fp16_and_fp32_sources(tmp_path, sds, dtype):
    sd = {k: v.to(dtype) for k, v in sds["klein"].items()}
    src = tmp_path / "flux2-klein.safetensors"
    save_file(sd, str(src))
    for to in ("Q8_0", "BF16", "F16"):
        out = tmp_path / f"k-{to}.gguf"
        report = C.convert(src, out, to)
        values = gguf_py_values(out)
        for k, (qtype, got) in values.items():
            bound = TYPE_BOUND[qtype]
            if qtype == "BF16" or (qtype == "F16" and dtype == torch.float32):
                bound = 4e-3  # one bf16 / fp16 rounding of the fp32 values
            assert rel(got, sd[k]) <= bound, (to, k, qtype)
        assert report.overall_error <= (0.01 if to == "Q8_0" else 4e-3)
        assert load_model_file(str(out))[1]["flux2_config"] == TINY_FLUX2_KLEIN


@pytest.mark.parametrize("style", ["scaled", "comfy_quant"])
def test_fp8_sources_convert_from_their_values(tmp_path, sds, style):
    """A Kijai-style scaled fp8 (scale_weight + scaled_fp8 marker) or ComfyUI comfy_quant fp8 (weight_scale +
    _quantization_metadata) FLUX.2 file -> GGUF of its dequantized values."""
    q = quantize_state_dict(sds["dev"], "fp8_e4m3fn_scaled")
    values = {k: dequantize(v, torch.float32) if isinstance(v, QTensor) else v.float() for k, v in q.items()}
    src = tmp_path / f"flux2-dev-fp8-{style}.safetensors"
    write_safetensors(src, q, fp8_style=style)
    report = C.convert(src, tmp_path / "from-fp8-F16.gguf", "F16")
    for k, (_, got) in gguf_py_values(tmp_path / "from-fp8-F16.gguf").items():
        assert torch.allclose(got, values[k], rtol=1e-3, atol=1e-6), k
    assert any("fp8" in n for n in report.notes) and report.kind == "flux2"
    C.convert(src, tmp_path / "from-fp8-Q8_0.gguf", "Q8_0")
    for k, (qtype, got) in gguf_py_values(tmp_path / "from-fp8-Q8_0.gguf").items():
        assert rel(got, values[k]) <= TYPE_BOUND[qtype], k


@pytest.mark.parametrize("kind", list(MODELS))
def test_diffusers_flux2_folder_converts_to_the_same_tensors_as_its_bfl_twin(tmp_path, converted, sds, kind):
    dif = bfl_to_diffusers(sds[kind], MODELS[kind])
    assert "transformer_blocks.0.attn.to_q.weight" in dif and "single_stream_modulation.linear.weight" in dif
    assert not any(k.startswith(("double_blocks.", "single_blocks.")) for k in dif)
    folder = tmp_path / f"FLUX.2-{kind}-tiny" / "transformer"
    index = write_sharded(str(folder), dif, shards=3)
    for src, to in ((folder, "BF16"), (index, "Q4_K_M"), (tmp_path / f"FLUX.2-{kind}-tiny", "Q8_0")):
        out = tmp_path / f"d-{kind}-{to}.gguf"
        report = C.convert(src, out, to)
        assert gguf_bytes(out) == gguf_bytes(converted(kind, to)[0])  # byte for byte
        assert report.layout.startswith("diffusers FLUX.2") and "3 shards" in report.layout
    assert C.default_output_name(index, "Q4_K_M") == f"FLUX.2-{kind}-tiny-Q4_K_M.gguf"


@pytest.mark.parametrize("kind", list(MODELS))
def test_diffusers_fixture_is_diffusers_own_layout(kind):
    """The fixture's names and shapes are those of diffusers' own Flux2Transformer2DModel of the same size (where
    diffusers is installed; it is not a dependency of the pack or its tests), so the converter is tested against
    the layout diffusers writes, not against a copy of its own tables."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed: pip install diffusers")
    cfg = MODELS[kind]
    model = diffusers.Flux2Transformer2DModel(
        num_layers=cfg.depth, num_single_layers=cfg.depth_single_blocks, num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.hidden_size // cfg.num_heads, joint_attention_dim=cfg.context_in_dim,
        in_channels=cfg.in_channels, mlp_ratio=cfg.mlp_ratio, guidance_embeds=cfg.guidance_embed)
    theirs = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in bfl_to_diffusers(random_flux2_state_dict(cfg, seed=3), cfg).items()}
    assert ours == theirs


def test_diffusers_flux2_with_unknown_tensors_is_refused_naming_the_fix(tmp_path, sds):
    dif = bfl_to_diffusers(sds["klein"], TINY_FLUX2_KLEIN)
    dif["transformer_blocks.0.attn.to_gate.weight"] = torch.zeros(4, 4)
    index = write_sharded(str(tmp_path / "odd"), dif, shards=1)
    with pytest.raises(ModelFileError, match="diffusers FLUX.2 transformer with 1 tensor.*to_gate.*BFL's single-file"):
        C.convert(index, tmp_path / "out.gguf", "Q8_0")
    assert not os.path.exists(tmp_path / "out.gguf")


def test_unquantized_gguf_converts_like_its_source(tmp_path, converted):
    C.convert(converted("dev", "BF16")[0], tmp_path / "from-gguf.gguf", "Q4_K_M")
    assert gguf_bytes(tmp_path / "from-gguf.gguf") == gguf_bytes(converted("dev", "Q4_K_M")[0])


@pytest.mark.parametrize("what,match", [
    ("incomplete", "is not a complete FLUX.2 transformer"),
    ("chroma", "is a Chroma transformer"),
    ("quantized", "already quantized")])
def test_refusals_name_the_file(tmp_path, sds, converted, what, match):
    sd = sds["dev"]
    path = tmp_path / f"{what}.safetensors"
    if what == "incomplete":
        save_file({k: v for k, v in sd.items() if "txt_mlp" not in k}, str(path))
    elif what == "chroma":
        save_file({**sd, "distilled_guidance_layer.in_proj.weight": torch.zeros(8, 8)}, str(path))
    else:
        path = converted("dev", "Q8_0")[0]
    with pytest.raises(ModelFileError, match=match) as e:
        C.convert(path, tmp_path / "out.gguf", "Q8_0")
    assert str(path) in str(e.value) and not os.path.exists(tmp_path / "out.gguf")


def test_interrupted_flux2_run_leaves_nothing(tmp_path, src_files):
    def interrupt(done, total, nbytes, phase):
        if phase == "verify" and done == total // 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        C.convert(src_files[("dev", True)], tmp_path / "x.gguf", "Q4_K_M", progress=interrupt)
    assert os.listdir(tmp_path) == []
