"""The seam-free tiled VAE (optimizations/tiling.py) inside the host's VAE.

Does what core ``VAEDecode`` / ``VAEEncode`` do around the network — ``load_models_gpu``,
``vae_encode_crop_pixels``, ``process_input`` / ``process_output``, the VAE's dtype, devices and
``first_stage_model.decode/encode`` (post_quant_conv, regularizer mean, latent batch-norm where the VAE has them) —
and swaps only the encoder's / decoder's ``forward`` for the tiled one while the call runs. LATENT tensors hold raw
VAE-space latents (the model's latent_format scale/shift is applied inside the sampler), so, like core, nothing here
rescales them.
"""
import contextlib
import logging

import torch

from ..optimizations import oom, tiling
from . import compat, report

log = logging.getLogger("kontext_lowvram")


def _budget_bytes(vae, vram_budget_mb):
    """The byte budget to plan with: the user's, or (GPU) the free VRAM as ComfyUI counts it; None on CPU."""
    if vram_budget_mb and vram_budget_mb > 0:
        return int(vram_budget_mb) * 2 ** 20
    dev = torch.device(vae.device)
    if dev.type == "cpu":
        return None
    free = compat.free_memory(getattr(vae, "patcher", None), dev)
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
    w, b, handle = compat.cast_bias_weight(module, like)
    w2 = None if w is None else w.to(torch.float32, copy=True)
    b2 = None if b is None else b.to(torch.float32, copy=True)
    compat.uncast_bias_weight(module, w, b, handle)
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


def _tiled_forward(module, kind, tile_size, vram_budget_mb, vae, out_device, rec):
    """A replacement ``forward(x)`` that plans with the VAE's live memory state and runs the tiled program; out of
    memory, it runs again with tiles of half the side (feature maps in system RAM), down to OOM_TILE_FLOOR."""
    progress = _Progress()
    original = type(module).forward

    def forward(x, **kwargs):
        if kwargs or x.ndim != 4:  # options only the original implements
            return original(module, x, **kwargs)
        prog = (tiling.decoder_program if kind == "decode" else tiling.encoder_program)(module, x.shape)
        budget = _budget_bytes(vae, vram_budget_mb)
        first = tiling.plan(prog, device=vae.device, dtype=x.dtype, tile_size=tile_size or None, budget_bytes=budget)

        def attempt(side):
            pl = first if side is None else tiling.plan(prog, device=vae.device, dtype=x.dtype, tile_size=side,
                                                        storage="cpu")
            log.info("Kontext LowVRAM tiled VAE %s: %s", kind, pl.describe())
            return tiling.run(pl, x, norm_params=comfy_norm_params, progress=progress,
                              out_device=out_device if out_device is not None else vae.device)

        def on_retry(failure, side, smaller):
            log.warning("Kontext LowVRAM tiled VAE %s: %s with %d-px tiles; retrying with %d-px tiles", kind,
                        failure, side, smaller)
            rec.recovered(f"OOM with {side}-px tiles: retried with {smaller}-px tiles")

        return oom.retry_smaller_tiles(attempt, first.image_tile(), floor=tiling.OOM_TILE_FLOOR,
                                       free=lambda: compat.free_vram(torch.device(vae.device), keep=[vae.patcher]),
                                       on_retry=on_retry, advice=_advice(kind))
    return forward


def _advice(kind):
    return (f"Kontext LowVRAM tiled VAE {kind}: out of memory even with {tiling.OOM_TILE_FLOOR}-px tiles. Close "
            "what else uses the GPU, or use a lower resolution")


def decode(samples, vae, tile_size, vram_budget_mb):
    """The IMAGE of `samples` (a LATENT), decoded tile by tile; core's tiled decode for VAEs the tiler does not know."""
    with report.phase("VAE decode", vae.device) as rec:
        return _decode(samples, vae, tile_size, vram_budget_mb, rec)


def encode(pixels, vae, tile_size, vram_budget_mb):
    """The LATENT of `pixels` (an IMAGE), encoded tile by tile; core's tiled encode for VAEs the tiler does not know."""
    with report.phase("VAE encode", vae.device) as rec:
        return _encode(pixels, vae, tile_size, vram_budget_mb, rec)


def _decode(samples, vae, tile_size, vram_budget_mb, rec):
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
        rec.note("core tiled decode (not a 2-D LDM decoder)")
        ts = tile_size or 512
        images = vae.decode_tiled(latent, tile_x=ts // comp, tile_y=ts // comp, overlap=max(1, ts // 8) // comp)
        return images.reshape(-1, *images.shape[-3:]) if images.ndim == 5 else images

    prog = tiling.decoder_program(dec, dec_shape)
    reserve = _reserve_bytes(vram_budget_mb, prog, vae.vae_dtype, vae.device)
    mm.load_models_gpu([vae.patcher], memory_required=reserve,
                       force_full_load=getattr(vae, "disable_offload", False))
    forward = _tiled_forward(dec, "decode", tile_size, vram_budget_mb, vae, vae.output_device, rec)
    with compat.device_context(vae.device), _forward_swapped(dec, forward):
        z = latent.to(device=vae.device, dtype=vae.vae_dtype)
        out = fsm.decode(z)
        del z
    out = out.to(device=vae.output_device, dtype=compat.vae_output_dtype(vae))
    images = vae.process_output(out).movedim(1, -1)
    if images.ndim == 5:
        images = images.reshape(-1, *images.shape[-3:])
    return images


def _encode(pixels, vae, tile_size, vram_budget_mb, rec):
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
        rec.note("core tiled encode (not a 2-D LDM encoder)")
        ts = tile_size or 512
        return {"samples": vae.encode_tiled(pixels, tile_x=ts, tile_y=ts, overlap=max(8, ts // 8))}

    prog = tiling.encoder_program(enc, x_shape)
    reserve = _reserve_bytes(vram_budget_mb, prog, vae.vae_dtype, vae.device)
    mm.load_models_gpu([vae.patcher], memory_required=reserve,
                       force_full_load=getattr(vae, "disable_offload", False))
    # the image stays in system memory: the tiles read their windows from it
    x = vae.process_input(pixels.movedim(-1, 1)).to(dtype=vae.vae_dtype)
    forward = _tiled_forward(enc, "encode", tile_size, vram_budget_mb, vae, None, rec)
    with compat.device_context(vae.device), _forward_swapped(enc, forward):
        out = fsm.encode(x)
        del x
    samples = out.to(device=vae.output_device, dtype=compat.vae_output_dtype(vae))
    return {"samples": compat.format_encoded(vae, samples)}
