"""LowVRAMLLMTextEncoderLoader / LowVRAMTextEncodeFlux2: FLUX.2's LLM text encoders (Mistral-3 24B for [dev],
Qwen3-4B / 8B for [klein]) loaded lazily with the same device policies as FLUX.1's, plus the on-disk cache.

The loader returns a lazy CLIP (host/clip_llm.py) that reads its weights on first use; the encode node is core's
CLIPTextEncode with the conditioning cache in front (host/conditioning_llm.py): a cached prompt never loads the file.
"""
from ..host import clip_llm, conditioning, conditioning_llm, files
from .text_encoder import DEFAULT_CACHE_MB, DEVICE_POLICIES, cache_inputs

DEVICE_TOOLTIP = ("Where the text encoder runs. gpu_then_release: encode on the GPU, then give its VRAM back before "
                  "sampling. cpu: encode on the CPU, never touching VRAM (slow: a 4-24 B LLM). auto: "
                  "gpu_then_release when the VRAM ComfyUI can free holds the file plus 1 GB, else cpu.")


class LowVRAMLLMTextEncoderLoader:
    DISPLAY_NAME = "Load FLUX.2 Text Encoder (lazy, GGUF/FP8) · Kontext LowVRAM"
    SEARCH_ALIASES = ["clip loader flux2", "mistral", "qwen3", "klein text encoder"]
    DESCRIPTION = ("Loads FLUX.2's text encoder: Mistral-3 Small 24B for [dev] (full or the pruned FLUX.2 file) or "
                   "Qwen3-4B / Qwen3-8B for [klein], from safetensors (bf16, fp8, scaled fp8, comfy_quant fp8) or "
                   "GGUF (llama.cpp names, e.g. unsloth's Qwen3 GGUFs). The model is recognised from the file the way "
                   "ComfyUI's CLIPLoader (type flux2) does. The weights are read only when needed: with 'Text Encode "
                   "FLUX.2 (cached)' a cached prompt never loads them. Quantized Linear weights stay quantized.")
    CATEGORY = "Kontext LowVRAM/loaders"
    RETURN_TYPES = ("CLIP",)
    RETURN_NAMES = ("clip",)
    OUTPUT_TOOLTIPS = ("An ordinary ComfyUI CLIP (FLUX.2 type) that loads its weights on first use: core nodes "
                       "(CLIPTextEncode, LoRA loaders, ...) take it as is.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder_name": (files.text_encoder_files(), {"tooltip":
                                  "The FLUX.2 text encoder from models/text_encoders (or models/clip): [dev] "
                                  "mistral_3_small_flux2_bf16 / _fp8 .safetensors; [klein] qwen_3_4b / qwen_3_8b "
                                  ".safetensors or a Qwen3 .gguf. A Mistral .gguf needs its tekken.json beside it."}),
            "device": (list(DEVICE_POLICIES), {"default": "auto", "tooltip": DEVICE_TOOLTIP}),
        }}

    @classmethod
    def IS_CHANGED(cls, text_encoder_name, device="auto"):
        """A file replaced under the same name must give a new handle (new weights, new cache identity)."""
        return clip_llm.files_fingerprint(text_encoder_name)

    def load(self, text_encoder_name, device="auto"):
        return (clip_llm.load(text_encoder_name, device),)


class LowVRAMTextEncodeFlux2:
    DISPLAY_NAME = "Text Encode FLUX.2 (cached) · Kontext LowVRAM"
    SEARCH_ALIASES = ["clip text encode", "flux2 prompt", "cached"]
    DESCRIPTION = ("FLUX.2 text encode, exactly core's CLIP Text Encode, with an on-disk cache: the conditioning of a "
                   "prompt is kept under ComfyUI's user folder, so repeating a prompt — even after a restart — skips "
                   "the text encoder entirely (it is not even loaded). For [dev] add core's FluxGuidance after it; "
                   "[klein] takes no guidance. Cache folder: "
                   f"{conditioning.cache_location_text()} ; delete it to clear the cache.")
    CATEGORY = "Kontext LowVRAM/conditioning"
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("FLUX.2 conditioning (the encoder's stacked hidden states and attention mask), as CLIP Text "
                       "Encode makes it.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "The text encoder, best from 'Load FLUX.2 Text Encoder (lazy)': only "
                                             "that one can be cached. Another CLIP (or one changed by a LoRA) is "
                                             "encoded every time."}),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True,
                                    "tooltip": "The prompt: the edit instruction or the image description."}),
            },
            "optional": cache_inputs("One FLUX.2 prompt takes ~8-32 MB ([klein] 512 tokens x 7680 / 12288, "
                                     "[dev] x 15360 values)."),
        }

    def encode(self, clip, text, cache=True, cache_max_mb=DEFAULT_CACHE_MB):
        return (conditioning_llm.encode(clip, text, cache, cache_max_mb),)
