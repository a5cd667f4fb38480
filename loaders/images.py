"""Image files in, as ComfyUI's LoadImage reads them: EXIF orientation applied, colour as RGB (alpha dropped),
values on a 0..1 scale. Grayscale files stay one channel (16-bit ones keep their 16 bits)."""
import os

import numpy as np
import torch

GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def read_image(path) -> torch.Tensor:
    """The image at `path` as a float64 [H, W, C] tensor in 0..1 (C: 1 for grayscale, else 3); ValueError naming
    the file when it is missing or no image."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    path = os.fspath(path)
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I", "I;16", "I;16B", "I;16L"):
                arr = np.asarray(im, dtype=np.float64) / 65535.0
            elif im.mode == "F":
                arr = np.asarray(im, dtype=np.float64)
            elif im.mode in GRAY_MODES:
                arr = np.asarray(im.convert("L"), dtype=np.float64) / 255.0
            else:
                arr = np.asarray(im.convert("RGB"), dtype=np.float64) / 255.0
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file — check the path") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not an image this Python can read ({type(e).__name__}) — pass a PNG, JPEG or "
                         "WebP file") from None
    t = torch.from_numpy(np.ascontiguousarray(arr))
    return t.unsqueeze(-1) if t.dim() == 2 else t


def same_channels(a: torch.Tensor, b: torch.Tensor):
    """A grayscale image next to a colour one is compared as gray in all three channels."""
    if a.shape[-1] == 1 and b.shape[-1] == 3:
        a = a.expand(*a.shape[:-1], 3)
    elif b.shape[-1] == 1 and a.shape[-1] == 3:
        b = b.expand(*b.shape[:-1], 3)
    return a, b
