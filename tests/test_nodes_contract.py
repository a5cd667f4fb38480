"""Node classes as ComfyUI sees them, without ComfyUI: declarations, tooltips, file listing."""
import sys
import types

import pytest

from kontext_lowvram import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from kontext_lowvram.host import files


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
        for section in cls.INPUT_TYPES().values():
            for inp, spec in section.items():
                assert spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"


def test_model_list_and_paths(fake_folder_paths):
    names = files.model_files()
    assert names == ["a.gguf", "c.sft", "sub/b.safetensors"]  # no pickles, no stray files
    assert files.model_path("c.sft").endswith("unet/c.sft")
    with pytest.raises(FileNotFoundError, match="missing.gguf.*diffusion_models"):
        files.model_path("missing.gguf")


def test_package_imports_without_comfyui():
    """Importing the pack (as ComfyUI and the tests do) must not import comfy.* or folder_paths."""
    import subprocess
    code = ("import sys, kontext_lowvram, kontext_lowvram.loaders, kontext_lowvram.optimizations.ops, kontext_lowvram.cli;"
            "assert kontext_lowvram.cli.load_bench() is not None;"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'folder_paths', 'nodes')];"
            "assert not bad, bad; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
