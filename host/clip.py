"""Our lazy CLIP: FLUX's two text encoders as a real `comfy.sd.CLIP` subclass whose weights are read on first use,
and leave VRAM after each encode where the device policy says so.

Any core node taking CLIP (CLIPTextEncodeFlux, CLIPTextEncode, LoRA loaders, ...) materializes it on its first
call; our cached encode (conditioning.py) first looks the prompt up and, on a hit, never touches the files.
"""
import functools
import logging
import os
import sys

from ..loaders import load_summary
from ..loaders.text_encoders import pair_by_kind, pick_device_policy, read_text_encoder, t5_config_overrides
from ..optimizations.cond_cache import file_identity
from . import compat, files

log = logging.getLogger("kontext_lowvram")

# comfy.model_patcher functions that probe node outputs for models (PromptModelTracker.add, is_model_patcher_output)
_BOOKKEEPING = ("add", "is_model_patcher_output")


def encoder_paths(clip_l_name, t5xxl_name):
    return [files.text_encoder_path(n) for n in (clip_l_name, t5xxl_name)]


def files_fingerprint(clip_l_name, t5xxl_name):
    """Changes when a file is replaced under the same name, which must give a new handle (new weights, new cache
    identity); "" when a file is missing (loading it then says so)."""
    try:
        return str([file_identity(p) for p in encoder_paths(clip_l_name, t5xxl_name)])
    except (OSError, FileNotFoundError):
        return ""


def load(clip_l_name, t5xxl_name, device_policy):
    """The lazy CLIP of these two files in models/text_encoders: nothing is read until it is used."""
    return lazy_clip_class()(encoder_paths(clip_l_name, t5xxl_name), device_policy)


def _gpu_bytes_available(mm):
    """VRAM the encoder could have: free now + what ComfyUI may unload (other models come back when needed)."""
    dev = mm.get_torch_device()
    if dev.type == "cpu":
        return None
    held = sum(lm.model_loaded_memory() for lm in mm.current_loaded_models if lm.device == dev and lm.model is not None)
    return mm.get_free_memory(dev) + held


def build_clip(paths, device_policy, disable_dynamic=False):
    """Read the two files and build an ordinary ComfyUI CLIP (FLUX type) -> (clip, resolved policy)."""
    import comfy.model_management as mm
    import comfy.sd
    import folder_paths
    import torch

    sds, infos = [], []
    from .sidecar import verify as verify_sidecar
    for p in paths:
        verify_sidecar(p)  # a <file>.sha256 beside it: checked once per file identity, on the progress bar
        sd, info = read_text_encoder(p, keep_quantized=True)
        sds.append(sd)
        infos.append(info)
    pair_by_kind(infos, paths)
    policy = pick_device_policy(device_policy, _gpu_bytes_available(mm), sum(i["file_bytes"] for i in infos))
    log.info("Kontext LowVRAM text encoder: loading %s (device %s -> %s)",
             " + ".join(load_summary(sd, i) for sd, i in zip(sds, infos)), device_policy, policy)
    cpu = torch.device("cpu")
    options = {"load_device": cpu if policy == "cpu" else mm.get_torch_device(), "offload_device": cpu}
    if any(i["quantized_tensors"] for i in infos):
        from .ops import make_comfy_ops
        options["custom_operations"] = make_comfy_ops()
    t5 = next(i for i in infos if i["kind"] == "t5")
    overrides = t5_config_overrides(t5["t5_config"])
    if overrides:  # ComfyUI builds T5-XXL from a fixed config; anything else needs its real sizes
        log.warning("Kontext LowVRAM text encoder: %s is not T5-XXL (%s); FLUX expects T5-XXL conditioning",
                    os.path.basename(t5["file"]), overrides)
        options["t5xxl_model_config"] = overrides
    kwargs = {}
    if compat.text_encoder_loader_disables_dynamic():
        kwargs["disable_dynamic"] = disable_dynamic
    clip = comfy.sd.load_text_encoder_state_dicts(sds, embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                                  clip_type=comfy.sd.CLIPType.FLUX, model_options=options, **kwargs)
    # v0.29 rebuilds a non-dynamic copy of a dynamic patcher through this factory (e.g. for hooks)
    clip.patcher.cached_patcher_init = (_patcher_factory, (tuple(paths), device_policy))
    return clip, policy


def _patcher_factory(paths, device_policy, disable_dynamic=False):
    return build_clip(paths, device_policy, disable_dynamic)[0].patcher


def release_vram(patcher):
    """Unload exactly this patcher's model from its GPU (other loaded models stay) -> whether it was loaded."""
    import comfy.model_management as mm
    if patcher.load_device.type == "cpu":
        return False
    ours = [lm for lm in mm.current_loaded_models if lm.model is not None and lm.model.model is patcher.model]
    if not ours:
        return False
    others = [lm for lm in mm.current_loaded_models if all(lm is not o for o in ours)]
    mm.free_memory(1e30, patcher.load_device, keep_loaded=others)
    mm.soft_empty_cache()
    log.info("Kontext LowVRAM text encoder: released from %s", patcher.load_device)
    return True


def _asked_by_bookkeeping(frame) -> bool:
    """ComfyUI v0.29's executor probes every node output for `.patcher` / `.get_models` / `.is_dynamic` to track
    models; those probes must not read the weights. Anything else asking is a real use (fails safe: it loads)."""
    mod = frame.f_globals.get("__name__", "")
    return mod.startswith("comfy_execution") or (mod == "comfy.model_patcher" and frame.f_code.co_name in _BOOKKEEPING)


@functools.lru_cache(maxsize=None)
def lazy_clip_class():
    import comfy.sd
    CLIP = comfy.sd.CLIP

    class LazyCLIP(CLIP):
        """A comfy.sd.CLIP whose state (patcher, cond_stage_model, tokenizer, ...) is built on first access."""

        def __init__(self, paths, device_policy):
            CLIP.__init__(self, no_init=True)
            self.klv_paths = tuple(paths)
            self.klv_device_policy = device_policy
            self.klv_policy = None  # resolved when loaded
            # stat only; None on clones (they may carry LoRA patches or another layer: not this identity)
            self.klv_cache_identity = [file_identity(p) for p in self.klv_paths]

        @property
        def klv_loaded(self):
            return "patcher" in self.__dict__

        def klv_materialize(self):
            if not self.klv_loaded:
                clip, self.klv_policy = build_clip(self.klv_paths, self.klv_device_policy)
                self.__dict__.update(clip.__dict__)
            return self

        def __getattr__(self, name):  # only for attributes not set yet, i.e. the CLIP's own state
            if name.startswith("_") or name.startswith("klv_"):
                raise AttributeError(name)
            # who is asking decides: the frame of the caller is the one cheap way to tell the executor's
            # probes from a real use (see _asked_by_bookkeeping)
            if _asked_by_bookkeeping(sys._getframe(1)):
                if name == "patcher":
                    return None
                raise AttributeError(name)
            self.klv_materialize()
            try:
                return self.__dict__[name]
            except KeyError:
                raise AttributeError(name) from None

        if compat.clip_reports_dynamic():  # the executor's cache bookkeeping asks; an unloaded handle holds no memory
            def is_dynamic(self):
                return self.klv_loaded and CLIP.is_dynamic(self)

        def clone(self, *args, **kwargs):
            n = CLIP.clone(self, *args, **kwargs)
            n.__class__ = type(self)
            n.klv_paths, n.klv_device_policy, n.klv_policy = self.klv_paths, self.klv_device_policy, self.klv_policy
            n.klv_cache_identity = None
            return n

        def klv_release(self):
            if self.klv_loaded and self.klv_policy == "gpu_then_release":
                release_vram(self.patcher)

        def encode_from_tokens(self, *args, **kwargs):
            try:
                return CLIP.encode_from_tokens(self, *args, **kwargs)
            finally:
                self.klv_release()

        def encode_from_tokens_scheduled(self, *args, **kwargs):
            try:
                return CLIP.encode_from_tokens_scheduled(self, *args, **kwargs)
            finally:
                self.klv_release()

    return LazyCLIP
