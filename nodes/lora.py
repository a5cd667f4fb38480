"""LowVRAMLoraLoader: LoRA on quantized weights as a low-rank side product (MODEL -> MODEL)."""


def _is_quantized_key(model):
    from ..optimizations.ops import is_quantized

    def check(weight_key):
        import comfy.utils
        owner = weight_key.rsplit(".", 1)[0]
        try:
            return is_quantized(comfy.utils.get_attr(model.model, owner))
        except AttributeError:
            return False
    return check


def plan_for_model(model, lora_sd):
    """Low-rank deltas for the model's quantized layers and core patches for the rest (strength 1)."""
    import comfy.lora
    import comfy.lora_convert

    from ..optimizations.lora import plan_low_rank
    patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora_sd), comfy.lora.model_lora_keys_unet(model.model, {}))
    return plan_low_rank(patches, _is_quantized_key(model))


def apply_plan(model, plan, strength):
    """A clone of `model` with the plan at `strength`: weight wrappers for the low-rank part, core patches else."""
    low_rank, rest = plan
    patched = model.clone()
    for weight_key, deltas in low_rank.items():
        for delta in deltas:
            patched.add_weight_wrapper(weight_key, delta.with_strength(strength))
    loaded = set(patched.add_patches(rest, strength)) if rest else set()
    missing = [k for k in rest if k not in loaded]
    return patched, missing


class LowVRAMLoraLoader:
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
        import folder_paths
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to apply the LoRA to (it is cloned, not changed)."}),
            "lora_name": (folder_paths.get_filename_list("loras"), {"tooltip": "A LoRA file from models/loras."}),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01, "tooltip":
                "How strongly the LoRA changes the model; negative values invert it. Changing it is cheap."}),
        }}

    def load_lora(self, model, lora_name, strength_model):
        if strength_model == 0:
            return (model,)
        import folder_paths

        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        patched, missing = apply_plan(model, self._plan(model, path), strength_model)
        if missing:
            import logging
            logging.warning("Kontext LowVRAM LoRA: %d keys of %s matched no weight (e.g. %s)", len(missing),
                            lora_name, missing[0])
        return (patched,)

    def _plan(self, model, path):
        ident = (path, id(model.model))
        if self._cache is None or self._cache[0] != ident:
            import comfy.utils
            self._cache = (ident, plan_for_model(model, comfy.utils.load_torch_file(path, safe_load=True)))
        return self._cache[1]
