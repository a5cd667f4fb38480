"""Every difference between the ComfyUI versions this pack runs on (v0.3.64 and v0.29), probed once and named.

Each probe asks the host what it has (a parameter, an attribute), never its version string, so a host in between
gets what it offers. Answers about the host's modules are cached: one process runs one host.
"""
import contextlib
import functools
import inspect


def _takes(fn, name) -> bool:
    return name in inspect.signature(fn).parameters


@functools.cache
def cast_is_offloadable() -> bool:
    """v0.29: comfy.ops.cast_bias_weight(..., offloadable=True) returns an offload handle for uncast_bias_weight
    (async offload streams, dynamic VRAM); v0.3.x returns (weight, bias) and has no uncast."""
    import comfy.ops
    return _takes(comfy.ops.cast_bias_weight, "offloadable")


def cast_bias_weight(module, input, **kwargs):
    """(weight, bias, handle): the module's weight and bias cast for `input` through the host's own path; handle is
    None where the host has no offloadable casts (v0.3.x)."""
    import comfy.ops
    if cast_is_offloadable():
        return comfy.ops.cast_bias_weight(module, input, offloadable=True, **kwargs)
    weight, bias = comfy.ops.cast_bias_weight(module, input, **kwargs)
    return weight, bias, None


def uncast_bias_weight(module, weight, bias, handle):
    """Give an offloadable cast back (v0.29); a v0.3.x cast (handle None) needs nothing."""
    if handle is not None:
        import comfy.ops
        comfy.ops.uncast_bias_weight(module, weight, bias, handle)


@functools.cache
def diffusion_loader_disables_dynamic() -> bool:
    """v0.29: comfy.sd.load_diffusion_model_state_dict(..., disable_dynamic=True) builds a patcher without dynamic
    VRAM; v0.3.x has no dynamic VRAM to disable."""
    import comfy.sd
    return _takes(comfy.sd.load_diffusion_model_state_dict, "disable_dynamic")


@functools.cache
def text_encoder_loader_disables_dynamic() -> bool:
    """v0.29: comfy.sd.load_text_encoder_state_dicts(..., disable_dynamic=) as above; v0.3.x has no such parameter."""
    import comfy.sd
    return _takes(comfy.sd.load_text_encoder_state_dicts, "disable_dynamic")


@functools.cache
def diffusion_loader_reads_metadata() -> bool:
    """v0.29: comfy.sd.load_diffusion_model_state_dict(sd, metadata=...) runs comfy_quant layers on core's own
    mixed-precision ops; v0.3.x has no metadata parameter (fp8 there is a storage dtype)."""
    import comfy.sd
    return _takes(comfy.sd.load_diffusion_model_state_dict, "metadata")


@functools.cache
def clip_reports_dynamic() -> bool:
    """v0.29: comfy.sd.CLIP.is_dynamic() (the executor's cache bookkeeping asks it); v0.3.x CLIPs have none."""
    import comfy.sd
    return hasattr(comfy.sd.CLIP, "is_dynamic")


def inference_dtype(base_model):
    """v0.29: BaseModel.get_dtype_inference(), the dtype the model computes in; None on v0.3.x, which has none."""
    get = getattr(base_model, "get_dtype_inference", None)
    return get() if get is not None else None


def free_memory(patcher, device):
    """Bytes free for work on `device`: v0.29's ModelPatcher.get_free_memory (it counts what dynamic VRAM can give
    back); on v0.3.x, or without a patcher, comfy.model_management.get_free_memory."""
    get = getattr(patcher, "get_free_memory", None)
    if get is not None:
        return get(device)
    import comfy.model_management as mm
    return mm.get_free_memory(device)


def device_context(device):
    """v0.29: comfy.model_management.cuda_device_context(device), `device` made current for the block, as core's VAE
    nodes do; v0.3.x has none (a null context)."""
    import comfy.model_management as mm
    ctx = getattr(mm, "cuda_device_context", None)
    return ctx(device) if ctx is not None else contextlib.nullcontext()


def vae_output_dtype(vae):
    """v0.29: VAE.vae_output_dtype(), the dtype VAE outputs are handed on in; v0.3.x hands them on in float32."""
    import torch
    f = getattr(vae, "vae_output_dtype", None)
    return f() if f is not None else torch.float32


def format_encoded(vae, samples):
    """v0.29: VAE.format_encoded(samples), the last step of core's encode for some VAEs; v0.3.x has none."""
    fmt = getattr(vae, "format_encoded", None)
    return fmt(samples) if fmt is not None else samples


def free_vram(device, keep=()):
    """Unload every model ComfyUI holds on `device` except the patchers in `keep`, and give the allocator's cached
    blocks back (after an out-of-memory error). Both hosts have free_memory(bytes, device, keep_loaded) and
    soft_empty_cache(); their unload_all_models differ (v0.29 empties every device, v0.3.x only the main one and
    keeps nothing), so this names the one device and what stays."""
    import comfy.model_management as mm
    kept = [lm for lm in mm.current_loaded_models if any(lm.model is p for p in keep)]
    mm.free_memory(1e30, device, keep_loaded=kept)
    mm.soft_empty_cache()
