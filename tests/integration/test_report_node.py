"""LowVRAMReport and out-of-memory recovery inside a real ComfyUI (--cpu).

A Kontext edit with our loader, our tiled VAE encode/decode and the report node wired IMAGE -> report -> SaveImage
(the pass-through's any-type must validate on both hosts). The report's text comes back through /history; a second
run with a new seed finds the loader and the encode cached by ComfyUI. Out of memory is injected by test-only nodes
this file writes into the server's custom_nodes: a DIFFUSION_MODEL wrapper that raises torch.OutOfMemoryError (once,
or always) after filling memory it keeps, as a half-done step keeps its activations, and a VAE whose full-resolution
convs raise it on inputs wider than a given size. Each recovered run must give the un-injected run's output; a
persistent one must fail with the advice, its own counters showing nothing of the failed attempts left held.
"""
import re
import urllib.request

import pytest
import torch

import comfy_harness as H
from fixtures.text_encoders import random_state_dict
from kontext_lowvram.loaders.text_encoders import clip_l_tensor_shapes, t5_tensor_shapes
from t5_files import TINY_T5

OOM_NODES = '''\
"""Test-only nodes for kontext_lowvram's report / OOM integration tests (not part of the pack)."""
import torch

OOM = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


class KLVInjectDenoiseOOM:
    """A clone of the model whose first `failures` forwards run out of memory, each after filling `hold_mb` MiB."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "failures": ("INT", {"default": 1, "min": 0, "max": 1 << 20}),
                             "hold_mb": ("INT", {"default": 0, "min": 0, "max": 1 << 16})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "inject"
    CATEGORY = "testing/kontext_lowvram"

    def inject(self, model, failures, hold_mb):
        import comfy.patcher_extension as pe
        m = model.clone()
        calls = [0]

        def diffusion_model(executor, *args, **kwargs):
            calls[0] += 1
            if calls[0] <= failures:
                activations = torch.ones(hold_mb * 2 ** 18) if hold_mb else None  # touched pages, kept by this frame
                raise OOM(f"injected out of memory ({calls[0]} of {failures})")
            return executor(*args, **kwargs)
        m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "klv_test_oom", diffusion_model)
        return (m,)


class KLVOOMVAE:
    """A VAE (loaded as VAELoader does) whose first full-resolution encoder and decoder convs run out of memory on
    inputs wider than `max_side` pixels."""

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths
        return {"required": {"vae_name": (folder_paths.get_filename_list("vae"),),
                             "max_side": ("INT", {"default": 100, "min": 1, "max": 8192})}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    CATEGORY = "testing/kontext_lowvram"

    def load(self, vae_name, max_side):
        import comfy.sd
        import comfy.utils
        import folder_paths
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(folder_paths.get_full_path("vae", vae_name)))

        def too_big(module, args):
            if max(args[0].shape[-2:]) > max_side:
                raise OOM(f"injected out of memory: {tuple(args[0].shape)} wider than {max_side} px")
        fsm = vae.first_stage_model
        fsm.decoder.up[0].block[0].conv1.register_forward_pre_hook(too_big)
        fsm.encoder.down[0].block[0].conv1.register_forward_pre_hook(too_big)
        return (vae,)


NODE_CLASS_MAPPINGS = {"KLVInjectDenoiseOOM": KLVInjectDenoiseOOM, "KLVOOMVAE": KLVOOMVAE}
'''

CLIP_L_FILE = "klv_report_clip_l.safetensors"
T5_FILE = "klv_report_t5_tiny.safetensors"
HOLD_MB = 512
FAILED_RAM = re.compile(r"Kontext LowVRAM denoise failed: .*?RAM peak [\d.]+ GiB \(([+-][\d.]+) after\)")


@pytest.fixture(scope="module")
def server(comfy_root):
    """Its own ComfyUI, with the injection nodes above and small text-encoder files."""
    s = H.ComfyServer(comfy_root)
    (s.custom_nodes_dir / "klv_oom_test_nodes.py").write_text(OOM_NODES, encoding="utf-8")
    te = s.models_dir / "text_encoders"
    H.save_safetensors(random_state_dict(clip_l_tensor_shapes(), seed=1, std=0.02), te / CLIP_L_FILE)
    H.save_safetensors(random_state_dict(t5_tensor_shapes(TINY_T5), seed=2, std=0.1), te / T5_FILE)
    H.write_flux_transformer(s.models_dir / "diffusion_models" / "klv_report_flux.safetensors",
                             H.flux_test_config(comfy_root), seed=0)
    try:
        s.start(timeout=180)
        yield s
    finally:
        s.cleanup()


def edit(seed=7, prefix="base", model=None, vae=None):
    """The Kontext edit with our loader, tiled encode/decode and the report between the decode and SaveImage."""
    n = H.node
    extra = {
        "encode": n("LowVRAMTiledVAEEncode", pixels=["scale", 0], vae=["vae_ours", 0], tile_size=0),
        "decode": n("LowVRAMTiledVAEDecode", samples=["sampler", 0], vae=["vae_ours", 0], tile_size=0),
        "vae_ours": vae or n("VAELoader", vae_name=H.VAE_NAME),
        "report": n("LowVRAMReport", value=["decode", 0]),
        "save_image": n("SaveImage", images=["report", 0], filename_prefix=f"{prefix}/img"),
        "save_tensor": n("KLVSaveImageTensor", images=["report", 0], filename_prefix=f"{prefix}/t"),
    }
    if model is not None:
        extra.update(model)
    g = H.kontext_edit_graph(H.node("LowVRAMModelLoader", model_name="klv_report_flux.safetensors",
                                    compute_dtype="default", convert_on_load="none"),
                             seed=seed, prefix=prefix, extra_nodes=extra)
    g["sampler"]["inputs"]["model"] = ["oom", 0] if model is not None else ["model", 0]
    return g


def inject_denoise(failures):
    return {"oom": H.node("KLVInjectDenoiseOOM", model=["model", 0], failures=failures, hold_mb=HOLD_MB)}


def run_logged(server, graph):
    before = len(server.log_text())
    out = server.run(graph, timeout=900)
    return out, server.log_text()[before:]


def report_of(out):
    (text,) = out["report"]["text"]
    return {line.split(":")[0]: line for line in text.splitlines()[1:]}, text


@pytest.fixture(scope="module")
def base(server):
    out, log = run_logged(server, edit())
    return {"out": out, "log": log, "image": server.saved_image_tensor(out, "save_tensor"),
            "latent": server.saved_latent(out)}


def test_report_node_and_frontend_are_registered(server):
    assert not server.custom_node_import_failed()
    info = server.object_info("LowVRAMReport")["LowVRAMReport"]
    assert info["display_name"] == "VRAM Report (per phase) · Kontext LowVRAM"
    assert info["category"] == "Kontext LowVRAM/utils" and info["output"] == ["*"] and info["output_node"]
    assert info["input"]["required"]["value"][0] == "*" and info["input"]["required"]["value"][1]["tooltip"]
    script = f"/extensions/{H.PACK_DIR_NAME}/text_boxes.js"
    assert script in server.get_json("/extensions")
    with urllib.request.urlopen(server.url + script, timeout=30) as r:
        assert b"LowVRAMReport" in r.read()


def test_report_shows_every_phase_of_the_run(server, base):
    rows, text = report_of(base["out"])
    assert text.splitlines()[0].endswith("VRAM: n/a (CPU run)")
    assert list(rows) == ["model load (LowVRAMModelLoader #model)", "text encode",
                          "VAE encode (LowVRAMTiledVAEEncode #encode)", "denoise (KSampler #sampler)",
                          "VAE decode (LowVRAMTiledVAEDecode #decode)"], text
    for key in ("model load (LowVRAMModelLoader #model)", "VAE encode (LowVRAMTiledVAEEncode #encode)",
                "denoise (KSampler #sampler)", "VAE decode (LowVRAMTiledVAEDecode #decode)"):
        assert re.search(r": \d+\.\d\d s · RAM peak \d+\.\d\d GiB \([+-]\d+\.\d\d after\) · VRAM: n/a \(CPU run\)",
                         rows[key]), rows[key]
    # the loader's own line: file, format, resident size, quantized count of a non-empty state dict, no conversion
    assert re.search(r"; klv_report_flux\.safetensors: bfloat16; \d+\.\d\d GiB resident, 0 of [1-9]\d* tensors "
                     r"quantized; no conversion$", rows["model load (LowVRAMModelLoader #model)"]), text
    assert rows["text encode"] == "text encode: not measured (not done by a Kontext LowVRAM node)"
    assert "OOM" not in text
    summary = [line for line in base["log"].splitlines() if "Kontext LowVRAM report: " in line]
    assert len(summary) == 1 and "denoise" in summary[0] and "VRAM n/a (CPU run)" in summary[0]
    assert len(server.saved_images(base["out"])) == 1  # SaveImage took the report's output


def test_phases_comfyui_cached_say_so(server, base):
    out, _ = run_logged(server, edit(seed=8, prefix="seed8"))
    rows, text = report_of(out)
    assert rows["model load (LowVRAMModelLoader #model)"].startswith(
        "model load (LowVRAMModelLoader #model): cached (earlier run): "), text
    assert rows["VAE encode (LowVRAMTiledVAEEncode #encode)"].split(": ")[1] == "cached (earlier run)"
    assert re.search(r"denoise \(KSampler #sampler\): \d+\.\d\d s", rows["denoise (KSampler #sampler)"])
    assert "cached" not in rows["VAE decode (LowVRAMTiledVAEDecode #decode)"]


def test_denoise_recovers_from_one_oom_with_the_same_result(server, base):
    out, log = run_logged(server, edit(prefix="oom_once", model=inject_denoise(1)))
    assert torch.equal(server.saved_latent(out), base["latent"])
    assert torch.equal(server.saved_image_tensor(out, "save_tensor"), base["image"])
    rows, text = report_of(out)
    assert "injected out of memory (1 of 1)" in rows["denoise (KSampler #sampler)"]
    assert "emptied the cache, retried once" in rows["denoise (KSampler #sampler)"]
    assert "Kontext LowVRAM denoise: OutOfMemoryError: injected out of memory (1 of 1)" in log
    assert "1 OOM recovery" in [line for line in log.splitlines() if "Kontext LowVRAM report: " in line][0]


def test_persistent_denoise_oom_fails_clearly_and_holds_nothing(server, base):
    before = len(server.log_text())
    with pytest.raises(H.ComfyError) as err:
        server.run(edit(prefix="oom_always", model=inject_denoise(10 ** 6)), timeout=900)
    msg = str(err.value)
    assert "StillOutOfMemory" in msg and "kontext-lowvram plan --vram N" in msg and "lower VRAM tier" in msg
    log = server.log_text()[before:]
    (held,) = FAILED_RAM.findall(log)
    # each failing attempt filled 512 MiB in a frame of its own; none of it is held once the phase is over
    assert float(held) < 0.2, log[-3000:]
    out, _ = run_logged(server, edit(prefix="after_failure"))  # the server goes on as before
    assert torch.equal(server.saved_latent(out), base["latent"])


def test_tiled_vae_recovers_from_oom_with_smaller_tiles(server, base):
    out, log = run_logged(server, edit(prefix="vae_oom", vae=H.node("KLVOOMVAE", vae_name=H.VAE_NAME, max_side=100)))
    rows, text = report_of(out)
    for key in ("VAE encode (LowVRAMTiledVAEEncode #encode)", "VAE decode (LowVRAMTiledVAEDecode #decode)"):
        assert "OOM with 128-px tiles: retried with 64-px tiles" in rows[key], text
    assert "with 128-px tiles; retrying with 64-px tiles" in log
    # same image as whole-image tiles, to float rounding (the tiles change only the order of the sums)
    assert (server.saved_image_tensor(out, "save_tensor") - base["image"]).abs().max() < 1e-3
    lat = server.saved_latent(out)
    assert ((lat - base["latent"]).norm() / base["latent"].norm()).item() < 1e-3


def test_tiled_vae_oom_at_the_floor_fails_clearly(server):
    with pytest.raises(H.ComfyError, match=r"out of memory even with 64-px tiles"):
        server.run(edit(prefix="vae_oom_floor", vae=H.node("KLVOOMVAE", vae_name=H.VAE_NAME, max_side=10)),
                   timeout=900)


def text_graph(device="cpu", guidance=2.5, prefix="te"):
    n = H.node
    return {
        "te": n("LowVRAMTextEncoderLoader", clip_l_name=CLIP_L_FILE, t5xxl_name=T5_FILE, device=device),
        "enc": n("LowVRAMTextEncode", clip=["te", 0], clip_l="a fox", t5xxl="make the fox silver", guidance=2.5),
        "guidance": n("FluxGuidance", conditioning=["enc", 0], guidance=guidance),
        "report": n("LowVRAMReport", value=["guidance", 0]),
    }


def test_text_encode_miss_hit_and_cached(server):
    row = "text encode (LowVRAMTextEncode #enc)"
    rows, text = report_of(server.run(text_graph(), timeout=600))
    assert "conditioning cache miss: encoded" in rows[row], text
    assert rows["model load"] == "model load: not measured (not done by a Kontext LowVRAM node)"
    # a new loader instance (another device value): our encode runs again and is answered from the cache
    rows, text = report_of(server.run(text_graph(device="auto"), timeout=600))
    assert "conditioning cache hit: the text encoders were not run" in rows[row], text
    # only the guidance after the encode changes: ComfyUI answers the encode from its cache
    rows, text = report_of(server.run(text_graph(device="auto", guidance=3.0), timeout=600))
    assert rows[row].startswith(f"{row}: cached (earlier run): "), text
    assert "conditioning cache hit" in rows[row]
