"""Kontext LowVRAM: ComfyUI node registration only. A node's id is its class name and its DISPLAY_NAME says how the
UI shows it, so adding a node is its module in nodes/ plus one entry in NODES."""
from .nodes.attention import LowVRAMAttention
from .nodes.lora import LowVRAMLoraLoader
from .nodes.model_loader import LowVRAMModelLoader
from .nodes.text_encoder import LowVRAMTextEncode, LowVRAMTextEncoderLoader
from .nodes.tiled_vae import LowVRAMTiledVAEDecode, LowVRAMTiledVAEEncode

NODES = [
    LowVRAMModelLoader,
    LowVRAMTiledVAEDecode,
    LowVRAMTiledVAEEncode,
    LowVRAMAttention,
    LowVRAMLoraLoader,
    LowVRAMTextEncoderLoader,
    LowVRAMTextEncode,
]

NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {cls.__name__: cls.DISPLAY_NAME for cls in NODES}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
