"""Drive a real ComfyUI server (a checkout at $COMFYUI_PATH) from tests.

Nothing here imports ComfyUI: the server runs as a subprocess (``sys.executable main.py --cpu ...``)
with a throw-away ``--base-directory`` holding this repository (symlinked into ``custom_nodes/``),
a tiny test-only node pack (``klv_test_nodes.py``: conditioning tensors without T5/CLIP weights),
a random FLUX VAE, random FLUX transformers and an input image. Tests talk to it over HTTP
(``/object_info``, ``/prompt``, ``/history``) exactly like the UI does, in API-format prompts.

Works with ComfyUI v0.3.64 and v0.29 (the flags and node inputs used exist in both).
"""
from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
TESTS_DIR = REPO_ROOT / "tests"
if str(TESTS_DIR) not in sys.path:  # the model builders in tests/fixtures, also for scripts that import this file
    sys.path.insert(0, str(TESTS_DIR))


def _ensure_pack_importable() -> None:
    """``kontext_lowvram`` is normally pip-installed (editable); else map it onto this checkout."""
    try:
        import kontext_lowvram  # noqa: F401
    except ImportError:
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "kontext_lowvram", REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["kontext_lowvram"] = mod
        try:
            spec.loader.exec_module(mod)
        except Exception:
            # the pack's node registration may be mid-rewrite; the loaders/ subpackage is what we need
            pass


_ensure_pack_importable()

from fixtures.flux import random_flux_state_dict, random_flux_vae_state_dict  # noqa: E402
from kontext_lowvram.loaders.flux_layout import FluxConfig  # noqa: E402
PACK_DIR_NAME = "comfyui-kontext-lowvram"
TEST_NODES_FILE = "klv_test_nodes.py"
VAE_NAME = "klv_flux_vae.safetensors"
INPUT_IMAGE = "klv_input.png"
SKIP_REASON = "set COMFYUI_PATH to a ComfyUI checkout to run integration tests"

# Flags present in the cli_args.py of both v0.3.64 and v0.29.
SERVER_FLAGS = (
    "--cpu",
    "--disable-auto-launch",
    "--preview-method", "none",
    "--disable-api-nodes",      # no comfy.org API nodes (network, slow import)
    "--dont-print-server",      # no per-request access log
    "--use-pytorch-cross-attention",  # SDPA on CPU (the CPU default is sub-quadratic attention)
)


# --------------------------------------------------------------------------------------------
# ComfyUI checkout helpers
# --------------------------------------------------------------------------------------------

def slow_enabled() -> bool:
    """Opt-in for minutes-long CPU graphs (``KLV_INTEGRATION_SLOW=1``)."""
    return os.environ.get("KLV_INTEGRATION_SLOW", "") not in ("", "0")


def comfy_root_from_env() -> Path | None:
    """The ComfyUI checkout named by $COMFYUI_PATH, or None if unset / not a checkout."""
    p = os.environ.get("COMFYUI_PATH", "").strip()
    if not p:
        return None
    root = Path(p).expanduser().resolve()
    return root if is_comfy_checkout(root) else None


def is_comfy_checkout(root: Path) -> bool:
    return (root / "main.py").is_file() and (root / "nodes.py").is_file() and (root / "comfy").is_dir()


def host_has(root: Path | None, relpath: str, marker: str) -> bool:
    """Whether the host's `relpath` source mentions `marker` (how the FLUX.2 tests tell a host that runs it)."""
    return root is not None and marker in (root / relpath).read_text(encoding="utf-8", errors="replace")


def runs_flux2(root: Path | None) -> bool:
    """Whether the host detects FLUX.2 diffusion models (v0.29 does, v0.3.64 predates them)."""
    return host_has(root, "comfy/model_detection.py", "double_stream_modulation_img")


def predates_reason(root: Path | None, what: str = "FLUX.2") -> str:
    """The skip reason for a test that needs `what`: no host configured at all, or a host too old for it."""
    return SKIP_REASON if root is None else f"ComfyUI v{comfy_version(root)} predates {what}"


MISTRAL_TOKENIZER_REASON = ("core's FLUX.2 Mistral tokenizer cannot be built with this transformers (ComfyUI v0.29 "
                            "calls MistralConverter(vocab=...), transformers >= 5.15 takes MistralConverter(vocab_file); "
                            "4.50.3-5.14.1 work)")


def mistral_tokenizer_works() -> bool:
    """Whether this Python's transformers has the MistralConverter(vocab=...) that core's FLUX.2 [dev] tokenizer calls
    (the server runs on the same Python)."""
    import inspect
    try:
        from transformers.integrations.mistral import MistralConverter
    except Exception:
        try:
            from transformers.models.pixtral.convert_pixtral_weights_to_hf import MistralConverter
        except Exception:
            return False
    return "vocab" in inspect.signature(MistralConverter.__init__).parameters


def comfy_version(root: Path) -> str:
    """``__version__`` from ``comfyui_version.py`` (falls back to pyproject.toml, then "0.0.0")."""
    for name, pat in (("comfyui_version.py", r"__version__\s*=\s*[\"']([^\"']+)"),
                      ("pyproject.toml", r"(?m)^version\s*=\s*[\"']([^\"']+)")):
        f = root / name
        if f.is_file():
            m = re.search(pat, f.read_text(encoding="utf-8", errors="replace"))
            if m:
                return m.group(1)
    return "0.0.0"


def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def comfy_infers_flux_width(root: Path) -> bool:
    """True when this ComfyUI reads the FLUX width from ``img_in.weight`` (and derives num_heads
    as hidden // sum(axes_dim) = hidden // 128); older versions hard-code hidden 3072 / 24 heads."""
    src = (root / "comfy" / "model_detection.py").read_text(encoding="utf-8", errors="replace")
    return ('dit_config["hidden_size"] = w.shape[0]' in src
            and 'dit_config["num_heads"] = dit_config["hidden_size"] // sum(dit_config["axes_dim"])' in src)


#: Narrow test transformer (~6 M params) for versions that infer the width; head_dim stays 128
#: because ComfyUI derives num_heads = hidden // sum(axes_dim) with axes_dim (16, 56, 56).
TINY_FLUX = FluxConfig(hidden_size=256, num_heads=2, depth=2, depth_single_blocks=2)
#: Full-width, two-block test transformer (~0.56 G params, 1.1 GB bf16) for versions that
#: hard-code hidden_size 3072 / num_heads 24 / context_in_dim 4096.
SHALLOW_FLUX = FluxConfig(hidden_size=3072, num_heads=24, depth=1, depth_single_blocks=1)


def flux_test_config(root: Path) -> FluxConfig:
    """The smallest FLUX transformer config the ComfyUI at ``root`` accepts.

    ``KLV_TEST_FLUX=shallow`` forces the full-width config on every version.
    """
    if os.environ.get("KLV_TEST_FLUX", "").lower() in ("shallow", "full"):
        return SHALLOW_FLUX
    return TINY_FLUX if comfy_infers_flux_width(root) else SHALLOW_FLUX


# --------------------------------------------------------------------------------------------
# Fixture files
# --------------------------------------------------------------------------------------------

TEST_NODES_SOURCE = '''\
"""Test-only ComfyUI nodes written by kontext_lowvram's integration harness (not part of the pack)."""
import torch


class KLVTestConditioning:
    """FLUX-shaped CONDITIONING from a seed: T5-like [1, tokens, 4096] + CLIP-like pooled [1, 768]."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
                "tokens": ("INT", {"default": 8, "min": 1, "max": 4096}),
            },
            "optional": {
                # ignored; changing it defeats ComfyUI's execution cache for everything downstream
                "nonce": ("INT", {"default": 0, "min": 0, "max": 0x7FFFFFFF}),
            },
        }

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "build"
    CATEGORY = "testing/kontext_lowvram"

    def build(self, seed, tokens, nonce=0):
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        cond = torch.randn(1, int(tokens), 4096, generator=g, dtype=torch.float32)
        pooled = torch.randn(1, 768, generator=g, dtype=torch.float32)
        return ([[cond, {"pooled_output": pooled}]],)


class KLVSaveImageTensor:
    """Saves an IMAGE as float32 safetensors (key ``image``) in the output folder: PNG's 8 bits hide small errors."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",),
                             "filename_prefix": ("STRING", {"default": "klv_tensors/image"})}}

    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "testing/kontext_lowvram"

    def save(self, images, filename_prefix="klv_tensors/image"):
        import os

        import folder_paths
        from safetensors.torch import save_file

        out_dir = folder_paths.get_output_directory()
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
        file = f"{name}_{counter:05}_.safetensors"
        save_file({"image": images.detach().to("cpu", torch.float32).contiguous()}, os.path.join(folder, file))
        return {"ui": {"tensors": [{"filename": file, "subfolder": subfolder, "type": "output"}]}}


NODE_CLASS_MAPPINGS = {"KLVTestConditioning": KLVTestConditioning, "KLVSaveImageTensor": KLVSaveImageTensor}
NODE_DISPLAY_NAME_MAPPINGS = {"KLVTestConditioning": "KLV Test Conditioning (random)",
                              "KLVSaveImageTensor": "KLV Save Image Tensor (float32 safetensors)"}
'''


def write_test_nodes(custom_nodes_dir: Path) -> Path:
    path = Path(custom_nodes_dir) / TEST_NODES_FILE
    path.write_text(TEST_NODES_SOURCE, encoding="utf-8")
    return path


def write_input_image(path: Path, size: int = 128, seed: int = 0) -> Path:
    """An RGB gradient with a little noise (deterministic)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    img = np.stack([x, y, 1.0 - 0.5 * (x + y)], axis=-1) * 255.0
    img += rng.normal(0.0, 12.0, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").save(path)
    return Path(path)


def save_safetensors(sd: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def write_flux_vae(path: Path, seed: int = 0) -> Path:
    return save_safetensors(random_flux_vae_state_dict(seed=seed), path)


def write_flux_transformer(path: Path, cfg: FluxConfig, seed: int = 0, dtype=torch.bfloat16) -> Path:
    """A random FLUX transformer in the BFL/ComfyUI key layout (no prefix), as a .safetensors."""
    return save_safetensors(random_flux_state_dict(cfg, seed=seed, dtype=dtype, std=init_std(cfg)), path)


def init_std(cfg: FluxConfig) -> float:
    """~1.2/sqrt(width), as trained FLUX weights are: at 0.02 a 256-wide test model's blocks would barely touch the
    output (0.3 %), and a quantization or LoRA error could hide there."""
    return 1.2 / cfg.hidden_size ** 0.5


def flux_lora_state_dict(cfg: FluxConfig, rank: int = 4, seed: int = 0, std: float = 0.1,
                         targets: Iterable[str] = ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "img_mlp.0",
                                                   "linear1", "linear2"),
                         dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A random kohya-format FLUX LoRA (``lora_unet_<module_with_underscores>.lora_{up,down}.weight``
    + ``.alpha``), which every ComfyUI version maps onto ``diffusion_model.<module>.weight``.
    ``targets`` are suffixes of 2-D weight names (without ``.weight``)."""
    from kontext_lowvram.loaders.flux_layout import flux_tensor_shapes

    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    targets = tuple(targets)
    out: dict[str, torch.Tensor] = {}
    for key, shape in flux_tensor_shapes(cfg).items():
        if len(shape) != 2 or not key.endswith(".weight"):
            continue
        module = key[: -len(".weight")]
        if not any(module.endswith(t) for t in targets):
            continue
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.lora_down.weight"] = torch.randn(rank, shape[1], generator=gen).mul_(std).to(dtype)
        out[f"{name}.lora_up.weight"] = torch.randn(shape[0], rank, generator=gen).mul_(std).to(dtype)
        out[f"{name}.alpha"] = torch.tensor(float(rank)).to(dtype)
    if not out:
        raise ValueError(f"no FLUX weight matches LoRA targets {targets}")
    return out


def write_flux_lora(path: Path, cfg: FluxConfig, **kw) -> Path:
    return save_safetensors(flux_lora_state_dict(cfg, **kw), path)


def load_saved_latent(path: str | os.PathLike) -> torch.Tensor:
    """The tensor a SaveLatent node wrote (safetensors ``.latent`` file, key ``latent_tensor``)."""
    from safetensors.torch import load_file

    return load_file(str(path))["latent_tensor"]


# --------------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------------

class ComfyError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A ComfyUI server subprocess on a temporary base directory."""

    def __init__(self, root: Path, base_dir: Path | None = None, *, python: str = sys.executable,
                 extra_args: Iterable[str] = (), link_pack: bool = True):
        self.root = Path(root).resolve()
        self.version = comfy_version(self.root)
        self.version_tuple = version_tuple(self.version)
        self._own_base = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="klv_comfy_")).resolve()
        self.python = python
        self.extra_args = list(extra_args)
        self.port = None
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base_dir / "server.log"
        self._log_file = None
        self.client_id = uuid.uuid4().hex
        self.last_run_seconds = None
        self.last_entry: dict | None = None
        self.last_cached_nodes: set[str] = set()
        self._prepare(link_pack)

    # ---- layout ----------------------------------------------------------------------------
    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def custom_nodes_dir(self) -> Path:
        return self.base_dir / "custom_nodes"

    def _prepare(self, link_pack: bool) -> None:
        for d in ("custom_nodes", "input", "output", "temp", "user",
                  "models/diffusion_models", "models/vae", "models/loras", "models/text_encoders",
                  "models/checkpoints", "models/unet"):
            (self.base_dir / d).mkdir(parents=True, exist_ok=True)
        if link_pack:
            link = self.custom_nodes_dir / PACK_DIR_NAME
            if not link.exists():
                link.symlink_to(REPO_ROOT, target_is_directory=True)
        write_test_nodes(self.custom_nodes_dir)
        write_input_image(self.input_dir / INPUT_IMAGE)
        write_flux_vae(self.models_dir / "vae" / VAE_NAME)

    # ---- process ---------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> "ComfyServer":
        self.port = free_port()
        db = self.base_dir / "user" / "comfyui.db"
        cmd = [self.python, str(self.root / "main.py"), *SERVER_FLAGS,
               "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base_dir),
               "--database-url", f"sqlite:///{db}",  # default lives in <checkout>/user/
               *self.extra_args]
        env = dict(os.environ)
        env.update({
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "DO_NOT_TRACK": "1",
            "TQDM_DISABLE": "1",
        })
        env.pop("COMFYUI_PATH", None)
        self._log_file = open(self.log_path, "ab", buffering=0)
        # cwd = base dir: v0.29 writes comfyui_detail.log into the working directory
        self.proc = subprocess.Popen(cmd, cwd=str(self.base_dir), env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        atexit.register(self.stop)  # never leave a server behind, even if pytest dies
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI exited with code {self.proc.returncode} during startup\n"
                                 f"{self.log_tail()}")
            try:
                self.get_json("/object_info/KSampler", timeout=5)
                return
            except (urllib.error.URLError, ConnectionError, OSError, ValueError) as e:
                last = e
                time.sleep(0.5)
        raise ComfyError(f"ComfyUI did not answer GET /object_info within {timeout:.0f}s ({last})\n"
                         f"{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def cleanup(self) -> None:
        self.stop()
        if self._own_base and os.environ.get("KLV_KEEP_COMFY_BASE", "") in ("", "0"):
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.cleanup()

    def log_tail(self, n: int = 60) -> str:
        try:
            with open(self.log_path, "r", encoding="utf-8", errors="replace") as f:
                lines = deque(f, maxlen=n)
        except OSError:
            return "(no server log)"
        return "---- ComfyUI log (tail) ----\n" + "".join(lines)

    def custom_node_import_failed(self, name: str = PACK_DIR_NAME) -> bool:
        """Whether ComfyUI logged ``(IMPORT FAILED)`` for a custom node whose path contains ``name``
        (it keeps running without that node pack)."""
        return any("IMPORT FAILED" in line and name in line for line in self.log_text().splitlines())

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    # ---- HTTP ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _request(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def get_json(self, path: str, timeout: float = 30.0) -> Any:
        return self._request("GET", path, timeout=timeout)

    def post_json(self, path: str, body: Any, timeout: float = 30.0) -> Any:
        return self._request("POST", path, body, timeout=timeout)

    def object_info(self, node_class: str | None = None) -> dict:
        """``GET /object_info`` (all nodes) or ``/object_info/<class>`` ({} if unknown)."""
        if node_class is None:
            return self.get_json("/object_info", timeout=120)
        return self.get_json(f"/object_info/{node_class}")

    def has_node(self, node_class: str) -> bool:
        return node_class in self.object_info(node_class)

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        self.post_json("/free", {"unload_models": unload_models, "free_memory": free_memory})

    # ---- prompts ---------------------------------------------------------------------------
    def submit(self, prompt: dict) -> str:
        body = {"prompt": prompt, "client_id": self.client_id}
        try:
            res = self.post_json("/prompt", body)
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", errors="replace")
            raise ComfyError(f"POST /prompt rejected ({e.code}): {_pretty_validation(detail)}\n"
                             f"{self.log_tail(30)}") from None
        if res.get("node_errors"):
            raise ComfyError(f"prompt has node errors: {json.dumps(res['node_errors'], indent=1)}")
        return res["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """The ``/history`` entry of a finished prompt; raises ComfyError if it failed."""
        deadline = time.monotonic() + timeout
        delay = 0.1
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI died (exit {self.proc.returncode}) while running {prompt_id}\n"
                                 f"{self.log_tail()}")
            hist = self.get_json(f"/history/{prompt_id}")
            entry = hist.get(prompt_id) if hist else None
            if entry is not None:
                status = entry.get("status") or {}
                if status.get("status_str") == "error" or status.get("completed") is False:
                    raise ComfyError(f"prompt {prompt_id} failed: {_execution_error(status)}\n{self.log_tail()}")
                return entry
            if time.monotonic() > deadline:
                raise ComfyError(f"prompt {prompt_id} did not finish within {timeout:.0f}s\n{self.log_tail()}")
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        """Submit an API-format prompt, wait for it, return ``history[id]["outputs"]``
        ({node_id: {"images": [...], "latents": [...], ...}})."""
        t0 = time.monotonic()
        entry = self.wait(self.submit(prompt), timeout)
        self.last_run_seconds = time.monotonic() - t0
        self.last_entry = entry
        self.last_cached_nodes = _cached_nodes(entry.get("status") or {})
        return entry.get("outputs", {})

    # ---- outputs ---------------------------------------------------------------------------
    def output_file(self, info: dict) -> Path:
        """Path of one ``{"filename", "subfolder", "type"}`` record from a history output."""
        folder = {"output": self.output_dir, "temp": self.base_dir / "temp",
                  "input": self.input_dir}[info.get("type", "output")]
        return folder / info.get("subfolder", "") / info["filename"]

    def output_files(self, outputs: dict, node_id: str, kind: str | None = None) -> list[Path]:
        """Files a SaveImage ("images") / SaveLatent ("latents") node wrote in a run."""
        node_out = outputs.get(node_id) or {}
        kinds = [kind] if kind else [k for k in ("images", "latents") if k in node_out]
        return [self.output_file(i) for k in kinds for i in node_out.get(k, [])]

    def saved_latent(self, outputs: dict, node_id: str = "save_latent") -> torch.Tensor:
        files = self.output_files(outputs, node_id, "latents")
        if len(files) != 1:
            raise ComfyError(f"expected one latent from node {node_id!r}, got {files} in {outputs.get(node_id)}")
        return load_saved_latent(files[0])

    def saved_images(self, outputs: dict, node_id: str = "save_image") -> list[Path]:
        return self.output_files(outputs, node_id, "images")

    def saved_image_tensor(self, outputs: dict, node_id: str) -> torch.Tensor:
        """The float32 IMAGE ``[B, H, W, C]`` a ``KLVSaveImageTensor`` node wrote in a run."""
        from safetensors.torch import load_file

        files = [self.output_file(i) for i in (outputs.get(node_id) or {}).get("tensors", [])]
        if len(files) != 1:
            raise ComfyError(f"expected one tensor file from node {node_id!r}, got {outputs.get(node_id)}")
        return load_file(str(files[0]))["image"]


def _pretty_validation(detail: str) -> str:
    try:
        d = json.loads(detail)
    except ValueError:
        return detail[:4000]
    parts = []
    err = d.get("error")
    if isinstance(err, dict):
        parts.append(f"{err.get('type')}: {err.get('message')} {err.get('details', '')}".strip())
    for nid, ne in (d.get("node_errors") or {}).items():
        for e in ne.get("errors", []):
            parts.append(f"node {nid} ({ne.get('class_type')}): {e.get('message')} {e.get('details', '')}".strip())
    return "\n".join(parts) or detail[:4000]


def _cached_nodes(status: dict) -> set[str]:
    for msg in status.get("messages") or []:
        if isinstance(msg, (list, tuple)) and len(msg) == 2 and msg[0] == "execution_cached":
            return set(msg[1].get("nodes") or [])
    return set()


def _execution_error(status: dict) -> str:
    for msg in status.get("messages") or []:
        if isinstance(msg, (list, tuple)) and len(msg) == 2 and msg[0] == "execution_error":
            d = msg[1]
            tb = "".join(d.get("traceback") or [])
            return (f"node {d.get('node_id')} ({d.get('node_type')}): "
                    f"{d.get('exception_type')}: {d.get('exception_message')}\n{tb}")
    return json.dumps(status)[:4000]


# --------------------------------------------------------------------------------------------
# Graphs
# --------------------------------------------------------------------------------------------

def node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def kontext_edit_graph(
    model_node: dict,
    *,
    width: int = 128,
    height: int = 128,
    steps: int = 2,
    seed: int = 0,
    cond_seed: int = 1,
    tokens: int = 8,
    guidance: float = 2.5,
    lora: dict | str | None = None,
    kontext_scale: bool = False,
    latent_from_image: bool = False,
    prefix: str = "klv",
    nonce: int = 0,
    model_output: int = 0,
    extra_nodes: dict | None = None,
) -> dict:
    """API-format FLUX Kontext edit prompt around the caller's model loader node.

    ``model`` (caller's loader) -> [``lora``: LoraLoaderModelOnly] -> KSampler;
    LoadImage(klv_input.png) -> ImageScale(width x height, or FluxKontextImageScale if
    ``kontext_scale``) -> VAEEncode(VAELoader klv_flux_vae) -> ReferenceLatent(KLVTestConditioning)
    -> FluxGuidance -> KSampler(euler/simple, cfg 1, negative = a 2nd KLVTestConditioning,
    latent = EmptySD3LatentImage or the encoded image at denoise 1.0) -> VAEDecode -> SaveImage
    ("save_image"); SaveLatent ("save_latent") of the sampler output.

    ``lora``: a file name in models/loras or ``{"lora_name": ..., "strength_model": ..., "class_type": ...}``
    (class_type defaults to core's LoraLoaderModelOnly).
    ``nonce`` changes nothing numerically but forces re-execution past ComfyUI's cache.
    ``extra_nodes`` are merged in last (may override any node by id).
    """
    g: dict[str, dict] = {
        "model": model_node,
        "vae": node("VAELoader", vae_name=VAE_NAME),
        "load_image": node("LoadImage", image=INPUT_IMAGE),
    }
    if kontext_scale:
        g["scale"] = node("FluxKontextImageScale", image=["load_image", 0])
    else:
        g["scale"] = node("ImageScale", image=["load_image", 0], upscale_method="bilinear",
                          width=width, height=height, crop="disabled")
    g["encode"] = node("VAEEncode", pixels=["scale", 0], vae=["vae", 0])
    g["positive"] = node("KLVTestConditioning", seed=cond_seed, tokens=tokens, nonce=nonce)
    g["negative"] = node("KLVTestConditioning", seed=cond_seed + 1, tokens=tokens, nonce=nonce)
    g["reference"] = node("ReferenceLatent", conditioning=["positive", 0], latent=["encode", 0])
    g["guidance"] = node("FluxGuidance", conditioning=["reference", 0], guidance=guidance)
    model_ref: list = ["model", model_output]
    if lora is not None:
        spec = {"lora_name": lora} if isinstance(lora, str) else dict(lora)
        spec.setdefault("strength_model", 1.0)
        g["lora"] = node(spec.pop("class_type", "LoraLoaderModelOnly"), model=model_ref, **spec)
        model_ref = ["lora", 0]
    if latent_from_image:
        latent_ref = ["encode", 0]
    else:
        g["empty_latent"] = node("EmptySD3LatentImage", width=width, height=height, batch_size=1)
        latent_ref = ["empty_latent", 0]
    g["sampler"] = node("KSampler", model=model_ref, seed=seed, steps=steps, cfg=1.0,
                        sampler_name="euler", scheduler="simple", positive=["guidance", 0],
                        negative=["negative", 0], latent_image=latent_ref, denoise=1.0)
    g["decode"] = node("VAEDecode", samples=["sampler", 0], vae=["vae", 0])
    g["save_image"] = node("SaveImage", images=["decode", 0], filename_prefix=f"{prefix}/img")
    g["save_latent"] = node("SaveLatent", samples=["sampler", 0], filename_prefix=f"{prefix}/latent")
    if extra_nodes:
        g.update(extra_nodes)
    return g


def unet_loader_node(unet_name: str, weight_dtype: str = "default") -> dict:
    """Core ``UNETLoader`` ("Load Diffusion Model") for a file in models/diffusion_models."""
    return node("UNETLoader", unet_name=unet_name, weight_dtype=weight_dtype)


@dataclass
class FluxModelFile:
    name: str          # file name as the loaders list it
    path: Path
    cfg: FluxConfig
    seed: int
