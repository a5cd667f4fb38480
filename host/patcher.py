"""A core LoRA loader on our GGUF / NF4 layers leaves them quantized, also where the host would merge it at load.

ComfyUI's classic ModelPatcher (v0.3.x always; v0.29 when dynamic VRAM is off) merges a LoRA into every weight
it loads fully: for a layer it cannot read it asks for the values (`convert_weight`) and hands back the merged
result (`set_weight`). On a GGUF or NF4 layer that result is dense, 2-4x the quantized bytes, but the host
planned the load from the quantized size: where the quantized model just fits, a LoRA on every linear runs the
card out of memory in the middle of loading. (fp8 layers merge back into fp8 and float GGUF into the same
size; those merges stay as they are.)

For these layers the patch stays per forward instead: the patched parameter is a new Parameter over the same raw
bytes that carries the host's own `LowVramPatch`, which our forward turns into cached low-rank deltas
(`lora.host_patch_low_rank`), exactly as for the host's low-VRAM layers. The host's backup keeps the original
(untagged) Parameter, so every way the host un-merges (`unpatch_model`, `partially_unload`, switching to a clone
with other patches) also drops the LoRA: there is no state of ours to keep in step with the host's.
"""
import collections

import torch

from ..optimizations.ops import is_quantized, stores_floats
from .ops import HOST_PATCH_ATTR

_Backup = collections.namedtuple("Dimension", ["weight", "inplace_update"])  # the host's own backup record
_CLASSES = {}


def grows_when_merged(module) -> bool:
    """Whether a merged LoRA would store this layer in more bytes than its quantized weight (GGUF block quants,
    NF4)."""
    return is_quantized(module) and module.klv_qformat != "fp8" and not stores_floats(module)


def _layer_to_keep_quantized(patcher, key, inplace_update, kwargs):
    """The module behind `key` when the host is about to merge its patches into it and the merge would grow it,
    else None (the host's own merge runs)."""
    if (key not in patcher.patches or not key.endswith(".weight") or inplace_update
            or patcher.weight_inplace_update or kwargs.get("return_weight") or kwargs.get("force_cast")):
        return None  # return_weight: a caller wants the merged values (e.g. to save them); force_cast: v0.29 dynamic
    import comfy.utils
    try:
        module = comfy.utils.get_attr(patcher.model, key[:-len(".weight")])
    except AttributeError:
        return None
    return module if grows_when_merged(module) else None


def _patch_per_forward(patcher, module, key):
    import comfy.model_patcher
    weight, set_func, convert_func = comfy.model_patcher.get_key_weight(patcher.model, key)
    if key not in patcher.backup:
        patcher.backup[key] = _Backup(weight.to(device=patcher.offload_device, copy=False), False)
    tagged = torch.nn.Parameter(weight.data, requires_grad=False)
    setattr(tagged, HOST_PATCH_ATTR, comfy.model_patcher.LowVramPatch(key, patcher.patches, convert_func, set_func))
    module.weight = tagged


def keep_quantized_under_lora(patcher):
    """Make `patcher` (a ComfyUI ModelPatcher of a model built with our ops) and its clones keep GGUF / NF4 layers
    quantized when a LoRA patches them. Changes this patcher's class to a subclass of its own class that overrides
    `patch_weight_to_device`, and `clone` so that every clone is one too."""
    base = type(patcher)
    if getattr(base, "klv_keeps_quantized", False):
        return patcher
    if base not in _CLASSES:
        class KeepQuantized(base):
            klv_keeps_quantized = True

            def patch_weight_to_device(self, key, device_to=None, inplace_update=False, **kwargs):
                module = _layer_to_keep_quantized(self, key, inplace_update, kwargs)
                if module is None:
                    return super().patch_weight_to_device(key, device_to=device_to, inplace_update=inplace_update,
                                                          **kwargs)
                _patch_per_forward(self, module, key)

            def clone(self, *args, **kwargs):
                # v0.29's clone(disable_dynamic=True) builds a plain ModelPatcher: keep it ours too
                return keep_quantized_under_lora(super().clone(*args, **kwargs))

        KeepQuantized.__name__ = KeepQuantized.__qualname__ = "KontextLowVRAM" + base.__name__
        _CLASSES[base] = KeepQuantized
    patcher.__class__ = _CLASSES[base]
    return patcher
