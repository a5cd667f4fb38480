"""FLUX.2 ([dev]- and [klein]-shaped) through our LowVRAMModelLoader inside a real ComfyUI, against core's own loader.

The graph is ComfyUI's FLUX.2 reference-image edit as its templates wire it (EmptyFlux2LatentImage, ReferenceLatent,
Flux2Scheduler, SamplerCustomAdvanced; [dev]: FluxGuidance + BasicGuider, [klein]: CFGGuider at cfg 1 with the
reference on both sides), with test nodes written into this server's custom_nodes for what needs real text
encoders and a FLUX.2 VAE: random text tensors of the model's context width and a random 128-channel reference
latent; the sampled latent (SaveLatent) is compared, no decode. The models are tiny but real-layout (256 wide, 2
heads of 128, 1-2 + 2 blocks: ComfyUI v0.29 reads width, heads, depth and text width from the weights).

Metric: ‖z_ours − z_ref‖ / ‖z_ref‖ of the sampled latents (2 steps, same seed) against (a) core's UNETLoader on the
bf16 original — the quantization error, bounded per format — and (b) UNETLoader on an fp32 file of exactly the values
our file holds (GGUF blocks dequantized by gguf-py's own code) — the runtime path, bounded tightly.

ComfyUI v0.3.64 predates FLUX.2: there the runs are skipped, and one test checks that our loader refuses a FLUX.2
file with an error naming it and the ComfyUI it needs.
"""
import contextlib
import json
import re
import subprocess
import sys
import textwrap

import gguf
import pytest
import torch

import comfy_harness as H
from fixtures.flux2 import TINY_FLUX2_DEV, TINY_FLUX2_KLEIN, random_flux2_state_dict
from fixtures.gguf_blocks import random_blocks
from kontext_lowvram.loaders import quantize_state_dict
from kontext_lowvram.loaders.flux2_layout import flux2_tensor_shapes
from kontext_lowvram.loaders.keys import should_quantize
from kontext_lowvram.loaders.writers import write_gguf, write_safetensors
from kontext_lowvram.optimizations import QTensor, dequantize

ROOT = H.comfy_root_from_env()
VERSION = H.comfy_version(ROOT) if ROOT else "?"
HOST_RUNS_FLUX2 = H.runs_flux2(ROOT)
needs_flux2 = pytest.mark.skipif(not HOST_RUNS_FLUX2, reason=H.predates_reason(ROOT))
MODELS = {"dev": TINY_FLUX2_DEV, "klein": TINY_FLUX2_KLEIN}

# format -> (file suffix, quantization, writer option, bound vs the bf16 original). Bounds: ~1.5x the errors measured
# on ComfyUI v0.29 (CPU, 2 steps); in these random models the latent error is about 1.5-2x the weights' relative L2
# error (Q8_0 0.5 %, fp8 e4m3 2.5 %, nf4 8-9 %).
FORMATS = {
    "gguf_q8_0": (".gguf", "Q8_0", None, 0.03),
    "fp8_e4m3fn_scaled": (".safetensors", "fp8_e4m3fn_scaled", "scaled", 0.10),
    "fp8_comfy_quant": (".safetensors", "fp8_e4m3fn_scaled", "comfy_quant", 0.10),
    "nf4_bnb": (".safetensors", "nf4", "scaled", 0.30),
}
EXACT = 1e-3  # our runtime vs core on an fp32 file of the same values: both compute in fp32 on the CPU

TEST_NODES = '''\
"""Test-only nodes for kontext_lowvram's FLUX.2 integration tests (not part of the pack)."""
import torch


class KLVTestTextTensor:
    """CONDITIONING of random text tokens [1, tokens, width] (a FLUX.2 text encoder's output shape), no pooled vector."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF}),
                             "tokens": ("INT", {"default": 8, "min": 1, "max": 4096}),
                             "width": ("INT", {"default": 15360, "min": 1, "max": 65536})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "build"
    CATEGORY = "testing/kontext_lowvram"

    def build(self, seed, tokens, width):
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        return ([[torch.randn(1, int(tokens), int(width), generator=g), {}]],)


class KLVTestLatent:
    """A random LATENT [1, channels, height, width] (a VAE-encoded reference image's shape)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF}),
                             "channels": ("INT", {"default": 128, "min": 1, "max": 1024}),
                             "height": ("INT", {"default": 8, "min": 1, "max": 1024}),
                             "width": ("INT", {"default": 8, "min": 1, "max": 1024})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "build"
    CATEGORY = "testing/kontext_lowvram"

    def build(self, seed, channels, height, width):
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        return ({"samples": torch.randn(1, int(channels), int(height), int(width), generator=g)},)


NODE_CLASS_MAPPINGS = {"KLVTestTextTensor": KLVTestTextTensor, "KLVTestLatent": KLVTestLatent}
'''


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def server(comfy_root):
    s = H.ComfyServer(comfy_root)
    (s.custom_nodes_dir / "klv_flux2_test_nodes.py").write_text(TEST_NODES, encoding="utf-8")
    try:
        s.start(timeout=240)
        yield s
    finally:
        s.cleanup()


def ours(name, convert="none"):
    return H.node("LowVRAMModelLoader", model_name=name, compute_dtype="default", convert_on_load=convert)


def flux2_edit_graph(model_node, kind, *, size=128, steps=2, seed=7, lora=None, prefix="klv2"):
    """ComfyUI's FLUX.2 edit template around `model_node`: [dev] FluxGuidance + BasicGuider, [klein] CFGGuider cfg 1
    with the reference latent on both conditionings."""
    n = H.node
    cfg = MODELS[kind]
    g = {"model": model_node,
         "text": n("KLVTestTextTensor", seed=1, tokens=8, width=cfg.context_in_dim),
         "ref": n("KLVTestLatent", seed=3, channels=128, height=size // 16, width=size // 16),
         "pos": n("ReferenceLatent", conditioning=["text", 0], latent=["ref", 0])}
    model = ["model", 0]
    if lora is not None:
        spec = {"lora_name": lora} if isinstance(lora, str) else dict(lora)
        spec.setdefault("strength_model", 1.0)
        g["lora"] = n(spec.pop("class_type", "LoraLoaderModelOnly"), model=model, **spec)
        model = ["lora", 0]
    if cfg.guidance_embed:
        g["guidance"] = n("FluxGuidance", conditioning=["pos", 0], guidance=4.0)
        g["guider"] = n("BasicGuider", model=model, conditioning=["guidance", 0])
    else:
        g["zero"] = n("ConditioningZeroOut", conditioning=["text", 0])
        g["neg"] = n("ReferenceLatent", conditioning=["zero", 0], latent=["ref", 0])
        g["guider"] = n("CFGGuider", model=model, positive=["pos", 0], negative=["neg", 0], cfg=1.0)
    g["noise"] = n("RandomNoise", noise_seed=seed)
    g["sampler_select"] = n("KSamplerSelect", sampler_name="euler")
    g["sigmas"] = n("Flux2Scheduler", steps=steps, width=size, height=size)
    g["latent"] = n("EmptyFlux2LatentImage", width=size, height=size, batch_size=1)
    g["sample"] = n("SamplerCustomAdvanced", noise=["noise", 0], guider=["guider", 0], sampler=["sampler_select", 0],
                    sigmas=["sigmas", 0], latent_image=["latent", 0])
    g["save_latent"] = n("SaveLatent", samples=["sample", 0], filename_prefix=f"{prefix}/latent")
    return g


def run_latent(server, model_node, kind, prefix, **kw):
    lat = server.saved_latent(server.run(flux2_edit_graph(model_node, kind, prefix=prefix, **kw), timeout=900))
    assert lat.shape == (1, 128, 8, 8) and torch.isfinite(lat).all()
    return lat


def models_dir(server):
    return server.models_dir / "diffusion_models"


@pytest.fixture(scope="module")
def originals(server):
    """{kind: (file name, bf16 state dict)} of the random bf16 FLUX.2 models in models/diffusion_models."""
    out = {}
    for kind, cfg in MODELS.items():
        sd = random_flux2_state_dict(cfg, seed=11 if kind == "dev" else 12)
        name = f"klv_flux2_{kind}_bf16.safetensors"
        H.save_safetensors(sd, models_dir(server) / name)
        out[kind] = (name, sd)
    return out


@pytest.fixture(scope="module")
def baselines(server, originals):
    """Core UNETLoader on each bf16 original: the reference latents."""
    return {kind: run_latent(server, H.unet_loader_node(name), kind, f"core_{kind}")
            for kind, (name, _) in originals.items()} if HOST_RUNS_FLUX2 else {}


def city96_mix(sd):
    """As city96's FLUX.2 GGUFs are: block linears and the shared modulations quantized, 1-D tensors F32, the input /
    output projections as in the bf16 source."""
    return {k: v.float() if v.ndim == 1 else v for k, v in sd.items()}


@pytest.fixture(scope="module")
def write_format(server, originals):
    cache = {}

    def write(fmt, kind="dev"):
        if (fmt, kind) not in cache:
            suffix, quant, style, _ = FORMATS[fmt]
            sd = quantize_state_dict(originals[kind][1], quant)
            path = models_dir(server) / f"klv_flux2_{kind}_{fmt}{suffix}"
            write_gguf(path, city96_mix(sd)) if suffix == ".gguf" else write_safetensors(path, sd, fp8_style=style)
            cache[(fmt, kind)] = (path.name, sd)
        return cache[(fmt, kind)][0]
    write.state_dict = lambda fmt, kind="dev": cache[(fmt, kind)][1]
    return write


@pytest.fixture(scope="module")
def exact_reference(server):
    """Context: an fp32 .safetensors of exactly the values a state dict holds (GGUF blocks read by gguf-py's own
    dequantizer), for core's UNETLoader."""

    @contextlib.contextmanager
    def make(sd, name):
        ref = {}
        for k, v in sd.items():
            if isinstance(v, QTensor) and v.qformat == "gguf":
                qt = gguf.GGMLQuantizationType[v.meta["qtype"]]
                ref[k] = torch.from_numpy(gguf.quants.dequantize(v.raw.numpy(), qt)).reshape(v.shape).float()
            else:
                ref[k] = dequantize(v, torch.float32) if isinstance(v, QTensor) else v.float()
        path = models_dir(server) / f"{name}_ref_fp32.safetensors"
        H.save_safetensors(ref, path)
        try:
            yield path.name
        finally:
            path.unlink()
    return make


# ---------------------------------------------------------------- the layouts are what ComfyUI builds

LAYOUT_CHECK = textwrap.dedent('''
    import json, sys
    root, tests = sys.argv[1], sys.argv[2]
    sys.path[:0] = [root, tests]
    sys.argv = [sys.argv[0], "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import torch
    import comfy.model_detection, comfy.ops
    from comfy.ldm.flux.model import Flux
    from kontext_lowvram.loaders.flux2_layout import FLUX2_MODELS, flux2_tensor_shapes
    from fixtures.flux2 import TINY_FLUX2_DEV, TINY_FLUX2_KLEIN
    out = {}
    for name, cfg in {**FLUX2_MODELS, "tiny-dev": TINY_FLUX2_DEV, "tiny-klein": TINY_FLUX2_KLEIN}.items():
        shapes = flux2_tensor_shapes(cfg)
        sd = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
        mc = comfy.model_detection.model_config_from_unet(sd, "")
        uc = dict(mc.unet_config)
        m = Flux(**uc, dtype=torch.bfloat16, device="meta", operations=comfy.ops.disable_weight_init)
        built = {k.replace("_norm.weight", "_norm.scale"): list(v.shape) for k, v in m.state_dict().items()}
        want = {k: list(v) for k, v in shapes.items()}
        out[name] = {"model_config": type(mc).__name__, "image_model": uc["image_model"],
                     "hidden": uc["hidden_size"], "heads": uc["num_heads"], "depth": uc["depth"],
                     "single": uc["depth_single_blocks"], "context": uc["context_in_dim"],
                     "guidance": uc["guidance_embed"], "in": uc["in_channels"], "out": uc["out_channels"],
                     "same_keys_in_order": list(built) == list(want), "same_shapes": built == want,
                     "only_built": sorted(set(built) - set(want))[:5], "only_ours": sorted(set(want) - set(built))[:5]}
    print(json.dumps(out))
''')


@needs_flux2
def test_layouts_are_what_comfyui_builds(comfy_root, tmp_path):
    """Our FLUX.2 layouts at full size ([dev], [klein] 4B / 9B) and the test sizes: ComfyUI's own detection reads
    them as the config they are, and the module it builds (meta device) has exactly these keys, order and shapes."""
    script = tmp_path / "layout_check.py"
    script.write_text(LAYOUT_CHECK)
    proc = subprocess.run([sys.executable, str(script), str(comfy_root), str(H.TESTS_DIR)], capture_output=True,
                          text=True, timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    from kontext_lowvram.loaders.flux2_layout import FLUX2_MODELS
    for name, cfg in {**FLUX2_MODELS, "tiny-dev": TINY_FLUX2_DEV, "tiny-klein": TINY_FLUX2_KLEIN}.items():
        r = res[name]
        assert r["model_config"] == "Flux2" and r["image_model"] == "flux2", r
        assert (r["hidden"], r["heads"], r["depth"], r["single"], r["context"], r["guidance"], r["in"], r["out"]) == \
            (cfg.hidden_size, cfg.num_heads, cfg.depth, cfg.depth_single_blocks, cfg.context_in_dim,
             cfg.guidance_embed, cfg.in_channels, cfg.out_channels), r
        assert r["same_keys_in_order"] and r["same_shapes"], r


# ---------------------------------------------------------------- runs

@needs_flux2
@pytest.mark.parametrize("kind", list(MODELS))
def test_bf16_through_our_loader_matches_core(server, originals, baselines, kind):
    lat = run_latent(server, ours(originals[kind][0]), kind, f"ours_bf16_{kind}")
    assert rel(lat, baselines[kind]) < 1e-4


@needs_flux2
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_quantized_formats_close_to_bf16_and_exact_to_their_values(server, write_format, baselines, exact_reference,
                                                                    fmt):
    name = write_format(fmt)
    lat = run_latent(server, ours(name), "dev", f"ours_{fmt}")
    err = rel(lat, baselines["dev"])
    with exact_reference(write_format.state_dict(fmt), f"klv_flux2_{fmt}") as ref_name:
        exact = rel(lat, run_latent(server, H.unet_loader_node(ref_name), "dev", f"exact_{fmt}"))
    print(f"{server.version} FLUX.2 {fmt}: latent rel L2 vs bf16 {err:.4f} (bound {FORMATS[fmt][3]}), "
          f"vs the same values in fp32 {exact:.2e}")
    assert 0 < err < FORMATS[fmt][3]  # > 0: the quantized weights were really used
    assert exact < EXACT
    assert kept_quantized(server, name) == sum(isinstance(v, QTensor) for v in write_format.state_dict(fmt).values())


def kept_quantized(server, name):
    """How many tensors our loader's log line says it kept quantized for `name` (its last load)."""
    found = re.findall(rf"Kontext LowVRAM: loaded {re.escape(name)}: .*?(\d+) of (\d+) tensors quantized",
                       server.log_text())
    assert found, f"no load line for {name}\n{server.log_tail()}"
    return int(found[-1][0])


def kquant_mix(sd, up_qkv="Q5_K", base="Q4_K"):
    """A Q4_K_M-like GGUF state dict of random valid K blocks (gguf-py cannot write K-quants): the double blocks'
    fused qkv one type up, the other block linears and shared modulations `base`, the rest as city96 keeps it."""
    out = {}
    for i, (k, v) in enumerate(sd.items()):
        if should_quantize(k, v.shape):
            qt = up_qkv if k.startswith("double_blocks.") and k.endswith("_attn.qkv.weight") else base
            out[k] = QTensor(random_blocks(qt, v.shape, std=1.2 / v.shape[1] ** 0.5, seed=i), qformat="gguf",
                             shape=v.shape, meta={"qtype": qt})
        else:
            out[k] = v.float() if v.ndim == 1 else v
    return out


@needs_flux2
@pytest.mark.parametrize("kind", list(MODELS))
def test_q4_k_m_runtime_matches_its_exact_values(server, originals, exact_reference, kind):
    sd = kquant_mix(originals[kind][1])
    name = f"klv_flux2_{kind}_Q4_K_M.gguf"
    write_gguf(models_dir(server) / name, sd)
    lat = run_latent(server, ours(name), kind, f"ours_q4km_{kind}")
    with exact_reference(sd, f"klv_flux2_{kind}_q4km") as ref_name:
        err = rel(lat, run_latent(server, H.unet_loader_node(ref_name), kind, f"exact_q4km_{kind}"))
    print(f"{server.version} FLUX.2 {kind} Q4_K_M (random blocks): vs the same values in fp32 {err:.2e}")
    assert err < EXACT
    assert kept_quantized(server, name) == sum(isinstance(v, QTensor) for v in sd.values())


@needs_flux2
@pytest.mark.parametrize("kind", list(MODELS))
def test_every_2d_tensor_quantized(server, originals, exact_reference, kind):
    """img_in quantized too: the host reads its width for the channel count (Flux2 inherits Flux.concat_cond; a raw
    Q8_0 img_in reads 136 wide, more than the 128 output channels, and would concatenate an image that is not
    there) — host/model.py HOST_READS_SHAPE keeps it dense."""
    sd = quantize_state_dict({k: v.float() if v.ndim == 1 else v for k, v in originals[kind][1].items()}, "Q8_0",
                             select=lambda k, s: k.endswith(".weight") and len(s) == 2)
    assert all(isinstance(sd[k], QTensor) for k in ("img_in.weight", "txt_in.weight", "final_layer.linear.weight"))
    name = f"klv_flux2_{kind}_all2d_q8_0.gguf"
    write_gguf(models_dir(server) / name, sd)
    lat = run_latent(server, ours(name), kind, f"ours_all2d_{kind}")
    with exact_reference(sd, f"klv_flux2_{kind}_all2d") as ref_name:
        err = rel(lat, run_latent(server, H.unet_loader_node(ref_name), kind, f"exact_all2d_{kind}"))
    assert err < EXACT


@needs_flux2
@pytest.mark.parametrize("conversion,bound", [("q8_0", 0.03), ("fp8_e4m3fn_scaled", 0.10)])
def test_convert_on_load(server, originals, baselines, conversion, bound):
    lat = run_latent(server, ours(originals["klein"][0], convert=conversion), "klein", f"conv_{conversion}")
    assert 0 < rel(lat, baselines["klein"]) < bound


def flux2_lora(cfg, rank=4, seed=0, std=0.1):
    """A random kohya-format LoRA (lora_unet_<module>) on FLUX.2 block linears and a shared modulation."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    targets = ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "img_mlp.0", "linear1", "linear2",
               "double_stream_modulation_img.lin")
    for key, shape in flux2_tensor_shapes(cfg).items():
        module = key[: -len(".weight")]
        if len(shape) == 2 and any(module.endswith(t) for t in targets):
            name = "lora_unet_" + module.replace(".", "_")
            out[f"{name}.lora_down.weight"] = torch.randn(rank, shape[1], generator=gen) * std
            out[f"{name}.lora_up.weight"] = torch.randn(shape[0], rank, generator=gen) * std
            out[f"{name}.alpha"] = torch.tensor(float(rank))
    return out


@needs_flux2
@pytest.mark.parametrize("fmt", ["gguf_q8_0", "nf4_bnb"])
def test_core_and_low_rank_lora_on_quantized_flux2(server, write_format, exact_reference, fmt):
    """Core LoraLoaderModelOnly on our quantized FLUX.2 (layers stay quantized, the LoRA runs per forward) and our
    LowVRAMLoraLoader (low-rank side product) = core's LoRA merged into an fp32 model of the same values."""
    lora = "klv_flux2_lora.safetensors"
    H.save_safetensors(flux2_lora(TINY_FLUX2_DEV), server.models_dir / "loras" / lora)
    name = write_format(fmt)
    plain = run_latent(server, ours(name), "dev", f"lora0_{fmt}")
    core_lora = run_latent(server, ours(name), "dev", f"lora_core_{fmt}", lora=lora)
    low_rank = run_latent(server, ours(name), "dev", f"lora_lr_{fmt}",
                          lora={"lora_name": lora, "class_type": "LowVRAMLoraLoader"})
    with exact_reference(write_format.state_dict(fmt), f"klv_flux2_lora_{fmt}") as ref_name:
        merged = run_latent(server, H.unet_loader_node(ref_name), "dev", f"lora_ref_{fmt}", lora=lora)
    effect, err_core, err_lr = rel(core_lora, plain), rel(core_lora, merged), rel(low_rank, merged)
    print(f"{server.version} FLUX.2 {fmt}: LoRA effect {effect:.4f}; core LoRA on ours vs fp32 merge {err_core:.5f}; "
          f"low-rank {err_lr:.5f}")
    assert effect > 0.02
    assert err_core < 0.02 and err_lr < 0.01


@needs_flux2
def test_truncated_flux2_file_fails_cleanly_and_server_survives(server, write_format):
    src = models_dir(server) / write_format("gguf_q8_0")
    bad = models_dir(server) / "klv_flux2_truncated.gguf"
    data = src.read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(H.ComfyError) as e:
        server.run(flux2_edit_graph(ours(bad.name), "dev", prefix="bad"), timeout=300)
    assert "klv_flux2_truncated.gguf" in str(e.value) and "download it again" in str(e.value)
    assert "LowVRAMModelLoader" in server.object_info()


@pytest.mark.skipif(HOST_RUNS_FLUX2, reason=f"ComfyUI v{VERSION} runs FLUX.2 (this is the error of hosts that predate it)")
def test_flux2_on_a_host_that_predates_it_is_a_clear_error(server):
    """Our loader on a FLUX.2 file where ComfyUI has no FLUX.2 (its detection reads it as FLUX.1 and builds a model the
    file does not fill): an error naming the file, what it is and the ComfyUI it needs, and the server lives on."""
    name = "klv_flux2_on_old_host.safetensors"
    H.save_safetensors(random_flux2_state_dict(TINY_FLUX2_KLEIN, seed=1), models_dir(server) / name)
    with pytest.raises(H.ComfyError) as e:
        server.run(H.kontext_edit_graph(ours(name), prefix="old_host"), timeout=300)
    msg = str(e.value)
    assert name in msg and "cannot run this file, a FLUX.2 [klein]-like" in msg, msg[:2000]
    assert "FLUX.2 [dev] needs ComfyUI v0.3.72 or later, FLUX.2 [klein] v0.9.2 or later" in msg, msg[:2000]
    assert "LowVRAMModelLoader" in server.object_info()


def test_a_model_the_host_builds_but_the_file_does_not_fill_is_refused(server):
    """The generic check, on any host: a FLUX-family file of no layout we know (a FLUX.1 without vector_in, as
    LongCat-Image is) that also lacks one block linear. The loaders pass it (the host decides); ComfyUI builds what
    its detection reads, and our loader refuses the model whose layer got no weight (v0.29), or the build that does
    not fit the file (v0.3.64's fixed FLUX.1 width), naming the file instead of sampling uninitialised memory."""
    from fixtures.flux import random_flux_state_dict
    from kontext_lowvram.loaders.flux_layout import FluxConfig
    sd = random_flux_state_dict(FluxConfig(hidden_size=256, num_heads=2, depth=2, depth_single_blocks=1), seed=2)
    sd = {k: v for k, v in sd.items() if not k.startswith("vector_in.") and k != "double_blocks.1.img_attn.proj.weight"}
    name = "klv_flux_family_incomplete.safetensors"
    H.save_safetensors(sd, models_dir(server) / name)
    with pytest.raises(H.ComfyError) as e:
        server.run(H.kontext_edit_graph(ours(name), prefix="incomplete"), timeout=300)
    msg = str(e.value)
    assert name in msg and "cannot run this file, a FLUX-family transformer" in msg and "update ComfyUI" in msg, \
        msg[:2000]
    if HOST_RUNS_FLUX2:  # v0.29 reads the width from the weights and builds the model; the missing layer is named
        assert "double_blocks.1.img_attn.proj.weight" in msg, msg[:2000]
