"""Kontext LowVRAM: ComfyUI node registration only. A node's id is its class name and its DISPLAY_NAME says how the
UI shows it, so adding a node is its module in nodes/ plus one entry in NODES. web/ holds the frontend extension
(the report node's text box)."""
from .nodes.attention import LowVRAMAttention
from .nodes.compare import LowVRAMCompareImages
from .nodes.convert import LowVRAMConvert
from .nodes.lora import LowVRAMLoraLoader
from .nodes.model_loader import LowVRAMModelLoader
from .nodes.report import LowVRAMReport
from .nodes.text_encoder import LowVRAMTextEncode, LowVRAMTextEncoderLoader
from .nodes.text_encoder_flux2 import LowVRAMLLMTextEncoderLoader, LowVRAMTextEncodeFlux2
from .nodes.tiled_vae import LowVRAMTiledVAEDecode, LowVRAMTiledVAEEncode

NODES = [
    LowVRAMModelLoader,
    LowVRAMTiledVAEDecode,
    LowVRAMTiledVAEEncode,
    LowVRAMAttention,
    LowVRAMLoraLoader,
    LowVRAMTextEncoderLoader,
    LowVRAMTextEncode,
    LowVRAMLLMTextEncoderLoader,
    LowVRAMTextEncodeFlux2,
    LowVRAMCompareImages,
    LowVRAMReport,
    LowVRAMConvert,
]

NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in NODES}
NODE_DISPLAY_NAME_MAPPINGS = {cls.__name__: cls.DISPLAY_NAME for cls in NODES}

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
