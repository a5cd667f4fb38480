"""LowVRAMTextEncoderLoader / LowVRAMTextEncode: FLUX text encoders that leave VRAM, plus an on-disk cache.

The loader returns a lazy CLIP (host/clip.py) that reads its weights on first use; the encode node looks the prompt
up in the conditioning cache first (host/conditioning.py) and, on a hit, never touches the files.
"""
from ..host import clip as lazy_clip
from ..host import conditioning, files

DEVICE_POLICIES = ("auto", "gpu_then_release", "cpu")
DEFAULT_CACHE_MB = 2048

DEVICE_TOOLTIP = ("Where the text encoders run. gpu_then_release: encode on the GPU, then give the encoders' VRAM back "
                  "before sampling. cpu: encode on the CPU, never touching VRAM (slower, T5-XXL takes seconds). auto: "
                  "gpu_then_release when the VRAM ComfyUI can free holds the encoder files plus 1 GB, else cpu.")


class LowVRAMTextEncoderLoader:
    DISPLAY_NAME = "Load Text Encoders (lazy, GGUF/FP8) · Kontext LowVRAM"
    SEARCH_ALIASES = ["dual clip loader", "t5", "clip loader gguf"]
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
        names = files.text_encoder_files()
        return {"required": {
            "clip_l_name": (names, {"tooltip": "The CLIP-L file (e.g. clip_l.safetensors) from models/text_encoders "
                                               "or models/clip. The two inputs may be given in either order."}),
            "t5xxl_name": (names, {"tooltip": "The T5-XXL file: t5xxl_fp16 / fp8_e4m3fn / fp8 scaled .safetensors or "
                                              "a T5 .gguf (Q8_0 is near-lossless, Q4/Q5 save more RAM)."}),
            "device": (list(DEVICE_POLICIES), {"default": "auto", "tooltip": DEVICE_TOOLTIP}),
        }}

    @classmethod
    def IS_CHANGED(cls, clip_l_name, t5xxl_name, device="auto"):
        """A file replaced under the same name must give a new handle (new weights, new cache identity)."""
        return lazy_clip.files_fingerprint(clip_l_name, t5xxl_name)

    def load(self, clip_l_name, t5xxl_name, device="auto"):
        return (lazy_clip.load(clip_l_name, t5xxl_name, device),)


def cache_inputs(prompt_size: str) -> dict:
    """The cached encodes' two optional inputs (FLUX.1's and FLUX.2's); `prompt_size` says what one entry takes."""
    where = conditioning.cache_location_text()
    return {
        "cache": ("BOOLEAN", {"default": True, "tooltip":
                  f"Read and write the on-disk conditioning cache in {where} . To clear it, delete that folder "
                  "(safe at any time, also while ComfyUI runs); off = always encode, store nothing."}),
        "cache_max_mb": ("INT", {"default": DEFAULT_CACHE_MB, "min": 1, "max": 1 << 20, "step": 64, "advanced": True,
                                 "tooltip": f"Size cap of {where} in MiB; the least recently used prompts are deleted "
                                            f"beyond it. {prompt_size}"}),
    }


class LowVRAMTextEncode:
    DISPLAY_NAME = "Text Encode FLUX (cached) · Kontext LowVRAM"
    SEARCH_ALIASES = ["clip text encode flux", "cached"]
    DESCRIPTION = ("FLUX / Kontext text encode with guidance (like CLIPTextEncodeFlux) and an on-disk cache: the "
                   "conditioning of a prompt is kept under ComfyUI's user folder, so repeating a prompt — even after a "
                   "restart — skips the text encoders entirely (they are not even loaded). Cache folder: "
                   f"{conditioning.cache_location_text()} ; delete it to clear the cache.")
    CATEGORY = "Kontext LowVRAM/conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("FLUX conditioning: T5 hidden states, CLIP-L pooled output and guidance, as CLIPTextEncodeFlux "
                       "makes it.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
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
            "optional": cache_inputs("One FLUX prompt takes ~4-8 MB."),
        }

    def encode(self, clip, clip_l, t5xxl, guidance, cache=True, cache_max_mb=DEFAULT_CACHE_MB):
        return (conditioning.encode(clip, clip_l, t5xxl, guidance, cache, cache_max_mb),)
