"""LowVRAMTextEncoderLoader / LowVRAMTextEncode: FLUX text encoders that leave VRAM, plus an on-disk cache.

The loader returns a *lazy* CLIP: a real `comfy.sd.CLIP` subclass whose weights are read on first use. Any core
node taking CLIP (CLIPTextEncodeFlux, CLIPTextEncode, LoRA loaders, ...) materializes it on its first call. Our
encode node first looks the prompt up in the on-disk cache and, on a hit, never touches the files. comfy.* is
imported inside functions only.
"""
import functools
import inspect
import logging
import os
import re
import sys

from ..loaders.errors import printable
from ..loaders.text_encoders import pair_by_kind, pick_device_policy, read_text_encoder, t5_config_overrides
from ..optimizations.cond_cache import CondCache, file_identity, make_key
from .model_files import find_file, list_files

log = logging.getLogger("kontext_lowvram")

DEVICE_POLICIES = ("auto", "gpu_then_release", "cpu")
EXTENSIONS = (".safetensors", ".sft", ".gguf")
FOLDER = "text_encoders"  # ComfyUI maps models/text_encoders and the legacy models/clip here
CACHE_SUBDIR = os.path.join("kontext_lowvram", "cond_cache")
DEFAULT_CACHE_MB = 2048
# comfy.model_patcher functions that probe node outputs for models (PromptModelTracker.add, is_model_patcher_output)
_BOOKKEEPING = ("add", "is_model_patcher_output")


def text_encoder_files():
    return list_files((FOLDER,), EXTENSIONS)


def text_encoder_path(name):
    return find_file((FOLDER,), name, "models/text_encoders (or models/clip)")


def cache_directory():
    import folder_paths
    return os.path.join(folder_paths.get_user_directory(), CACHE_SUBDIR)


def _cache_location_text():
    try:
        return cache_directory()
    except Exception:  # outside ComfyUI (tests of the declarations)
        return os.path.join("ComfyUI", "user", CACHE_SUBDIR)


def encoder_settings():
    """What besides weights and prompts decides the tensors: ComfyUI's tokenizers and encoder code version."""
    try:
        from comfyui_version import __version__ as comfy_version
    except ImportError:
        comfy_version = "unknown"
    return {"clip_type": "flux", "comfyui": comfy_version}


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
    for p in paths:
        sd, info = read_text_encoder(p, keep_quantized=True)
        sds.append(sd)
        infos.append(info)
    pair_by_kind(infos, paths)
    policy = pick_device_policy(device_policy, _gpu_bytes_available(mm), sum(i["file_bytes"] for i in infos))
    log.info("Kontext LowVRAM text encoder: loading %s (device %s -> %s)",
             " + ".join(os.path.basename(p) for p in paths), device_policy, policy)
    cpu = torch.device("cpu")
    options = {"load_device": cpu if policy == "cpu" else mm.get_torch_device(), "offload_device": cpu}
    if any(i["quantized_tensors"] for i in infos):
        from ..optimizations.ops import make_comfy_ops
        options["custom_operations"] = make_comfy_ops()
    t5 = next(i for i in infos if i["kind"] == "t5")
    overrides = t5_config_overrides(t5["t5_config"])
    if overrides:  # ComfyUI builds T5-XXL from a fixed config; anything else needs its real sizes
        log.warning("Kontext LowVRAM text encoder: %s is not T5-XXL (%s); FLUX expects T5-XXL conditioning",
                    os.path.basename(t5["file"]), overrides)
        options["t5xxl_model_config"] = overrides
    kwargs = {}
    if "disable_dynamic" in inspect.signature(comfy.sd.load_text_encoder_state_dicts).parameters:  # v0.29
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
            if _asked_by_bookkeeping(sys._getframe(1)):
                if name == "patcher":
                    return None
                raise AttributeError(name)
            self.klv_materialize()
            try:
                return self.__dict__[name]
            except KeyError:
                raise AttributeError(name) from None

        if hasattr(CLIP, "is_dynamic"):  # v0.29 cache bookkeeping asks; an unloaded handle holds no memory
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


DEVICE_TOOLTIP = ("Where the text encoders run. gpu_then_release: encode on the GPU, then give the encoders' VRAM back "
                  "before sampling. cpu: encode on the CPU, never touching VRAM (slower, T5-XXL takes seconds). auto: "
                  "gpu_then_release when the VRAM ComfyUI can free holds the encoder files plus 1 GB, else cpu.")


class LowVRAMTextEncoderLoader:
    DESCRIPTION = ("Loads FLUX's two text encoders, CLIP-L and T5-XXL, from safetensors (bf16/fp16, fp8, scaled fp8) "
                   "or GGUF (city96's llama.cpp-named T5 files or ComfyUI naming). The weights are read only when "
                   "needed: with 'Text Encode (cached)' a cached prompt never loads them. Quantized T5 weights stay "
                   "quantized in memory.")
    CATEGORY = "Kontext LowVRAM/loaders"
    RETURN_TYPES = ("CLIP",)
    RETURN_NAMES = ("clip",)
    OUTPUT_TOOLTIPS = ("An ordinary ComfyUI CLIP that loads its weights on first use: core nodes (CLIPTextEncodeFlux, "
                       "LoRA loaders, ...) take it as is.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        files = text_encoder_files()
        return {"required": {
            "clip_l_name": (files, {"tooltip": "The CLIP-L file (e.g. clip_l.safetensors) from models/text_encoders "
                                               "or models/clip. The two inputs may be given in either order."}),
            "t5xxl_name": (files, {"tooltip": "The T5-XXL file: t5xxl_fp16 / fp8_e4m3fn / fp8 scaled .safetensors or "
                                              "a T5 .gguf (Q8_0 is near-lossless, Q4/Q5 save more RAM)."}),
            "device": (list(DEVICE_POLICIES), {"default": "auto", "tooltip": DEVICE_TOOLTIP}),
        }}

    @classmethod
    def IS_CHANGED(cls, clip_l_name, t5xxl_name, device="auto"):
        """A file replaced under the same name must give a new handle (new weights, new cache identity)."""
        try:
            return str([file_identity(text_encoder_path(n)) for n in (clip_l_name, t5xxl_name)])
        except (OSError, FileNotFoundError):
            return ""

    def load(self, clip_l_name, t5xxl_name, device="auto"):
        paths = [text_encoder_path(clip_l_name), text_encoder_path(t5xxl_name)]
        return (lazy_clip_class()(paths, device),)


def _with_guidance(conditioning, guidance):
    return [[c, {**d, "guidance": guidance}] for c, d in conditioning]


_SURROGATE = re.compile("[\ud800-\udfff]")


def well_formed_prompt(text, field):
    """`text` with lone surrogates (half of a UTF-16 pair, e.g. from a JSON "\\ud83d" whose other half was cut off)
    replaced by U+FFFD. ComfyUI's tokenizers (HF `tokenizers`) fail on them with a bare "TextEncodeInput must be
    Union[...]" TypeError, also in core's CLIPTextEncodeFlux. The half character stands for no text, so the prompt is
    encoded with the replacement character every UTF-8 decoder shows, and the log names the field."""
    if not isinstance(text, str) or not _SURROGATE.search(text):
        return text
    # through UTF-16: a complete pair stored as two code points becomes its character, a lone half U+FFFD
    fixed = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    lone = fixed.count("\ufffd") - text.count("\ufffd")
    if lone:
        log.warning("Kontext LowVRAM text encode: the %s prompt holds %d invalid character(s) (lone UTF-16 "
                    "surrogates); encoded with U+FFFD in their place", field, lone)
    return fixed


def _cache_failed(what, e):
    log.warning("Kontext LowVRAM conditioning cache: skipped, %s failed (%s: %s)", what, type(e).__name__,
                printable(str(e)))


class LowVRAMTextEncode:
    DESCRIPTION = ("FLUX / Kontext text encode with guidance (like CLIPTextEncodeFlux) and an on-disk cache: the "
                   "conditioning of a prompt is kept under ComfyUI's user folder, so repeating a prompt — even after a "
                   "restart — skips the text encoders entirely (they are not even loaded). Cache folder: "
                   f"{_cache_location_text()} ; delete it to clear the cache.")
    CATEGORY = "Kontext LowVRAM/conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("FLUX conditioning: T5 hidden states, CLIP-L pooled output and guidance, as CLIPTextEncodeFlux "
                       "makes it.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        where = _cache_location_text()
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "Text encoders, best from 'Load Text Encoders (lazy)': only those can be "
                                             "cached. Another CLIP (or one changed by LoRA / CLIP Set Last Layer) is "
                                             "encoded every time."}),
                "clip_l": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                      "tooltip": "Prompt for CLIP-L (the pooled vector): a short summary works best."}),
                "t5xxl": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                     "tooltip": "Prompt for T5-XXL (the token sequence): the full instruction or description."}),
                "guidance": ("FLOAT", {"default": 2.5, "min": 0.0, "max": 100.0, "step": 0.1,
                                       "tooltip": "FLUX distilled guidance; 2.5 is usual for Kontext edits, 3.5 for "
                                                  "text-to-image. Changing it does not re-encode."}),
            },
            "optional": {
                "cache": ("BOOLEAN", {"default": True, "tooltip":
                          f"Read and write the on-disk conditioning cache in {where} . To clear it, delete that folder "
                          "(safe at any time, also while ComfyUI runs); off = always encode, store nothing."}),
                "cache_max_mb": ("INT", {"default": DEFAULT_CACHE_MB, "min": 1, "max": 1 << 20, "step": 64, "tooltip":
                                 f"Size cap of {where} in MiB; the least recently used prompts are deleted beyond it. "
                                 "One FLUX prompt takes ~4-8 MB."}),
            },
        }

    def encode(self, clip, clip_l, t5xxl, guidance, cache=True, cache_max_mb=DEFAULT_CACHE_MB):
        clip_l, t5xxl = well_formed_prompt(clip_l, "clip_l"), well_formed_prompt(t5xxl, "t5xxl")
        identity = getattr(clip, "klv_cache_identity", None)
        store = key = None
        if cache and identity is not None:
            # CondCache handles file-system trouble itself; this guard is the promise that the cache, an
            # optimization, never fails a prompt whatever else goes wrong in it
            try:
                store = CondCache(cache_directory(), int(cache_max_mb) * 2 ** 20)
                key = make_key(identity, {"clip_l": clip_l, "t5xxl": t5xxl}, encoder_settings())
                hit = store.get(key)
            except Exception as e:
                _cache_failed("lookup", e)
                store = hit = None
            if hit is not None:
                log.info("Kontext LowVRAM conditioning cache: hit %s", key[:16])
                return (_with_guidance(hit, guidance),)
            if store is not None:
                log.info("Kontext LowVRAM conditioning cache: miss %s", key[:16])
        elif cache:
            log.info("Kontext LowVRAM conditioning cache: not used (this CLIP is not straight from the lazy loader)")
        tokens = clip.tokenize(clip_l)
        tokens["t5xxl"] = clip.tokenize(t5xxl)["t5xxl"]
        cond = clip.encode_from_tokens_scheduled(tokens, add_dict={"guidance": guidance})
        if store is not None:
            try:
                store.put(key, [[c, {k: v for k, v in d.items() if k != "guidance"}] for c, d in cond])
            except Exception as e:
                _cache_failed("store", e)
        return (cond,)
