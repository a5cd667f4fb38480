"""LowVRAMAttention: pick the attention backend of one model (MODEL -> MODEL)."""
from ..host import attention
from ..optimizations.attention import BACKENDS, DEFAULT_SPLIT_BYTES


class LowVRAMAttention:
    DISPLAY_NAME = "Attention Backend · Kontext LowVRAM"
    SEARCH_ALIASES = ["sage attention", "flash attention"]
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
                                       "step": 1, "advanced": True, "tooltip":
                "Only for 'split': the most memory (MiB) one chunk of attention scores may take. Smaller uses less "
                "VRAM and runs slower. FLUX Kontext at 1024x1024 needs ~7 GB for the full score matrix."}),
        }}

    def apply(self, model, backend="auto", split_chunk_mb=DEFAULT_SPLIT_BYTES // 2 ** 20):
        return (attention.with_backend(model, backend, int(split_chunk_mb) * 2 ** 20),)
