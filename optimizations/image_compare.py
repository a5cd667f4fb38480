"""How far apart two images are: PSNR, SSIM (Wang et al. 2004) and mean absolute difference, in plain torch, and a
heat map of where they differ. Images are float tensors on a 0..1 scale (ComfyUI's IMAGE values): one image is
[H, W] or [H, W, C]; a batch is [B, H, W, C].

SSIM is scikit-image's `structural_similarity(a, b, channel_axis=-1, data_range=1.0, gaussian_weights=True,
sigma=1.5, use_sample_covariance=False)`: an 11 x 11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, population
covariances, the window's radius cropped from the SSIM map before its mean, per channel, channels averaged.
Cropping the radius leaves exactly the pixels whose window lies inside the image, so a convolution without padding
gives the same map.
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

SSIM_SIGMA = 1.5
SSIM_RADIUS = int(3.5 * SSIM_SIGMA + 0.5)  # scipy's truncation at 3.5 sigma, as scikit-image sets it: 11 taps
SSIM_K1, SSIM_K2 = 0.01, 0.03
SIZE_FIX = "resize or crop one of them to the other's size first"


class Comparison(NamedTuple):
    psnr: float  # dB; inf for identical images
    ssim: float  # 1.0 for identical images
    mean_abs: float  # on the 0..1 scale
    max_abs: float


def as_hwc(img) -> torch.Tensor:
    """One image as a float64 [H, W, C] CPU tensor."""
    t = torch.as_tensor(img).detach().to("cpu", torch.float64)
    if t.dim() == 2:
        t = t.unsqueeze(-1)
    if t.dim() != 3:
        raise ValueError(f"expected one image of shape [H, W] or [H, W, C], got shape {tuple(t.shape)}")
    return t


def size_text(shape) -> str:
    """'512x768, 3 channels' for an [H, W, C] (or [B, H, W, C]) shape."""
    h, w, c = shape[-3:]
    return f"{w}x{h}, {c} channel{'s' if c != 1 else ''}"


def check_same_size(a, b, names=("image a", "image b"), fix=SIZE_FIX):
    if tuple(a.shape[-3:]) != tuple(b.shape[-3:]):
        raise ValueError(f"{names[0]} is {size_text(a.shape)} and {names[1]} is {size_text(b.shape)}: the "
                         f"comparison needs two images of the same size and channels — {fix}")


def _pair(a, b):
    a, b = as_hwc(a), as_hwc(b)
    check_same_size(a, b)
    return a, b


def psnr(a, b, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over all pixels and channels; inf when the images are identical."""
    a, b = _pair(a, b)
    mse = float(torch.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def gaussian_window() -> torch.Tensor:
    x = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return g / g.sum()


def ssim(a, b, data_range: float = 1.0) -> float:
    """Mean structural similarity, per channel, channels averaged (see the module docstring)."""
    a, b = _pair(a, b)
    h, w, _ = a.shape
    win = 2 * SSIM_RADIUS + 1
    if min(h, w) < win:
        raise ValueError(f"SSIM needs images of at least {win}x{win} pixels (its Gaussian window), these are {w}x{h}")
    g = gaussian_window()
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    per_channel = []
    for x, y in zip(a.unbind(-1), b.unbind(-1)):  # one channel at a time: five float64 maps, not fifteen
        maps = torch.stack([x, y, x * x, y * y, x * y]).unsqueeze(1)  # [5, 1, H, W]
        maps = F.conv2d(F.conv2d(maps, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))
        ux, uy, uxx, uyy, uxy = maps[:, 0]
        vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
        per_channel.append(float(s.mean()))
    return sum(per_channel) / len(per_channel)


def compare(a, b, data_range: float = 1.0) -> Comparison:
    a, b = _pair(a, b)
    d = (a - b).abs()
    return Comparison(psnr(a, b, data_range), ssim(a, b, data_range), float(d.mean()), float(d.max()))


def auto_gain(max_abs: float) -> float:
    """The gain that shows the largest difference as white (1 when there is none)."""
    return 1.0 / max_abs if max_abs > 0 else 1.0


def heat_map(a, b, gain: float) -> torch.Tensor:
    """|a - b| (the largest over channels) times `gain`, through a black-red-yellow-white scale, as a float32
    [H, W, 3] image."""
    a, b = _pair(a, b)
    t = ((a - b).abs().amax(-1) * gain).clamp(0, 1)
    return torch.stack([(3 * t).clamp(0, 1), (3 * t - 1).clamp(0, 1), (3 * t - 2).clamp(0, 1)], -1).float()


def summary_lines(c: Comparison, data_range: float = 1.0) -> list:
    """A comparison in plain words and numbers (what the node shows and `kontext-lowvram compare` prints)."""
    levels = 255 / data_range
    return [
        "PSNR: inf dB (the images are identical)" if math.isinf(c.psnr) else f"PSNR: {c.psnr:.2f} dB",
        f"SSIM: {c.ssim:.5f}",
        f"mean |a-b|: {c.mean_abs:.5f} ({c.mean_abs * levels:.2f} of 255)",
        f"max |a-b|: {c.max_abs:.5f} ({c.max_abs * levels:.1f} of 255)",
    ]


def compare_batches(a, b, amplify: float = 0.0, names=("image a", "image b"), fix=SIZE_FIX):
    """Two [B, H, W, C] batches (or one image against each of a batch) -> (heat maps [B, H, W, 3], summary lines).
    `amplify` multiplies |a - b| for the heat map; 0 picks the gain that shows the largest difference as white, one
    gain for the whole batch so the maps compare."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    a, b = (t if t.dim() == 4 else as_hwc(t).unsqueeze(0) for t in (a, b))
    check_same_size(a, b, names, fix)
    n = max(len(a), len(b))
    if len(a) not in (1, n) or len(b) not in (1, n):
        raise ValueError(f"{names[0]} is a batch of {len(a)} images and {names[1]} one of {len(b)}: give batches of "
                         "the same length, or a single image to compare with each image of the other")
    pairs = [(a[i if len(a) > 1 else 0], b[i if len(b) > 1 else 0]) for i in range(n)]
    results = [compare(x, y) for x, y in pairs]
    gain = amplify if amplify > 0 else auto_gain(max(r.max_abs for r in results))
    heat = torch.stack([heat_map(x, y, gain) for x, y in pairs])
    lines = [f"size: {size_text(a.shape)}"]
    if n == 1:
        lines += summary_lines(results[0])
    else:
        for i, r in enumerate(results):
            lines.append(f"image {i + 1}: " + "; ".join(summary_lines(r)))
        mean = Comparison(*(sum(getattr(r, f) for r in results) / n for f in Comparison._fields))
        lines.append(f"mean of {n}: " + "; ".join(summary_lines(mean)))
    white = 1.0 / gain
    lines.append(f"heat map: white = a difference of {white:.4g} or more ({white * 255:.3g} of 255; gain {gain:.3g})")
    return heat, lines
