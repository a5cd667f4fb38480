"""LowVRAMTiledVAEDecode / LowVRAMTiledVAEEncode: seam-free single-pass tiled VAE for ComfyUI.

Thin adapters around ``optimizations/tiling.py``. They do what core ``VAEDecode`` / ``VAEEncode`` do around the
network — ``load_models_gpu``, ``vae_encode_crop_pixels``, ``process_input`` / ``process_output``, the VAE's dtype,
devices and ``first_stage_model.decode/encode`` (post_quant_conv, regularizer mean, latent batch-norm where the VAE
has them) — and swap only the encoder's / decoder's ``forward`` for the tiled one while the call runs. LATENT
tensors hold raw VAE-space latents (the model's latent_format scale/shift is applied inside the sampler), so, like
core, nothing here rescales them.
"""
import contextlib
import logging

import torch

from ..optimizations import tiling

CATEGORY = "Kontext LowVRAM/vae"
log = logging.getLogger("kontext_lowvram")

TILE_TOOLTIP = ("Tile side in image pixels. 0 = auto: the largest tile whose working set fits the VRAM that is free "
                "after the VAE is loaded (or 'vram_budget_mb'); on a CPU-only machine 512. Smaller tiles use less "
                "memory and give the same result: the tiles share GroupNorm statistics and a 1-pixel halo, so there "
                "are no seams at any size.")
BUDGET_TOOLTIP = ("VRAM budget in MiB for the working memory (feature maps and tiles). 0 = whatever is free on the "
                  "GPU after loading the VAE. With tile_size 0 the tiles are sized to it; intermediate feature maps "
                  "move to system RAM when they would take more than half of it.")


TILE_INPUT = {"tile_size": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 8, "tooltip": TILE_TOOLTIP})}
BUDGET_INPUT = {"vram_budget_mb": ("INT", {"default": 0, "min": 0, "max": 1 << 20, "step": 64, "tooltip": BUDGET_TOOLTIP})}


def _budget_bytes(vae, vram_budget_mb):
    """The byte budget to plan with: the user's, or (GPU) the free VRAM as ComfyUI counts it; None on CPU."""
    if vram_budget_mb and vram_budget_mb > 0:
        return int(vram_budget_mb) * 2 ** 20
    import comfy.model_management as mm

    dev = torch.device(vae.device)
    if dev.type == "cpu":
        return None
    patcher = getattr(vae, "patcher", None)
    get_free = getattr(patcher, "get_free_memory", None)  # v0.29 (dynamic VRAM aware)
    free = get_free(dev) if get_free is not None else mm.get_free_memory(dev)
    return int(free * tiling.FREE_MEMORY_FRACTION)


def _reserve_bytes(vram_budget_mb, prog, dtype, device):
    """What to ask load_models_gpu to keep free next to the VAE: the user's budget, else room for 512-px tiles."""
    if vram_budget_mb and vram_budget_mb > 0:
        return int(vram_budget_mb) * 2 ** 20
    pl = tiling.plan(prog, device=device, dtype=dtype, tile_size=tiling.DEFAULT_CPU_TILE, storage="cpu")
    return pl.est_tile_bytes


def comfy_norm_params(module, like):
    """GroupNorm weight/bias (float32, on ``like``'s device) through ComfyUI's own weight casting, so offloaded,
    dynamically loaded or patched VAE weights read the same as in the module's forward."""
    cast = (getattr(module, "comfy_cast_weights", False) or len(getattr(module, "weight_function", ()) or ()) > 0
            or len(getattr(module, "bias_function", ()) or ()) > 0)
    if not cast:
        return tiling.default_norm_params(module, like)
    import comfy.ops

    try:
        w, b, handle = comfy.ops.cast_bias_weight(module, like, offloadable=True)
    except TypeError:  # v0.3.x: no offloadable / uncast
        w, b = comfy.ops.cast_bias_weight(module, like)
        handle = None
    w2 = None if w is None else w.to(torch.float32, copy=True)
    b2 = None if b is None else b.to(torch.float32, copy=True)
    if handle is not None and hasattr(comfy.ops, "uncast_bias_weight"):
        comfy.ops.uncast_bias_weight(module, w, b, handle)
    return w2, b2


@contextlib.contextmanager
def _forward_swapped(module, fn):
    """Route ``module(...)`` to ``fn`` on this instance only, for the duration of the block."""
    had = "forward" in module.__dict__
    old = module.__dict__.get("forward")
    module.forward = fn
    try:
        yield
    finally:
        if had:
            module.forward = old
        else:
            del module.forward


def _device_context(mm, device):
    ctx = getattr(mm, "cuda_device_context", None)  # v0.29
    return ctx(device) if ctx is not None else contextlib.nullcontext()


def _output_dtype(vae):
    f = getattr(vae, "vae_output_dtype", None)  # v0.29: intermediate dtype; v0.3.x: float32
    return f() if f is not None else torch.float32


class _Progress:
    def __init__(self):
        import comfy.model_management as mm
        import comfy.utils

        self.mm = mm
        self.utils = comfy.utils
        self.bar = None

    def __call__(self, done, total):
        self.mm.throw_exception_if_processing_interrupted()
        if self.bar is None:
            self.bar = self.utils.ProgressBar(total)
        self.bar.update_absolute(done, total)


def _tiled_forward(module, kind, tile_size, vram_budget_mb, vae, out_device):
    """A replacement ``forward(x)`` that plans with the VAE's live memory state and runs the tiled program."""
    progress = _Progress()
    original = type(module).forward
    info = {}

    def forward(x, **kwargs):
        if kwargs or x.ndim != 4:  # options only the original implements
            return original(module, x, **kwargs)
        prog = (tiling.decoder_program if kind == "decode" else tiling.encoder_program)(module, x.shape)
        budget = _budget_bytes(vae, vram_budget_mb)
        pl = tiling.plan(prog, device=vae.device, dtype=x.dtype, tile_size=tile_size or None, budget_bytes=budget)
        info["plan"] = pl.describe()
        log.info("Kontext LowVRAM tiled VAE %s: %s", kind, info["plan"])
        return tiling.run(pl, x, norm_params=comfy_norm_params, progress=progress,
                          out_device=out_device if out_device is not None else vae.device)
    return forward, info


class LowVRAMTiledVAEDecode:
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
                "vae": ("VAE", {"tooltip": "The VAE to decode with (FLUX 16-channel AE or any SD-style "
                                           "AutoencoderKL)."}),
                **TILE_INPUT,
            },
            "optional": dict(BUDGET_INPUT),
        }

    def decode(self, samples, vae, tile_size=0, vram_budget_mb=0):
        import comfy.model_management as mm

        if hasattr(vae, "throw_exception_if_invalid"):
            vae.throw_exception_if_invalid()
        latent = samples["samples"]
        if getattr(latent, "is_nested", False):
            latent = latent.unbind()[0]
        if latent.ndim == 5 and getattr(vae, "latent_dim", 2) == 2:
            latent = latent[:, :, 0]
        fsm = vae.first_stage_model
        dec = getattr(fsm, "decoder", None)
        comp = vae.spacial_compression_decode()
        dec_shape = None
        if dec is not None and latent.ndim == 4 and hasattr(dec, "up") and hasattr(dec, "conv_in"):
            div = 2 ** max(0, len(dec.up) - 1)
            dec_shape = (dec.conv_in.in_channels, latent.shape[2] * comp // div, latent.shape[3] * comp // div)
        if dec_shape is None or not tiling.supports_decoder(dec, dec_shape):
            log.warning("Kontext LowVRAM tiled VAE decode: this VAE is not a 2-D LDM decoder; using core tiled decode")
            ts = tile_size or 512
            images = vae.decode_tiled(latent, tile_x=ts // comp, tile_y=ts // comp, overlap=max(1, ts // 8) // comp)
            return (images.reshape(-1, *images.shape[-3:]) if images.ndim == 5 else images,)

        prog = tiling.decoder_program(dec, dec_shape)
        reserve = _reserve_bytes(vram_budget_mb, prog, vae.vae_dtype, vae.device)
        mm.load_models_gpu([vae.patcher], memory_required=reserve,
                           force_full_load=getattr(vae, "disable_offload", False))
        forward, _info = _tiled_forward(dec, "decode", tile_size, vram_budget_mb, vae, vae.output_device)
        with _device_context(mm, vae.device), _forward_swapped(dec, forward):
            z = latent.to(device=vae.device, dtype=vae.vae_dtype)
            out = fsm.decode(z)
            del z
        out = out.to(device=vae.output_device, dtype=_output_dtype(vae))
        images = vae.process_output(out).movedim(1, -1)
        if images.ndim == 5:
            images = images.reshape(-1, *images.shape[-3:])
        return (images,)


class LowVRAMTiledVAEEncode:
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
                "vae": ("VAE", {"tooltip": "The VAE to encode with (FLUX 16-channel AE or any SD-style "
                                           "AutoencoderKL)."}),
                **TILE_INPUT,
            },
            "optional": dict(BUDGET_INPUT),
        }

    def encode(self, pixels, vae, tile_size=0, vram_budget_mb=0):
        import comfy.model_management as mm

        if hasattr(vae, "throw_exception_if_invalid"):
            vae.throw_exception_if_invalid()
        pixels = pixels[..., :getattr(vae, "output_channels", 3)]
        pixels = vae.vae_encode_crop_pixels(pixels)
        fsm = vae.first_stage_model
        enc = getattr(fsm, "encoder", None)
        x_shape = (pixels.shape[-1], pixels.shape[1], pixels.shape[2])
        if enc is None or pixels.ndim != 4 or getattr(vae, "latent_dim", 2) != 2 or \
                not tiling.supports_encoder(enc, x_shape):
            log.warning("Kontext LowVRAM tiled VAE encode: this VAE is not a 2-D LDM encoder; using core tiled encode")
            ts = tile_size or 512
            return ({"samples": vae.encode_tiled(pixels, tile_x=ts, tile_y=ts, overlap=max(8, ts // 8))},)

        prog = tiling.encoder_program(enc, x_shape)
        reserve = _reserve_bytes(vram_budget_mb, prog, vae.vae_dtype, vae.device)
        mm.load_models_gpu([vae.patcher], memory_required=reserve,
                           force_full_load=getattr(vae, "disable_offload", False))
        # the image stays in system memory: the tiles read their windows from it
        x = vae.process_input(pixels.movedim(-1, 1)).to(dtype=vae.vae_dtype)
        forward, _info = _tiled_forward(enc, "encode", tile_size, vram_budget_mb, vae, None)
        with _device_context(mm, vae.device), _forward_swapped(enc, forward):
            out = fsm.encode(x)
            del x
        samples = out.to(device=vae.output_device, dtype=_output_dtype(vae))
        fmt = getattr(vae, "format_encoded", None)  # v0.29
        if fmt is not None:
            samples = fmt(samples)
        return ({"samples": samples},)
