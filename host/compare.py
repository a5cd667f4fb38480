"""Compare Images node glue: two ComfyUI IMAGE batches in; the heat map, the summary and the text ComfyUI shows on
the node out (optimizations/image_compare.py computes)."""
from ..optimizations.image_compare import compare_batches

SIZE_FIX = ("scale one to the other's size first (core 'Upscale Image' to the other's width and height) or crop "
            "both alike")


def compare_images(image_a, image_b, amplify=0.0):
    heat, lines = compare_batches(image_a, image_b, float(amplify), names=("image_a", "image_b"), fix=SIZE_FIX)
    summary = "\n".join(lines)
    return {"ui": {"text": [summary]}, "result": (heat, summary)}
