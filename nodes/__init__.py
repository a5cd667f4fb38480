"""ComfyUI adapters. Nothing here imports comfy.* at import time."""
NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
