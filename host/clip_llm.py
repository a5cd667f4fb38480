"""Our lazy CLIP for FLUX.2's LLM text encoders (Mistral-3 24B for [dev], Qwen3-4B / 8B for [klein]): the same
`comfy.sd.CLIP` subclass as FLUX.1's (host/clip.py: weights read on first use, device policy, VRAM released after
each encode), built from one file through core's own `load_text_encoder_state_dicts(..., CLIPType.FLUX2)`, so the
model class, tokenizer and chat template are core's. Sizes other than the standard ones (the tests' reduced models)
reach core as its `<model>_model_config` option.

The conditioning cache key (conditioning_llm.py) needs what the file is (model type, pruned) without reading
weights: `file_facts` reads the header once per file identity and remembers it for the process.
"""
import functools
import hashlib
import inspect
import logging
import os

from ..loaders import load_summary
from ..loaders.errors import ModelFileError
from ..loaders.text_encoders import pick_device_policy
from ..loaders.text_encoders_llm import llm_config_overrides, probe_llm_text_encoder, read_llm_text_encoder
from ..optimizations.cond_cache import file_identity
from . import compat, files
from .clip import _gpu_bytes_available, lazy_clip_class

log = logging.getLogger("kontext_lowvram")


def encoder_path(name):
    return files.text_encoder_path(name)


def files_fingerprint(name):
    try:
        return str(file_identity(encoder_path(name)))
    except (OSError, FileNotFoundError):
        return ""


def load(name, device_policy):
    """The lazy CLIP of this file in models/text_encoders: nothing but its size and mtime is read until it is used."""
    return lazy_llm_clip_class()([encoder_path(name)], device_policy)


def _flux2_clip_type(path):
    import comfy.sd
    t = getattr(comfy.sd.CLIPType, "FLUX2", None)
    if t is None:
        try:
            from comfyui_version import __version__ as v
        except ImportError:
            v = "this version"
        raise ModelFileError(path, f"is a FLUX.2 text encoder, which ComfyUI {v} cannot run (it predates FLUX.2)",
                             "update ComfyUI to v0.4 or later")
    return t


def build_llm_clip(path, device_policy, disable_dynamic=False):
    """Read the file and build an ordinary ComfyUI CLIP (FLUX2 type) -> (clip, resolved policy)."""
    import comfy.model_management as mm
    import comfy.sd
    import folder_paths
    import torch

    from .sidecar import verify as verify_sidecar
    clip_type = _flux2_clip_type(path)
    verify_sidecar(path)
    sd, info = read_llm_text_encoder(path, keep_quantized=True, verify=False)
    _remember(path, info)
    policy = pick_device_policy(device_policy, _gpu_bytes_available(mm), info["file_bytes"])
    log.info("Kontext LowVRAM text encoder: loading %s as %s%s (device %s -> %s)", load_summary(sd, info),
             info["model_type"], " pruned" if info["pruned"] else "", device_policy, policy)
    cpu = torch.device("cpu")
    options = {"load_device": cpu if policy == "cpu" else mm.get_torch_device(), "offload_device": cpu}
    if info["quantized_tensors"]:
        from .ops import make_comfy_ops
        options["custom_operations"] = make_comfy_ops()
    overrides = llm_config_overrides(info)
    if overrides:
        log.warning("Kontext LowVRAM text encoder: %s is not the standard size of its model (%s)",
                    os.path.basename(path), info["overrides"])
        options.update(overrides)
    kwargs = {}
    if compat.text_encoder_loader_disables_dynamic():
        kwargs["disable_dynamic"] = disable_dynamic
    clip = comfy.sd.load_text_encoder_state_dicts([sd], embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                                  clip_type=clip_type, model_options=options, **kwargs)
    clip.patcher.cached_patcher_init = (_patcher_factory, (path, device_policy))
    return clip, policy


def _patcher_factory(path, device_policy, disable_dynamic=False):
    return build_llm_clip(path, device_policy, disable_dynamic)[0].patcher


# ---- what a file is, without reading its weights (for the cache key) ----

_FACTS = {}  # json of file identity -> describe_llm facts


def _identity_key(path):
    return repr(sorted(file_identity(path).items()))


def _remember(path, info):
    facts = {k: info[k] for k in ("model_type", "pruned", "layers", "overrides")}
    try:
        _FACTS[_identity_key(path)] = facts
    except OSError:
        pass
    return facts


def file_facts(path):
    """{model_type, pruned, layers, overrides} of the file: remembered per file identity (name, size, mtime), else
    read from its header (tensor names and shapes only)."""
    key = _identity_key(path)
    hit = _FACTS.get(key)
    if hit is None:
        hit = _remember(path, probe_llm_text_encoder(path))
    return hit


@functools.lru_cache(maxsize=None)
def host_encoder_code(model_type):
    """A digest of core's code that turns a prompt into this encoder's conditioning: the tokenizer (chat template,
    special tokens, padding) and the model wrappers (layers read, how they are stacked); '' if unreadable."""
    try:
        import comfy.text_encoders.flux as f
        import comfy.text_encoders.llama as llama
        if model_type == "mistral3_24b":
            objs = [f.Mistral3Tokenizer, f.Flux2Tokenizer, f.Mistral3_24BModel, f.Flux2TEModel, f.flux2_te,
                    llama.Mistral3Small24BConfig]
        else:
            objs = [f.Qwen3Tokenizer, f.Qwen3Tokenizer8B, f.KleinTokenizer, f.KleinTokenizer8B, f.Qwen3_4BModel,
                    f.Qwen3_8BModel, f.Flux2TEModel, f.klein_te,
                    llama.Qwen3_4BConfig if model_type == "qwen3_4b" else llama.Qwen3_8BConfig]
        src = "\n".join(inspect.getsource(o) for o in objs)
    except Exception:  # a host without FLUX.2 or without sources: the ComfyUI version in the key still applies
        return ""
    return hashlib.sha256(src.encode("utf-8")).hexdigest()


@functools.lru_cache(maxsize=None)
def lazy_llm_clip_class():
    LazyCLIP = lazy_clip_class()

    class LazyLLMCLIP(LazyCLIP):
        """LazyCLIP of one FLUX.2 LLM text-encoder file."""
        klv_kind = "flux2_llm"

        def klv_materialize(self):
            if not self.klv_loaded:
                clip, self.klv_policy = build_llm_clip(self.klv_paths[0], self.klv_device_policy)
                self.__dict__.update(clip.__dict__)
            return self

    return LazyLLMCLIP
