"""Our MODEL: a loaded state dict built by ComfyUI with our ops, under a patcher whose core LoRAs keep GGUF/NF4
layers quantized."""
import torch

import logging

from ..loaders import load_model_file, load_summary
from ..optimizations import QTensor, dequantize
from . import compat, denoise, report
from .architecture import build_checked

# Weights whose *shape* the host reads off the built module, so raw quantized storage (whose width is a byte count)
# would give it a wrong answer: model_base.Flux.concat_cond (FLUX.1, Kontext, Fill, Chroma, and FLUX.2, whose
# model_base.Flux2 inherits it) takes the input channel count from img_in.weight.shape[1] — a Q8_0 img_in read as 68
# bytes wide made Kontext concatenate a zero image; FLUX.2's 128-wide img_in reads as 136 > its 128 output channels —
# and Flux control LoRAs widen img_in through a padded diff patch, which only a dense weight takes.
# They are tiny (FLUX.1 img_in: 0.2 M values, FLUX.2 [dev]: 0.8 M), so they are stored dense in float32, exactly.
HOST_READS_SHAPE = ("img_in.weight",)
log = logging.getLogger("kontext_lowvram")


def dense_where_host_reads_shape(sd):
    """`sd` with the quantized entries of HOST_READS_SHAPE dequantized (a new dict only when one changes)."""
    hit = [k for k in HOST_READS_SHAPE if isinstance(sd.get(k), QTensor)]
    if not hit:
        return sd
    return {**sd, **{k: dequantize(sd[k], torch.float32) for k in hit}}


def torch_dtype(name):
    """The compute dtype a loader's `compute_dtype` choice names; None for "default" (ComfyUI picks)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(name)


def build_model(sd, fp8_matmul=True, compute_dtype="default", disable_dynamic=False):
    """A loaded state dict (QTensors and plain tensors) as a ComfyUI ModelPatcher built with our ops, whose core
    LoRAs keep GGUF/NF4 layers quantized; None when ComfyUI does not recognise the architecture."""
    import comfy.sd

    from .ops import make_comfy_ops
    from .patcher import keep_quantized_under_lora

    options = {"custom_operations": make_comfy_ops(fp8_matmul=fp8_matmul)}
    if torch_dtype(compute_dtype) is not None:
        options["dtype"] = torch_dtype(compute_dtype)
    kwargs = {}
    if disable_dynamic and compat.diffusion_loader_disables_dynamic():
        kwargs["disable_dynamic"] = True
    model = comfy.sd.load_diffusion_model_state_dict(dense_where_host_reads_shape(sd), model_options=options, **kwargs)
    if model is None:
        return None
    # a core LoRA loader must not turn GGUF/NF4 layers into bf16 at load
    model = keep_quantized_under_lora(model)
    denoise.attach(model)
    return model


def load_model(path, convert_on_load="none", fp8_matmul=True, compute_dtype="default", disable_dynamic=False):
    """The model file at `path` as a ComfyUI ModelPatcher built with our ops (build_model).

    Also ComfyUI's way to load it again (`cached_patcher_init`, as core's load_diffusion_model sets): v0.29 asks
    for a copy without dynamic VRAM (`clone(disable_dynamic=True)`: core's TorchCompileModel, hooks in the
    conditioning, MultiGPU) by calling it with disable_dynamic=True, and raises when a model has none."""
    import comfy.utils

    from .sidecar import verify as verify_sidecar

    with report.phase("model load") as rec:
        verify_sidecar(path)  # a <file>.sha256 beside it: checked once per file identity, on the progress bar
        pbar = comfy.utils.ProgressBar(100)
        sd, info = load_model_file(path, convert=convert_on_load,
                                   progress=lambda i, n: pbar.update_absolute(int(100 * i / max(n, 1)), 100))
        summary = load_summary(sd, info)  # before the host builds the model: it empties the state dict
        rec.note(summary)
        # the host's detection decides the architecture; a file it cannot run fails naming the ComfyUI it needs
        model = build_checked(lambda: build_model(sd, fp8_matmul, compute_dtype, disable_dynamic), sd, path, info)
        model.cached_patcher_init = (load_model, (path, convert_on_load, fp8_matmul, compute_dtype))
    log.info("Kontext LowVRAM: loaded %s", summary)
    return model


def compile_at_first_step(model):
    """torch.compile the model at its first sampling step through core's own helper: a per-model APPLY_MODEL
    wrapper, compiled lazily at sample time (no globals)."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    set_torch_compile_wrapper(model, backend="inductor")
