"""LowVRAMAttention: pick the attention backend of one model (MODEL -> MODEL)."""
from ..optimizations.attention import BACKENDS, DEFAULT_SPLIT_BYTES

DEFAULT_HEAD_DIM = 128  # FLUX.1: hidden 3072 / 24 heads


def model_attention_params(model):
    """(device, compute dtype, head dim) the model's attention will run with."""
    import torch

    inner = model.model
    dtype = None
    if hasattr(inner, "get_dtype_inference"):          # v0.29
        dtype = inner.get_dtype_inference()
    if dtype is None:
        dtype = getattr(inner, "manual_cast_dtype", None) or model.model_dtype() or torch.float32
    if not getattr(dtype, "is_floating_point", False) or dtype.itemsize == 1:  # fp8 storage without manual cast
        dtype = torch.bfloat16
    head_dim = DEFAULT_HEAD_DIM
    cfg = getattr(getattr(inner, "model_config", None), "unet_config", None) or {}
    if cfg.get("hidden_size") and cfg.get("num_heads"):
        head_dim = int(cfg["hidden_size"]) // int(cfg["num_heads"])
    return torch.device(model.load_device), dtype, head_dim


class LowVRAMAttention:
    DESCRIPTION = ("Chooses the attention implementation for this model only (the model is cloned; other models and "
                   "the global --use-*-attention flag are untouched). 'auto' tries SageAttention, FlashAttention, "
                   "xformers, then PyTorch SDPA, using the first that works on your GPU and dtype. 'split' bounds "
                   "attention memory by computing the score matrix in chunks of at most split_chunk_mb. An explicitly "
                   "chosen backend that is not installed or cannot run here stops the prompt with the pip command "
                   "to install it.")
    CATEGORY = "Kontext LowVRAM/optimizations"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("A clone of the model whose attention runs on the chosen backend.",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model (e.g. from the Kontext LowVRAM loader or core "
                                           "Load Diffusion Model). It is cloned, not changed."}),
            "backend": (list(BACKENDS), {"default": "auto", "tooltip":
                "auto: the fastest that works here (sage_attention > flash_attn > xformers > sdpa). "
                "sdpa: PyTorch scaled_dot_product_attention, always available. "
                "flash_attn: FlashAttention 2 (pip install flash-attn --no-build-isolation; CUDA, fp16/bf16). "
                "sage_attention: SageAttention, 8-bit QK, fastest, slightly less exact (pip install sageattention). "
                "xformers: memory-efficient attention (pip install xformers). "
                "split: plain PyTorch in query chunks, bounded memory, slower; for when attention runs out of memory."}),
            "split_chunk_mb": ("INT", {"default": DEFAULT_SPLIT_BYTES // 2 ** 20, "min": 1, "max": 1 << 20,
                                       "step": 1, "tooltip":
                "Only for 'split': the most memory (MiB) one chunk of attention scores may take. Smaller uses less "
                "VRAM and runs slower. FLUX Kontext at 1024x1024 needs ~7 GB for the full score matrix."}),
        }}

    def apply(self, model, backend="auto", split_chunk_mb=DEFAULT_SPLIT_BYTES // 2 ** 20):
        from ..optimizations.attention import AttentionOverride, log, select_backend

        device, dtype, head_dim = model_attention_params(model)
        chosen, _ = select_backend(backend, device, dtype, head_dim)  # raises AttentionBackendUnavailable
        patched = model.clone()
        opts = patched.model_options.setdefault("transformer_options", {})
        previous = opts.get("optimized_attention_override")
        if previous is not None and not isinstance(previous, AttentionOverride):
            log.info("Kontext LowVRAM attention: replacing another node's attention override (%r)", previous)
        opts["optimized_attention_override"] = AttentionOverride(chosen, int(split_chunk_mb) * 2 ** 20)
        log.info("Kontext LowVRAM attention: %s (requested %s) on %s / %s / head dim %d", chosen, backend, device,
                 dtype, head_dim)
        return (patched,)
