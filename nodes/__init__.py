"""ComfyUI adapters. Nothing here imports comfy.* at import time."""
from .model_loader import LowVRAMModelLoader

NODE_CLASS_MAPPINGS = {
    "LowVRAMModelLoader": LowVRAMModelLoader,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LowVRAMModelLoader": "Load Diffusion Model (GGUF/FP8/NF4) · Kontext LowVRAM",
}
