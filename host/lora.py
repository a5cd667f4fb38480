"""LoRA on our model: low-rank deltas (weight wrappers) for its quantized layers, the host's own patches for the rest."""


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


def plan_for_file(model, path):
    """plan_for_model for the LoRA file at `path`."""
    import comfy.utils
    return plan_for_model(model, comfy.utils.load_torch_file(path, safe_load=True))


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
