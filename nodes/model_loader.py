"""LowVRAMModelLoader: GGUF / FP8 / NF4 / bf16 FLUX diffusion models as an ordinary ComfyUI MODEL."""
import inspect

from ..loaders import CONVERSIONS, load_model_file
from .model_files import find_file, list_files

EXTENSIONS = (".gguf", ".safetensors", ".sft")
FOLDERS = ("diffusion_models",)  # ComfyUI maps the legacy "unet" folder into this one
COMPUTE_DTYPES = ("default", "bf16", "fp16", "fp32")


def model_files():
    """Every loadable file under ComfyUI's diffusion_models/unet folders (relative names, sorted)."""
    return list_files(FOLDERS, EXTENSIONS)


def model_path(name):
    return find_file(FOLDERS, name, "models/diffusion_models (or models/unet)")


def torch_dtype(name):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(name)


class LowVRAMModelLoader:
    DESCRIPTION = ("Loads a FLUX.1 / FLUX.1 Kontext diffusion model in any common format — GGUF (Q2_K…Q8_0, IQ4), "
                   "FP8 (plain, scaled, ComfyUI comfy_quant), bitsandbytes NF4 or bf16/fp16 — detected from the file. "
                   "Quantized weights stay quantized in memory and are dequantized layer by layer on the GPU.")
    CATEGORY = "Kontext LowVRAM/loaders"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("An ordinary ComfyUI MODEL: works with KSampler, ReferenceLatent, LoRA loaders and the rest.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (model_files(), {"tooltip": "A .gguf / .safetensors / .sft file from models/diffusion_models "
                                                      "(or models/unet). The format is detected from the file's contents."}),
            "compute_dtype": (list(COMPUTE_DTYPES), {"default": "default", "tooltip":
                "Precision the weights are dequantized to for each matmul. 'default' lets ComfyUI pick for your GPU "
                "(bf16 on recent NVIDIA cards); fp16 is faster on older cards, fp32 only for debugging."}),
            "convert_on_load": (list(CONVERSIONS), {"default": "none", "tooltip":
                "Quantize a bf16/fp16/fp32 file while loading, so it fits in less VRAM: fp8_e4m3fn_scaled (~half "
                "size, near-lossless), q8_0 (~53%, near-lossless), nf4 (~28%, visible but small quality loss). "
                "Ignored for files that are already quantized."}),
        }, "optional": {
            "fp8_matmul": ("BOOLEAN", {"default": True, "tooltip":
                "FP8 e4m3 weights multiply in fp8 on GPUs that support it (RTX 40xx/50xx, H100, L40…): ~1.4x faster "
                "than upcasting, with activations rounded to fp8 (a small extra error). Off: always upcast."}),
            "torch_compile": ("BOOLEAN", {"default": False, "tooltip":
                "Compile the diffusion model with torch.compile (Inductor) at the first sampling step, like core's "
                "TorchCompileModel node (like it, the compiled model does without ComfyUI v0.29's dynamic VRAM). The "
                "first run takes a minute or more; later runs are faster. Needs a working Triton/C++ toolchain."}),
        }}

    def load(self, model_name, compute_dtype="default", convert_on_load="none", fp8_matmul=True, torch_compile=False):
        # compiled, it skips v0.29's dynamic VRAM, as core's TorchCompileModel does (clone(disable_dynamic=True))
        model = load_model(model_path(model_name), convert_on_load, bool(fp8_matmul), compute_dtype,
                           disable_dynamic=bool(torch_compile))
        if torch_compile:
            # core's own helper: a per-model APPLY_MODEL wrapper, compiled lazily at sample time (no globals)
            from comfy_api.torch_helpers import set_torch_compile_wrapper
            set_torch_compile_wrapper(model, backend="inductor")
        return (model,)


# Weights whose *shape* the host reads off the built module, so raw quantized storage (whose width is a byte count)
# would give it a wrong answer: model_base.Flux.concat_cond (FLUX.1, Kontext, Fill, FLUX.2, Chroma) takes the
# input channel count from img_in.weight.shape[1] — a Q8_0 img_in read as 68 bytes wide made Kontext concatenate a
# zero image — and Flux control LoRAs widen img_in through a padded diff patch, which only a dense weight takes.
# They are tiny (FLUX.1 img_in: 0.2 M values), so they are stored dense in float32, their exact values.
HOST_READS_SHAPE = ("img_in.weight",)


def dense_where_host_reads_shape(sd):
    """`sd` with the quantized entries of HOST_READS_SHAPE dequantized (a new dict only when one changes)."""
    from ..optimizations import QTensor, dequantize
    import torch
    hit = [k for k in HOST_READS_SHAPE if isinstance(sd.get(k), QTensor)]
    if not hit:
        return sd
    return {**sd, **{k: dequantize(sd[k], torch.float32) for k in hit}}


def build_model(sd, fp8_matmul=True, compute_dtype="default", disable_dynamic=False):
    """A loaded state dict (QTensors and plain tensors) as a ComfyUI ModelPatcher built with our ops, whose core
    LoRAs keep GGUF/NF4 layers quantized; None when ComfyUI does not recognise the architecture."""
    import comfy.sd

    from ..optimizations.lora_patcher import keep_quantized_under_lora
    from ..optimizations.ops import make_comfy_ops

    options = {"custom_operations": make_comfy_ops(fp8_matmul=fp8_matmul)}
    if torch_dtype(compute_dtype) is not None:
        options["dtype"] = torch_dtype(compute_dtype)
    kwargs = {}
    if disable_dynamic and "disable_dynamic" in inspect.signature(comfy.sd.load_diffusion_model_state_dict).parameters:
        kwargs["disable_dynamic"] = True  # v0.29+; older ComfyUI has no dynamic VRAM to disable
    model = comfy.sd.load_diffusion_model_state_dict(dense_where_host_reads_shape(sd), model_options=options, **kwargs)
    # a core LoRA loader must not turn GGUF/NF4 layers into bf16 at load
    return keep_quantized_under_lora(model) if model is not None else None


def load_model(path, convert_on_load="none", fp8_matmul=True, compute_dtype="default", disable_dynamic=False):
    """The model file at `path` as a ComfyUI ModelPatcher built with our ops (build_model).

    Also ComfyUI's way to load it again (`cached_patcher_init`, as core's load_diffusion_model sets): v0.29 asks
    for a copy without dynamic VRAM (`clone(disable_dynamic=True)`: core's TorchCompileModel, hooks in the
    conditioning, MultiGPU) by calling it with disable_dynamic=True, and raises when a model has none."""
    import comfy.utils

    pbar = comfy.utils.ProgressBar(100)
    sd, info = load_model_file(path, convert=convert_on_load,
                               progress=lambda i, n: pbar.update_absolute(int(100 * i / max(n, 1)), 100))
    model = build_model(sd, fp8_matmul, compute_dtype, disable_dynamic)
    if model is None:
        raise RuntimeError(f"{path}: ComfyUI could not recognise this diffusion model's architecture "
                           "(is it a FLUX transformer? text encoders and VAEs need their own loaders)")
    model.cached_patcher_init = (load_model, (path, convert_on_load, fp8_matmul, compute_dtype))
    return model
