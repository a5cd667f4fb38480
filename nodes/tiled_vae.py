"""LowVRAMTiledVAEDecode / LowVRAMTiledVAEEncode: seam-free single-pass tiled VAE for ComfyUI (host/vae.py runs
``optimizations/tiling.py`` inside the host's VAE)."""
from ..host import vae as tiled_vae

CATEGORY = "Kontext LowVRAM/vae"

TILE_TOOLTIP = ("Tile side in image pixels. 0 = auto: the largest tile whose working set fits the VRAM that is free "
                "after the VAE is loaded (or 'vram_budget_mb'); on a CPU-only machine 512. Smaller tiles use less "
                "memory and give the same result: the tiles share GroupNorm statistics and a 1-pixel halo, so there "
                "are no seams at any size.")
BUDGET_TOOLTIP = ("VRAM budget in MiB for the working memory (feature maps and tiles). 0 = whatever is free on the "
                  "GPU after loading the VAE. With tile_size 0 the tiles are sized to it; intermediate feature maps "
                  "move to system RAM when they would take more than half of it.")


TILE_INPUT = {"tile_size": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 8, "tooltip": TILE_TOOLTIP})}
BUDGET_INPUT = {"vram_budget_mb": ("INT", {"default": 0, "min": 0, "max": 1 << 20, "step": 64, "tooltip": BUDGET_TOOLTIP})}


class LowVRAMTiledVAEDecode:
    DISPLAY_NAME = "Tiled VAE Decode (seam-free) · Kontext LowVRAM"
    SEARCH_ALIASES = ["vae decode tiled"]
    DESCRIPTION = ("Decodes a latent to an image tile by tile in a single pass, with no seams: the VAE runs layer by "
                   "layer over the tiles, every GroupNorm uses statistics gathered over the whole image and every "
                   "convolution sees its real neighbours through a 1-pixel halo, so the result matches the untiled "
                   "VAE Decode to float precision. The tile size adapts to the free VRAM.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded image.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "samples": ("LATENT", {"tooltip": "The latent to decode (e.g. the KSampler output)."}),
                "vae": ("VAE", {"tooltip": "The VAE to decode with (FLUX.1 16-channel AE, FLUX.2 "
                                           "32-channel AE or any SD-style AutoencoderKL)."}),
                **TILE_INPUT,
            },
            "optional": dict(BUDGET_INPUT),
        }

    def decode(self, samples, vae, tile_size=0, vram_budget_mb=0):
        return (tiled_vae.decode(samples, vae, tile_size, vram_budget_mb),)


class LowVRAMTiledVAEEncode:
    DISPLAY_NAME = "Tiled VAE Encode (seam-free) · Kontext LowVRAM"
    SEARCH_ALIASES = ["vae encode tiled"]
    DESCRIPTION = ("Encodes an image to a latent tile by tile in a single pass, with no seams: every GroupNorm uses "
                   "statistics gathered over the whole image and every convolution sees its real neighbours, so the "
                   "latent matches the untiled VAE Encode to float precision. The tile size adapts to the free VRAM.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The encoded latent, as core VAE Encode returns it.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "pixels": ("IMAGE", {"tooltip": "The image to encode. Width and height are center-cropped to "
                                                "multiples of 8, as core VAE Encode does."}),
                "vae": ("VAE", {"tooltip": "The VAE to encode with (FLUX.1 16-channel AE, FLUX.2 "
                                           "32-channel AE or any SD-style AutoencoderKL)."}),
                **TILE_INPUT,
            },
            "optional": dict(BUDGET_INPUT),
        }

    def encode(self, pixels, vae, tile_size=0, vram_budget_mb=0):
        return (tiled_vae.encode(pixels, vae, tile_size, vram_budget_mb),)
