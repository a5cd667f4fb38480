"""LowVRAMTextEncoderLoader + LowVRAMTextEncode inside a real ComfyUI, against core's own text-encoder path.

ComfyUI builds FLUX's T5 from a fixed T5-XXL config (4.7 B parameters, 9.5 GB in bf16), far too big for routine CPU
tests, but both versions let a loader override that config through `model_options["t5xxl_model_config"]`. So the
files are a full-size random CLIP-L and a tiny random T5 (2 layers, 64 wide, the real 32128-token vocabulary and
key layout). The reference is core's own loading code, `comfy.sd.load_clip(..., CLIPType.FLUX)` exactly as
DualCLIPLoader calls it plus that config override (test node below), followed by core CLIPTextEncodeFlux. Our loader
reads the T5 size from the weights itself.

The cache tests prove the weights are not read on a hit by replacing the files with random bytes of the same size
and modification time (their cache identity), then encoding a cached prompt.
"""
import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import comfy_harness as H
from fixtures.text_encoders import random_state_dict
from kontext_lowvram.loaders.text_encoders import clip_l_tensor_shapes, is_linear_weight, t5_tensor_shapes
from kontext_lowvram.loaders.writers import write_safetensors
from kontext_lowvram.optimizations import quantize
from t5_files import TINY_T5, write_llamacpp_t5

CLIP_L_FILE = "klv_clip_l.safetensors"
T5 = {"bf16": "klv_t5_tiny_bf16.safetensors", "q8_0": "klv_t5_tiny_q8_0.gguf", "q8_0_ref": "klv_t5_tiny_q8_0_ref_fp32.safetensors",
      "fp8": "klv_t5_tiny_fp8_scaled.safetensors", "fp8_ref": "klv_t5_tiny_fp8_scaled_ref_fp32.safetensors"}
CLIP_TEXT = "a red fox on a snowy hill"
T5_TEXT = "Change the fox's fur to silver and keep the hill, the light and the composition exactly as they are."
LOADING = "Kontext LowVRAM text encoder: loading"
HIT = "Kontext LowVRAM conditioning cache: hit"

TEST_NODES = '''\
"""Test-only nodes for kontext_lowvram's text-encoder integration tests (not part of the pack)."""
import json
import os

import torch


class KLVTestCoreFluxTextEncoders:
    """Core DualCLIPLoader(type=flux)'s exact call, plus a T5 config override so a tiny T5 can stand in for T5-XXL."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name1": ("STRING", {}), "clip_name2": ("STRING", {}), "t5_config": ("STRING", {})}}
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "testing/kontext_lowvram"

    def load(self, clip_name1, clip_name2, t5_config):
        import comfy.sd
        import folder_paths
        paths = [folder_paths.get_full_path_or_raise("text_encoders", n) for n in (clip_name1, clip_name2)]
        options = {"t5xxl_model_config": json.loads(t5_config)} if t5_config else {}
        return (comfy.sd.load_clip(ckpt_paths=paths, embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                   clip_type=comfy.sd.CLIPType.FLUX, model_options=options),)


class KLVTestSaveConditioning:
    """Saves a CONDITIONING: tensors as float32 safetensors, other values as JSON metadata."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",), "filename_prefix": ("STRING", {"default": "klv_cond/c"})}}
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "testing/kontext_lowvram"

    def save(self, conditioning, filename_prefix):
        import folder_paths
        from safetensors.torch import save_file
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, folder_paths.get_output_directory())
        tensors, values = {}, []
        for i, (cond, d) in enumerate(conditioning):
            tensors[f"{i}.cond"] = cond
            values.append({k: v for k, v in d.items() if not torch.is_tensor(v)})
            tensors.update({f"{i}.{k}": v for k, v in d.items() if torch.is_tensor(v)})
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in tensors.items()}
        file = f"{name}_{counter:05}_.safetensors"
        save_file(tensors, os.path.join(folder, file), metadata={"values": json.dumps(values)})
        return {"ui": {"tensors": [{"filename": file, "subfolder": subfolder, "type": "output"}]}}


NODE_CLASS_MAPPINGS = {"KLVTestCoreFluxTextEncoders": KLVTestCoreFluxTextEncoders,
                       "KLVTestSaveConditioning": KLVTestSaveConditioning}
'''


@pytest.fixture(scope="module")
def server(comfy_root):
    """Its own ComfyUI (with the test nodes above) and text-encoder files."""
    s = H.ComfyServer(comfy_root)
    (s.custom_nodes_dir / "klv_te_test_nodes.py").write_text(TEST_NODES, encoding="utf-8")
    te = s.models_dir / "text_encoders"
    H.save_safetensors(random_state_dict(clip_l_tensor_shapes(), seed=1, std=0.02), te / CLIP_L_FILE)
    t5 = random_state_dict(t5_tensor_shapes(TINY_T5), seed=2, std=0.1)
    H.save_safetensors(t5, te / T5["bf16"])
    H.save_safetensors(write_llamacpp_t5(te / T5["q8_0"], t5), te / T5["q8_0_ref"])
    fp8 = {k: quantize(v.float(), "fp8_e4m3fn_scaled") if is_linear_weight(k) else v for k, v in t5.items()}
    write_safetensors(te / T5["fp8"], fp8, fp8_style="scaled")
    H.save_safetensors({k: v.raw.float() * v.aux["scale"] if is_linear_weight(k) else v.float() for k, v in fp8.items()},
                       te / T5["fp8_ref"])
    try:
        s.start(timeout=180)
        yield s
    finally:
        s.cleanup()


def ours(t5_name, device="auto", cache=True, cache_max_mb=2048, guidance=2.5, prefix="ours", clip_l=CLIP_TEXT,
         t5xxl=T5_TEXT):
    return {
        "te": H.node("LowVRAMTextEncoderLoader", clip_l_name=CLIP_L_FILE, t5xxl_name=t5_name, device=device),
        "enc": H.node("LowVRAMTextEncode", clip=["te", 0], clip_l=clip_l, t5xxl=t5xxl, guidance=guidance,
                      cache=cache, cache_max_mb=cache_max_mb),
        "save": H.node("KLVTestSaveConditioning", conditioning=["enc", 0], filename_prefix=f"{prefix}/c"),
    }


def core(t5_name, prefix="core", clip_l=CLIP_TEXT, t5xxl=T5_TEXT):
    return {
        "core_te": H.node("KLVTestCoreFluxTextEncoders", clip_name1=CLIP_L_FILE, clip_name2=t5_name,
                          t5_config=json.dumps(TINY_T5)),
        "core_enc": H.node("CLIPTextEncodeFlux", clip=["core_te", 0], clip_l=clip_l, t5xxl=t5xxl, guidance=2.5),
        "core_save": H.node("KLVTestSaveConditioning", conditioning=["core_enc", 0], filename_prefix=f"{prefix}/c"),
    }


def saved(server, outputs, node_id):
    files = [server.output_file(i) for i in outputs[node_id]["tensors"]]
    assert len(files) == 1
    with safe_open(str(files[0]), "pt") as f:
        values = json.loads(f.metadata()["values"])
    t = load_file(str(files[0]))
    assert len(values) == 1  # one [cond, dict] entry, as CLIPTextEncodeFlux makes
    return t["0.cond"], t["0.pooled_output"], values[0]


def run_logged(server, graph):
    """Run a prompt -> (outputs, the server log lines it produced)."""
    before = len(server.log_text())
    out = server.run(graph, timeout=600)
    return out, server.log_text()[before:]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def cache_dir(server):
    return server.base_dir / "user" / "kontext_lowvram" / "cond_cache"


def cache_files(server):
    d = cache_dir(server)
    return sorted(d.glob("*.safetensors")) if d.is_dir() else []


def cache_warnings(log):
    return [line for line in log.splitlines() if "Kontext LowVRAM conditioning cache:" in line
            and any(w in line for w in ("not stored", "corrupt", "skipped"))]


def test_nodes_registered(server):
    assert not server.custom_node_import_failed()
    info = server.object_info()
    loader, enc = info["LowVRAMTextEncoderLoader"], info["LowVRAMTextEncode"]
    assert loader["output"] == ["CLIP"] and enc["output"] == ["CONDITIONING"]
    assert T5["q8_0"] in loader["input"]["required"]["t5xxl_name"][0]
    where = str(server.base_dir / "user" / "kontext_lowvram" / "cond_cache")
    assert where in enc["description"] and where in enc["input"]["optional"]["cache"][1]["tooltip"]
    for spec in [*loader["input"]["required"].values(), *enc["input"]["required"].values(), *enc["input"]["optional"].values()]:
        assert spec[1].get("tooltip")


@pytest.fixture(scope="module")
def first_run(server):
    """Ours (cold cache) and core, side by side on the bf16 files; plus core CLIPTextEncodeFlux on our lazy CLIP."""
    g = {**ours(T5["bf16"]), **core(T5["bf16"])}
    g["core_on_ours"] = H.node("CLIPTextEncodeFlux", clip=["te", 0], clip_l=CLIP_TEXT, t5xxl=T5_TEXT, guidance=2.5)
    g["core_on_ours_save"] = H.node("KLVTestSaveConditioning", conditioning=["core_on_ours", 0], filename_prefix="coo/c")
    out, log = run_logged(server, g)
    return {"ours": saved(server, out, "save"), "core": saved(server, out, "core_save"),
            "core_on_ours": saved(server, out, "core_on_ours_save"), "log": log}


def test_bf16_matches_core_dual_clip_loader(first_run):
    (c, p, v), (rc, rp, rv) = first_run["ours"], first_run["core"]
    assert c.shape == rc.shape and c.shape[-1] == TINY_T5["d_model"] and p.shape == (1, 768)
    assert torch.equal(c, rc) and torch.equal(p, rp)  # same weights through the same core code
    assert v == rv == {"guidance": 2.5}
    assert LOADING in first_run["log"] and "device auto -> cpu" in first_run["log"]  # --cpu server
    cc, cp, cv = first_run["core_on_ours"]  # core node on our lazy CLIP: plug-compatible
    assert torch.equal(cc, c) and torch.equal(cp, p) and cv == v


def test_cache_hit_never_reads_the_weights(server, first_run):
    files = [server.models_dir / "text_encoders" / n for n in (CLIP_L_FILE, T5["bf16"])]
    assert len(cache_files(server)) == 1
    # a new loader instance (other device value; not part of the key) -> our node runs again: served from disk
    out, log = run_logged(server, ours(T5["bf16"], device="cpu", guidance=4.0, prefix="hit"))
    c, p, v = saved(server, out, "save")
    assert HIT in log and LOADING not in log
    assert torch.equal(c, first_run["ours"][0]) and torch.equal(p, first_run["ours"][1]) and v == {"guidance": 4.0}

    # weights replaced by random bytes with the same size and mtime: a read would fail, a hit does not read
    saved_bytes = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in files}
    try:
        for f, (data, mtime) in saved_bytes.items():
            f.write_bytes(os.urandom(len(data)))
            os.utime(f, ns=(mtime, mtime))
        out, log = run_logged(server, ours(T5["bf16"], device="gpu_then_release", prefix="garbage"))
        assert HIT in log and LOADING not in log
        assert torch.equal(saved(server, out, "save")[0], first_run["ours"][0])
    finally:
        for f, (data, mtime) in saved_bytes.items():
            f.write_bytes(data)
            os.utime(f, ns=(mtime, mtime))


def test_corrupt_cache_file_is_recomputed_and_rewritten(server, first_run):
    (entry,) = cache_files(server)
    entry.write_bytes(os.urandom(4096))
    out, log = run_logged(server, ours(T5["bf16"], device="auto", cache_max_mb=2047, prefix="corrupt"))
    assert "corrupt entry" in log and HIT not in log
    assert torch.equal(saved(server, out, "save")[0], first_run["ours"][0])
    with safe_open(str(entry), "pt") as f:  # rewritten, valid
        assert f.metadata()["klv_key"] == entry.stem


def test_cache_survives_a_restart(server, first_run):
    server.stop()
    server.start(timeout=180)
    out, log = run_logged(server, ours(T5["bf16"], prefix="restart"))
    assert HIT in log and LOADING not in log
    assert torch.equal(saved(server, out, "save")[0], first_run["ours"][0])


def test_cache_folder_that_is_a_file_never_fails_a_prompt(server, first_run):
    d = cache_dir(server)
    kept = d.with_name("cond_cache.kept")
    d.rename(kept)
    d.write_bytes(b"a file where the cache folder should be")
    try:
        out, log = run_logged(server, ours(T5["bf16"], cache_max_mb=2046, prefix="dirfile"))
        assert torch.equal(saved(server, out, "save")[0], first_run["ours"][0])
        (line,) = cache_warnings(log)  # one line saying why, no traceback
        assert "not stored" in line and "FileExistsError" in line and "Traceback" not in log
    finally:
        d.unlink()
        kept.rename(d)


ODD_CLIP = CLIP_TEXT + " \ud800 \U0001F98A"  # a lone surrogate (half of a UTF-16 pair), then an emoji
ODD_T5 = T5_TEXT + " \u200f\u05e2\u05d1\u05e8\u05d9\u05ea \x00 \u202e!"  # RTL marks, Hebrew, NUL


def test_odd_prompts_encode_like_core_and_are_cached(server):
    """The host's tokenizers reject a lone surrogate (a bare TypeError from HF tokenizers, also in core's
    CLIPTextEncodeFlux); ours encodes U+FFFD in its place, says so, and caches the result like any prompt."""
    fixed = ODD_CLIP.replace("\ud800", "\ufffd")
    out, log = run_logged(server, {**ours(T5["bf16"], cache_max_mb=2045, prefix="odd", clip_l=ODD_CLIP, t5xxl=ODD_T5),
                                   **core(T5["bf16"], prefix="oddcore", clip_l=fixed, t5xxl=ODD_T5)})
    (c, p, _), (rc, rp, _) = saved(server, out, "save"), saved(server, out, "core_save")
    assert torch.equal(c, rc) and torch.equal(p, rp)
    assert "the clip_l prompt holds 1 invalid character" in log and "Traceback" not in log
    assert not cache_warnings(log)
    out, log = run_logged(server, ours(T5["bf16"], cache_max_mb=2044, prefix="oddhit", clip_l=fixed, t5xxl=ODD_T5))
    assert HIT in log and torch.equal(saved(server, out, "save")[0], c)


def test_gguf_llamacpp_t5_matches_core_on_its_values(server):
    """city96-style T5 GGUF (llama.cpp names, Q8_0) vs core on an fp32 file of exactly the values it holds."""
    out, log = run_logged(server, {**ours(T5["q8_0"], prefix="q8"), **core(T5["q8_0_ref"], prefix="q8ref")})
    (c, p, _), (rc, rp, _) = saved(server, out, "save"), saved(server, out, "core_save")
    err = rel(c, rc)
    print(f"{server.version} GGUF Q8_0 T5 vs core on its fp32 values: cond rel L2 {err:.2e}")
    # ours runs the Q8_0 Linear weights exactly; core rounds them to its fp16 weight dtype. With a quantized file the
    # pack's ops also run CLIP-L, keeping its bf16 weights where core converts them to fp16: a rounding difference.
    assert err < 2e-3 and rel(p, rp) < 1e-3


def test_scaled_fp8_t5_matches_core_on_its_values(server):
    """Scaled fp8 T5 vs core on an fp32 file of fp8 * scale. (Core would read the fp8 file itself only at full depth:
    it looks for the scaled-fp8 marker only in a T5 that has block 23.)"""
    out, _ = run_logged(server, {**ours(T5["fp8"], prefix="fp8"), **core(T5["fp8_ref"], prefix="fp8ref")})
    (c, p, _), (rc, rp, _) = saved(server, out, "save"), saved(server, out, "core_save")
    err = rel(c, rc)
    print(f"{server.version} scaled fp8 T5 vs core on its fp32 values: cond rel L2 {err:.2e}")
    assert err < 2e-3 and rel(p, rp) < 1e-3


def test_wrong_file_is_rejected_by_name(server):
    bad = server.models_dir / "text_encoders" / "klv_not_a_te.safetensors"
    H.save_safetensors({"double_blocks.0.img_attn.qkv.weight": torch.zeros(8, 8)}, bad)
    with pytest.raises(H.ComfyError) as e:
        server.run(ours(bad.name, prefix="bad"), timeout=300)
    assert re.search(r"klv_not_a_te\.safetensors.*FLUX transformer", str(e.value))
