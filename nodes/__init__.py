"""ComfyUI adapters. Nothing here imports comfy.* at import time."""
from .attention import LowVRAMAttention
from .model_loader import LowVRAMModelLoader

NODE_CLASS_MAPPINGS = {
    "LowVRAMModelLoader": LowVRAMModelLoader,
    "LowVRAMAttention": LowVRAMAttention,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LowVRAMModelLoader": "Load Diffusion Model (GGUF/FP8/NF4) · Kontext LowVRAM",
    "LowVRAMAttention": "Attention Backend · Kontext LowVRAM",
}
