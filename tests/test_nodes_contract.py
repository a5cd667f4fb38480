"""Node classes as ComfyUI sees them, without ComfyUI: declarations, tooltips, file listing."""
import sys
import types

import pytest

from kontext_lowvram import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, NODES
from kontext_lowvram.host import files

DISPLAY_NAMES = {
    "LowVRAMModelLoader": "Load Diffusion Model (GGUF/FP8/NF4) · Kontext LowVRAM",
    "LowVRAMTiledVAEDecode": "Tiled VAE Decode (seam-free) · Kontext LowVRAM",
    "LowVRAMTiledVAEEncode": "Tiled VAE Encode (seam-free) · Kontext LowVRAM",
    "LowVRAMAttention": "Attention Backend · Kontext LowVRAM",
    "LowVRAMLoraLoader": "LoRA on Quantized Model (low-rank) · Kontext LowVRAM",
    "LowVRAMTextEncoderLoader": "Load Text Encoders (lazy, GGUF/FP8) · Kontext LowVRAM",
    "LowVRAMTextEncode": "Text Encode FLUX (cached) · Kontext LowVRAM",
    "LowVRAMLLMTextEncoderLoader": "Load FLUX.2 Text Encoder (lazy, GGUF/FP8) · Kontext LowVRAM",
    "LowVRAMTextEncodeFlux2": "Text Encode FLUX.2 (cached) · Kontext LowVRAM",
    "LowVRAMCompareImages": "Compare Images (PSNR / SSIM) · Kontext LowVRAM",
    "LowVRAMReport": "VRAM Report (per phase) · Kontext LowVRAM",
    "LowVRAMConvert": "Convert Model (GGUF/FP8/NF4) · Kontext LowVRAM",
}
# what people type into ComfyUI v0.29's node search to find each node (older hosts ignore SEARCH_ALIASES)
SEARCH_ALIASES = {
    "LowVRAMModelLoader": ["gguf", "unet loader", "load diffusion model", "fp8", "nf4", "flux kontext", "flux2", "klein"],
    "LowVRAMTextEncoderLoader": ["dual clip loader", "t5", "clip loader gguf"],
    "LowVRAMTiledVAEDecode": ["vae decode tiled"],
    "LowVRAMTiledVAEEncode": ["vae encode tiled"],
    "LowVRAMLoraLoader": ["lora loader", "lora gguf"],
    "LowVRAMAttention": ["sage attention", "flash attention"],
    "LowVRAMTextEncode": ["clip text encode flux", "cached"],
    "LowVRAMLLMTextEncoderLoader": ["clip loader flux2", "mistral", "qwen3", "klein text encoder"],
    "LowVRAMTextEncodeFlux2": ["clip text encode", "flux2 prompt", "cached"],
    "LowVRAMCompareImages": ["image diff", "psnr", "ssim", "difference"],
    "LowVRAMReport": ["vram report", "memory report", "profiler"],
    "LowVRAMConvert": ["convert", "quantize", "gguf converter", "make gguf"],
}
# expert inputs v0.29's frontend folds away ({"advanced": True}; older hosts show them as usual)
ADVANCED = {("LowVRAMModelLoader", "compute_dtype"), ("LowVRAMModelLoader", "fp8_matmul"),
            ("LowVRAMModelLoader", "torch_compile"), ("LowVRAMTextEncode", "cache_max_mb"),
            ("LowVRAMTextEncodeFlux2", "cache_max_mb"),
            ("LowVRAMAttention", "split_chunk_mb"), ("LowVRAMConvert", "verify")}


@pytest.fixture
def fake_folder_paths(tmp_path, monkeypatch):
    dm, unet = tmp_path / "diffusion_models", tmp_path / "unet"
    (dm / "sub").mkdir(parents=True)
    unet.mkdir()
    for f in [dm / "a.gguf", dm / "sub" / "b.safetensors", unet / "c.sft", dm / "d.ckpt", dm / "notes.txt"]:
        f.write_bytes(b"x")
    mod = types.ModuleType("folder_paths")
    mod.get_folder_paths = lambda name: [str(dm), str(unet)] if name == "diffusion_models" else []
    mod.get_filename_list = lambda name: ["style.safetensors"] if name == "loras" else []
    monkeypatch.setitem(sys.modules, "folder_paths", mod)
    return tmp_path


def test_every_node_is_declared_completely(fake_folder_paths):
    assert set(NODE_CLASS_MAPPINGS) == set(NODE_DISPLAY_NAME_MAPPINGS)
    for name, cls in NODE_CLASS_MAPPINGS.items():
        assert cls.CATEGORY.startswith("Kontext LowVRAM/")
        assert callable(getattr(cls, cls.FUNCTION)) and cls.RETURN_TYPES and cls.DESCRIPTION
        for kind, section in cls.INPUT_TYPES().items():
            if kind == "hidden":  # filled in by the host (e.g. the prompt), never shown
                continue
            for inp, spec in section.items():
                assert spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"


def test_mappings_are_built_from_the_one_node_list():
    assert NODE_CLASS_MAPPINGS == {cls.__name__: cls for cls in NODES} and len(NODES) == len(set(NODES))
    assert NODE_DISPLAY_NAME_MAPPINGS == {cls.__name__: cls.DISPLAY_NAME for cls in NODES}
    assert NODE_DISPLAY_NAME_MAPPINGS == DISPLAY_NAMES


def test_search_aliases_and_advanced_inputs(fake_folder_paths):
    assert {name: cls.SEARCH_ALIASES for name, cls in NODE_CLASS_MAPPINGS.items()} == SEARCH_ALIASES
    advanced = {(name, inp) for name, cls in NODE_CLASS_MAPPINGS.items() for kind, section in cls.INPUT_TYPES().items()
                if kind != "hidden" for inp, spec in section.items() if spec[1].get("advanced") is True}
    assert advanced == ADVANCED


def test_model_list_and_paths(fake_folder_paths):
    names = files.model_files()
    assert names == ["a.gguf", "c.sft", "sub/b.safetensors"]  # no pickles, no stray files
    assert files.model_path("c.sft").endswith("unet/c.sft")
    with pytest.raises(FileNotFoundError, match="missing.gguf.*diffusion_models"):
        files.model_path("missing.gguf")


def test_package_imports_without_comfyui():
    """Importing the pack (as ComfyUI and the tests do) must not import comfy.* or folder_paths."""
    import subprocess
    code = ("import sys, kontext_lowvram, kontext_lowvram.loaders, kontext_lowvram.optimizations.ops, kontext_lowvram.cli,"
            " kontext_lowvram.host.ops, kontext_lowvram.host.patcher, kontext_lowvram.host.model;"
            "assert kontext_lowvram.cli.load_bench() is not None;"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'folder_paths', 'nodes')];"
            "assert not bad, bad; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
