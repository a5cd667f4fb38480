"""ComfyUI `custom_operations` whose Linear takes QTensor weights: the host's manual_cast ops around the
plain-torch `optimizations.ops.quantized_linear`.

The raw weight and bias reach the compute device through the host's own cast (pinning, offload streams, v0.29's
dynamic VRAM); what happens to them there (dequantization, LoRA deltas, the fp8 matmul) is plain torch.
"""
import torch

from ..optimizations.ops import adopt_quantized_weight, aux_tensor, dequantize_module_weight, is_quantized, \
    quantized_linear
from ..optimizations.qtensor import QTensor
from . import compat

# A core LoRA kept per forward on a GGUF/NF4 layer rides its weight Parameter (see patcher.py)
HOST_PATCH_ATTR = "klv_host_patch"


def cast_raw(module, input):
    """Move raw weight + bias to the compute device through the host's own cast path (pinning, offload
    streams, dynamic VRAM); LoRA weight functions are held back and returned, to run after dequantization.
    A LoRA the host would have merged at load (patcher.py) comes first, as a merged weight would."""
    kept = getattr(module.weight, HOST_PATCH_ATTR, None)
    fns = list(module.weight_function)
    lowvram = getattr(module, "weight_lowvram_function", None)
    if fns:
        module.weight_function = []
    if lowvram is not None:
        module.weight_lowvram_function = None
    try:
        weight, bias, stream = compat.cast_bias_weight(module, input, dtype=module.weight.dtype,
                                                       bias_dtype=input.dtype)
    finally:
        if fns:
            module.weight_function = fns
        if lowvram is not None:
            module.weight_lowvram_function = lowvram
    held = ([kept] if kept is not None else []) + fns + ([lowvram] if lowvram is not None else [])
    return weight, bias, stream, held


def make_comfy_ops(fp8_matmul: bool = True):
    """ComfyUI `custom_operations` (a manual_cast subclass) whose Linear takes QTensor weights.

    fp8_matmul: e4m3 weights multiply in fp8 on GPUs that support it (see fp8_linear); False always upcasts.
    A new class per call, so one load's options never reach another's modules.
    """
    import comfy.ops
    base = comfy.ops.manual_cast

    class KontextLowVRAMOps(base):
        class Linear(base.Linear):
            KLV_LINEAR = True  # host/model.py's check of the built model finds our layers by this

            def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
                # No full-size float allocation: the state dict supplies every tensor (a 12B model would
                # otherwise claim 24 GB of RAM before the quantized weights arrive).
                torch.nn.Module.__init__(self)
                self.in_features, self.out_features = in_features, out_features
                self.klv_has_bias = bool(bias)  # what the host built this layer with (FLUX.2: no biases)
                self.weight = None
                self.bias = None

            def reset_parameters(self):
                return None

            def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs):
                # The shapes the host built this layer with are the architecture its detection chose: a file
                # whose tensors disagree is another model (or a damaged one), reported as torch reports it.
                want = {"weight": (self.out_features, self.in_features), "bias": (self.out_features,)}
                for key in [k for k in state_dict if k.startswith(prefix)]:
                    name, value = key[len(prefix):], state_dict[key]
                    if name in want and tuple(value.shape) != want[name]:
                        error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} "
                                          f"from checkpoint, the shape in current model is {want[name]}.")
                    elif name == "bias" and not self.klv_has_bias:
                        unexpected_keys.append(key)  # as core's bias-less Linear: not used
                    elif name == "weight" and isinstance(value, QTensor):
                        adopt_quantized_weight(self, value)
                    elif name in ("weight", "bias"):
                        setattr(self, name, torch.nn.Parameter(value, requires_grad=False))
                    elif "." not in name:
                        unexpected_keys.append(key)
                if self.weight is None:
                    missing_keys.append(prefix + "weight")
                if self.klv_has_bias and self.bias is None:
                    missing_keys.append(prefix + "bias")

            def forward_comfy_cast_weights(self, input, *args, **kwargs):
                if not is_quantized(self):
                    return super().forward_comfy_cast_weights(input, *args, **kwargs)
                raw, bias, stream, fns = cast_raw(self, input)
                out = quantized_linear(self, input, raw, bias, fns, fp8_matmul)
                compat.uncast_bias_weight(self, raw, bias, stream)
                return out

            # ModelPatcher's seam for patching weights it cannot read (comfy.model_patcher.get_key_weight):
            # it hands us a cast of the raw storage; we answer with the real values, then take the merged
            # result back. A merged fp8 weight is fp8 again. GGUF/NF4 layers under our loader's patcher are not
            # merged (patcher.py keeps them quantized); under another patcher a merged one stays dense (bf16)
            # until the host restores its backup of the raw one.
            def convert_weight(self, weight, inplace=False, **kwargs):
                if not is_quantized(self):
                    return weight
                return dequantize_module_weight(self, self.weight.to(weight.device), weight.dtype)

            def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
                if return_weight:
                    return weight
                import comfy.float
                quantized = is_quantized(self)
                fp8 = quantized and self.klv_qformat == "fp8"
                if fp8:
                    # As core's scaled-fp8 layers: the merged weight goes back to fp8 under the layer's own
                    # scale (stochastic rounding), so a LoRA'd layer keeps fp8 memory and the fp8 matmul, and
                    # the host's restore of the raw weight alone brings the original back.
                    scale = aux_tensor(self, "scale")
                    if scale is not None:
                        weight = weight / scale.to(device=weight.device, dtype=weight.dtype)
                dtype = torch.bfloat16 if quantized and not fp8 else self.weight.dtype
                value = comfy.float.stochastic_rounding(weight, dtype, seed=seed or 0)
                if inplace_update and value.dtype == self.weight.dtype:
                    self.weight.data.copy_(value)
                else:
                    self.weight = torch.nn.Parameter(value, requires_grad=False)

    return KontextLowVRAMOps
