"""Integration tests against a real ComfyUI server.

Run under the ComfyUI venv's python (it also runs the server subprocess), e.g.::

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest tests/integration -x -q

Without $COMFYUI_PATH (or when it is not a ComfyUI checkout) every test here is skipped.
Set KLV_KEEP_COMFY_BASE=1 to keep the temporary base directory (models, outputs, server.log).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # --import-mode=importlib does not put test dirs on sys.path
    sys.path.insert(0, str(_HERE))

import comfy_harness as H  # noqa: E402


def pytest_collection_modifyitems(config, items):
    root = H.comfy_root_from_env()
    skip = None
    if root is None:
        import os

        raw = os.environ.get("COMFYUI_PATH", "").strip()
        reason = H.SKIP_REASON if not raw else f"{H.SKIP_REASON} ({raw!r} has no main.py/nodes.py/comfy/)"
        skip = pytest.mark.skip(reason=reason)
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.integration)
            if skip is not None:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy_root() -> Path:
    root = H.comfy_root_from_env()
    if root is None:
        pytest.skip(H.SKIP_REASON)
    return root


@pytest.fixture(scope="session")
def comfy(comfy_root):
    """A running ComfyUI (``--cpu``) on a temporary base directory; see comfy_harness.ComfyServer.

    ``comfy.version``, ``comfy.models_dir``, ``comfy.object_info()``, ``comfy.run(prompt, timeout)``,
    ``comfy.saved_latent(outputs)``, ``comfy.saved_images(outputs)``, ``comfy.log_tail()``.
    """
    server = H.ComfyServer(comfy_root)
    try:
        server.start(timeout=180)
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def flux_cfg(comfy_root) -> "H.FluxConfig":
    """Smallest FLUX transformer config this ComfyUI accepts (tiny on v0.4+/v0.29, 3072 wide on v0.3.x)."""
    return H.flux_test_config(comfy_root)


@pytest.fixture(scope="session")
def write_flux_model(comfy, flux_cfg):
    """``write_flux_model(seed=0, cfg=None, dtype=torch.bfloat16, name=None) -> FluxModelFile``:
    writes (once per session per arguments) a random FLUX transformer .safetensors into
    ``models/diffusion_models/`` and returns its name (for UNETLoader), path and config."""
    cache: dict = {}

    def write(seed: int = 0, cfg=None, dtype: torch.dtype = torch.bfloat16, name: str | None = None):
        cfg = cfg or flux_cfg
        key = (cfg, seed, dtype, name)
        if key not in cache:
            dt = str(dtype).replace("torch.", "")
            fname = name or f"klv_flux_h{cfg.hidden_size}_d{cfg.depth}s{cfg.depth_single_blocks}_seed{seed}_{dt}.safetensors"
            path = comfy.models_dir / "diffusion_models" / fname
            H.write_flux_transformer(path, cfg, seed=seed, dtype=dtype)
            cache[key] = H.FluxModelFile(name=fname, path=path, cfg=cfg, seed=seed)
        return cache[key]

    return write


@pytest.fixture(scope="session")
def flux_model(write_flux_model) -> "H.FluxModelFile":
    """The default random bf16 FLUX transformer (seed 0) in models/diffusion_models/."""
    return write_flux_model()


@pytest.fixture(scope="session")
def flux_lora(comfy, flux_cfg) -> str:
    """Name (in models/loras) of a random kohya-format LoRA for the ``flux_cfg`` transformer."""
    name = "klv_flux_lora.safetensors"
    H.write_flux_lora(comfy.models_dir / "loras" / name, flux_cfg)
    return name
