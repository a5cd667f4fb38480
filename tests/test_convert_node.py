"""LowVRAMConvert without ComfyUI: the source list, where the output goes, the progress bar, interrupt and the
summary shown on the node (host/convert.py with stand-ins for folder_paths and comfy.utils / model_management)."""
import os
import sys
import types

import pytest
from safetensors.torch import save_file

from fixtures.diffusers_flux import bfl_to_diffusers, write_sharded
from fixtures.flux import random_flux_state_dict
from kontext_lowvram.host import convert as host
from kontext_lowvram.loaders.flux_layout import FluxConfig
from kontext_lowvram.nodes.convert import LowVRAMConvert

CFG = FluxConfig(hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1, context_in_dim=256, vec_in_dim=256,
                 mlp_ratio=1.0)


class Interrupted(Exception):
    pass


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    """Fake model folders and comfy.utils.ProgressBar / comfy.model_management (updates and interrupts recorded)."""
    dm, te = tmp_path / "diffusion_models", tmp_path / "text_encoders"
    (dm / "sub").mkdir(parents=True)
    te.mkdir()
    sd = random_flux_state_dict(CFG, seed=1)
    save_file(sd, str(dm / "sub" / "flux.safetensors"))
    write_sharded(str(dm / "FLUX.1-x" / "transformer"), bfl_to_diffusers(sd, CFG), shards=2)
    (te / "t5xxl_fp16.safetensors").write_bytes(b"x")
    (dm / "half.gguf.123.abcd1234.partial").write_bytes(b"x")
    fp = types.ModuleType("folder_paths")
    fp.get_folder_paths = lambda name: {"diffusion_models": [str(dm)], "text_encoders": [str(te)]}.get(name, [])
    state = types.SimpleNamespace(updates=[], bars=[], interrupt_at=None, calls=0)

    class ProgressBar:
        def __init__(self, total):
            state.bars.append(total)

        def update_absolute(self, value, total=None, preview=None):
            state.updates.append((value, total))

    def throw():
        state.calls += 1
        if state.interrupt_at is not None and state.calls >= state.interrupt_at:
            raise Interrupted("Processing interrupted")
    comfy_pkg = types.ModuleType("comfy")
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    mm = types.ModuleType("comfy.model_management")
    mm.throw_exception_if_processing_interrupted = throw
    comfy_pkg.utils, comfy_pkg.model_management = utils, mm
    for name, mod in {"folder_paths": fp, "comfy": comfy_pkg, "comfy.utils": utils,
                      "comfy.model_management": mm}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    state.dm, state.te, state.n = dm, te, len(sd)
    return state


def test_sources_from_both_folders(comfy):
    names = LowVRAMConvert.INPUT_TYPES()["required"]["source"][0]
    assert names == ["diffusion_models/FLUX.1-x/transformer/diffusion_pytorch_model.safetensors.index.json",
                     "diffusion_models/sub/flux.safetensors", "text_encoders/t5xxl_fp16.safetensors"]
    assert host.source_path("diffusion_models/sub/flux.safetensors") == str(comfy.dm / "sub" / "flux.safetensors")
    with pytest.raises(ValueError, match="pick a file from the list"):
        host.source_path("flux.safetensors")


def test_output_goes_next_to_the_source(comfy):
    src = str(comfy.dm / "sub" / "flux.safetensors")
    assert host.output_path(src, "", "Q4_K_M") == str(comfy.dm / "sub" / "flux-Q4_K_M.gguf")
    assert host.output_path(src, "mine", "Q8_0") == str(comfy.dm / "sub" / "mine.gguf")
    assert host.output_path(src, "mine.safetensors", "fp8_e4m3fn_scaled") == str(comfy.dm / "sub" / "mine.safetensors")
    index = str(comfy.dm / "FLUX.1-x" / "transformer" / "diffusion_pytorch_model.safetensors.index.json")
    assert host.output_path(index, "", "Q8_0") == str(comfy.dm / "FLUX.1-x-Q8_0.gguf")
    for bad in ("../x.gguf", "a/b.gguf", ".."):
        with pytest.raises(ValueError, match="must be a file name"):
            host.output_path(src, bad, "Q8_0")


def test_node_converts_with_progress_and_shows_the_summary(comfy):
    out = LowVRAMConvert().convert("diffusion_models/sub/flux.safetensors", "Q8_0", "", False, True)
    text = out["result"][0]
    assert out["ui"]["text"] == [text]
    assert "flux-Q8_0.gguf" in text and "relative L2 error" in text and "Q8_0 x" in text
    assert os.path.isfile(comfy.dm / "sub" / "flux-Q8_0.gguf")
    assert os.path.isfile(comfy.dm / "sub" / "flux-Q8_0.gguf.sha256")
    n = comfy.n
    assert comfy.bars == [n, n]  # convert, then verify: tensors done / total
    assert comfy.updates == [(i + 1, n) for i in range(n)] * 2
    # a second run without overwrite is refused; with it, it runs
    with pytest.raises(ValueError, match="exists; pass --force \\(the node: overwrite\\)"):
        LowVRAMConvert().convert("diffusion_models/sub/flux.safetensors", "Q8_0", "", False, True)
    LowVRAMConvert().convert("diffusion_models/sub/flux.safetensors", "Q8_0", "", True, False)


def test_diffusers_index_from_the_list(comfy):
    text = LowVRAMConvert().convert(
        "diffusion_models/FLUX.1-x/transformer/diffusion_pytorch_model.safetensors.index.json", "BF16", "", False,
        False)["result"][0]
    assert "diffusers" in text and os.path.isfile(comfy.dm / "FLUX.1-x-BF16.gguf")


def test_interrupt_leaves_nothing(comfy):
    comfy.interrupt_at = 10
    before = sorted(os.listdir(comfy.dm / "sub"))
    with pytest.raises(Interrupted):
        LowVRAMConvert().convert("diffusion_models/sub/flux.safetensors", "Q4_K_M", "", False, True)
    assert sorted(os.listdir(comfy.dm / "sub")) == before


def test_is_changed_follows_the_files(comfy):
    args = ("diffusion_models/sub/flux.safetensors", "Q8_0", "", False, True)
    first = LowVRAMConvert.IS_CHANGED(*args)
    assert LowVRAMConvert.IS_CHANGED(*args) == first
    LowVRAMConvert().convert(*args)
    after = LowVRAMConvert.IS_CHANGED(*args)
    assert after != first  # the output now exists
    os.remove(comfy.dm / "sub" / "flux-Q8_0.gguf")
    assert LowVRAMConvert.IS_CHANGED(*args) == first  # deleted: the same prompt runs again
