"""ComfyUI node declarations; each execute body hands over to host/. Nothing here imports comfy.*."""
from .attention import LowVRAMAttention
from .lora import LowVRAMLoraLoader
from .model_loader import LowVRAMModelLoader
from .text_encoder import LowVRAMTextEncode, LowVRAMTextEncoderLoader
from .tiled_vae import LowVRAMTiledVAEDecode, LowVRAMTiledVAEEncode

NODE_CLASS_MAPPINGS = {
    "LowVRAMModelLoader": LowVRAMModelLoader,
    "LowVRAMTiledVAEDecode": LowVRAMTiledVAEDecode,
    "LowVRAMTiledVAEEncode": LowVRAMTiledVAEEncode,
    "LowVRAMAttention": LowVRAMAttention,
    "LowVRAMLoraLoader": LowVRAMLoraLoader,
    "LowVRAMTextEncoderLoader": LowVRAMTextEncoderLoader,
    "LowVRAMTextEncode": LowVRAMTextEncode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "LowVRAMModelLoader": "Load Diffusion Model (GGUF/FP8/NF4) · Kontext LowVRAM",
    "LowVRAMTiledVAEDecode": "Tiled VAE Decode (seam-free) · Kontext LowVRAM",
    "LowVRAMTiledVAEEncode": "Tiled VAE Encode (seam-free) · Kontext LowVRAM",
    "LowVRAMAttention": "Attention Backend · Kontext LowVRAM",
    "LowVRAMLoraLoader": "LoRA on Quantized Model (low-rank) · Kontext LowVRAM",
    "LowVRAMTextEncoderLoader": "Load Text Encoders (lazy, GGUF/FP8) · Kontext LowVRAM",
    "LowVRAMTextEncode": "Text Encode FLUX (cached) · Kontext LowVRAM",
}
