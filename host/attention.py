"""The attention backend of one model: the override in its transformer_options, chosen for the device, dtype and
head dim its attention will run with."""
import torch

from ..optimizations.attention import AttentionOverride, log, select_backend
from . import compat

DEFAULT_HEAD_DIM = 128  # FLUX.1: hidden 3072 / 24 heads


def model_attention_params(model):
    """(device, compute dtype, head dim) the model's attention will run with."""
    inner = model.model
    dtype = compat.inference_dtype(inner)
    if dtype is None:
        dtype = getattr(inner, "manual_cast_dtype", None) or model.model_dtype() or torch.float32
    if not getattr(dtype, "is_floating_point", False) or dtype.itemsize == 1:  # fp8 storage without manual cast
        dtype = torch.bfloat16
    head_dim = DEFAULT_HEAD_DIM
    cfg = getattr(getattr(inner, "model_config", None), "unet_config", None) or {}
    if cfg.get("hidden_size") and cfg.get("num_heads"):
        head_dim = int(cfg["hidden_size"]) // int(cfg["num_heads"])
    return torch.device(model.load_device), dtype, head_dim


def with_backend(model, backend, split_budget_bytes):
    """A clone of `model` whose attention runs on `backend` (or, for "auto", the first that works here); raises
    AttentionBackendUnavailable, with the pip command, when an explicit choice cannot run."""
    device, dtype, head_dim = model_attention_params(model)
    chosen, _ = select_backend(backend, device, dtype, head_dim)
    patched = model.clone()
    opts = patched.model_options.setdefault("transformer_options", {})
    previous = opts.get("optimized_attention_override")
    if previous is not None and not isinstance(previous, AttentionOverride):
        log.info("Kontext LowVRAM attention: replacing another node's attention override (%r)", previous)
    opts["optimized_attention_override"] = AttentionOverride(chosen, split_budget_bytes)
    log.info("Kontext LowVRAM attention: %s (requested %s) on %s / %s / head dim %d", chosen, backend, device,
             dtype, head_dim)
    return patched
