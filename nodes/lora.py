"""LowVRAMLoraLoader: LoRA on quantized weights as a low-rank side product (MODEL -> MODEL)."""
import logging

from ..host import files, lora


class LowVRAMLoraLoader:
    DISPLAY_NAME = "LoRA on Quantized Model (low-rank) · Kontext LowVRAM"
    SEARCH_ALIASES = ["lora loader", "lora gguf"]
    DESCRIPTION = ("Applies a LoRA to the diffusion model. On GGUF/FP8/NF4 layers loaded by Kontext LowVRAM the "
                   "quantized weights stay quantized (no dense bf16 copy): the LoRA factors are moved to the GPU once "
                   "and each step adds them to the weight it dequantizes anyway (long inputs) or as a low-rank "
                   "product x·down·up (short inputs, fp8 matmul). Changing the strength re-uses them. Every other "
                   "layer and LoRA type (DoRA, LoHa, LoKr) goes through ComfyUI's own LoRA patching, exactly like the "
                   "core LoRA loader.")
    CATEGORY = "Kontext LowVRAM/loaders"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A clone of the model with the LoRA applied.",)
    FUNCTION = "load_lora"

    def __init__(self):
        self._cache = None  # ((path, model id), plan): re-running at another strength re-uses the plan

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to apply the LoRA to (it is cloned, not changed)."}),
            "lora_name": (files.lora_files(), {"tooltip": "A LoRA file from models/loras."}),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01, "tooltip":
                "How strongly the LoRA changes the model; negative values invert it. Changing it is cheap."}),
        }}

    def load_lora(self, model, lora_name, strength_model):
        if strength_model == 0:
            return (model,)
        path = files.lora_path(lora_name)
        patched, missing = lora.apply_plan(model, self._plan(model, path), strength_model)
        if missing:
            logging.warning("Kontext LowVRAM LoRA: %d keys of %s matched no weight (e.g. %s)", len(missing),
                            lora_name, missing[0])
        return (patched,)

    def _plan(self, model, path):
        ident = (path, id(model.model))
        if self._cache is None or self._cache[0] != ident:
            self._cache = (ident, lora.plan_for_file(model, path))
        return self._cache[1]
