"""LowVRAMCompareImages: how far apart two images are (PSNR, SSIM, mean |a-b|) and where (a heat map)."""
from ..host import compare


class LowVRAMCompareImages:
    DISPLAY_NAME = "Compare Images (PSNR / SSIM) · Kontext LowVRAM"
    SEARCH_ALIASES = ["image diff", "psnr", "ssim", "difference"]
    DESCRIPTION = ("Measures how far apart two images of the same size are — PSNR (dB; inf when identical), SSIM "
                   "(1 = identical; Wang et al. 2004, as scikit-image computes it) and the mean and largest absolute "
                   "difference — shows the numbers on the node and outputs a heat map of where they differ. Use it "
                   "to check a quantized model, a LoRA or a tiled decode against a reference image.")
    CATEGORY = "Kontext LowVRAM/utils"
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("difference", "summary")
    OUTPUT_TOOLTIPS = ("Heat map of |a-b| (black: equal; red, yellow, white: larger differences), amplified so the "
                       "largest difference is white unless 'amplify' is set.",
                       "The numbers as text (the same lines the node shows).")
    OUTPUT_NODE = True
    FUNCTION = "compare"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image_a": ("IMAGE", {"tooltip": "The reference image (or batch)."}),
            "image_b": ("IMAGE", {"tooltip": "The image (or batch) to compare with it: same width, height and "
                                             "channels. A single image is compared with each image of a batch."}),
        }, "optional": {
            "amplify": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1000.0, "step": 0.5, "tooltip":
                "How much the heat map multiplies |a-b|. 0 = auto: the largest difference shows as white. A fixed "
                "value (e.g. 10) makes heat maps of different runs comparable."}),
        }}

    def compare(self, image_a, image_b, amplify=0.0):
        return compare.compare_images(image_a, image_b, amplify)
