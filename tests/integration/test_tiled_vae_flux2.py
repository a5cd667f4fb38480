"""LowVRAMTiledVAEDecode / LowVRAMTiledVAEEncode on a FLUX.2 VAE (32-channel AE, 2x2-patchified 128-channel latent
with batch-norm statistics, /16) in a real ComfyUI, against core VAEDecode / VAEEncode (untiled).

The random VAE is written in the original FLUX.2 layout (tests/fixtures/flux2_vae.py: ``encoder.quant_conv``,
``decoder.post_quant_conv``, ``bn.running_mean/var``); core's VAELoader detects it as FLUX.2's (``batch_norm_latent``)
and our nodes leave everything around the encoder/decoder network (quant convs, regulariser, batch-norm, 2x2
(un)patchify) to the host's own ``first_stage_model.encode/decode``, so only the tiling is ours.

Graph: LoadImage -> ImageScale (W x H) -> VAEEncode (core) -> {LowVRAMTiledVAEDecode, VAEDecode} ->
KLVSaveImageTensor (float32), and the scaled image -> LowVRAMTiledVAEEncode -> SaveLatent next to core's latent.
ComfyUI v0.3.64 predates FLUX.2: skipped there.
"""
import pytest

import comfy_harness as H
from fixtures.flux2_vae import random_flux2_vae_state_dict
from test_tiled_vae import _assert_tiled, psnr, rel_l2

ROOT = H.comfy_root_from_env()
VERSION = H.comfy_version(ROOT) if ROOT else "?"
HOST_HAS_FLUX2_VAE = H.host_has(ROOT, "comfy/sd.py", "batch_norm_latent")
pytestmark = pytest.mark.skipif(not HOST_HAS_FLUX2_VAE, reason=H.predates_reason(ROOT))

W, H_ = 256, 192     # latent 16 x 12 (128 ch); decoder input 32 x 24 (32 ch): 4 x 3 tiles of 64 px
TILE = 64
VAE_FILE = "klv_flux2_vae.safetensors"


@pytest.fixture(scope="module")
def flux2_vae(comfy) -> str:
    H.save_safetensors(random_flux2_vae_state_dict(seed=11), comfy.models_dir / "vae" / VAE_FILE)
    return VAE_FILE


def graph(vae_name: str, prefix: str, *, tile: int, budget_mb: int = 0) -> dict:
    n = H.node
    return {
        "vae": n("VAELoader", vae_name=vae_name),
        "load_image": n("LoadImage", image=H.INPUT_IMAGE),
        "scale": n("ImageScale", image=["load_image", 0], upscale_method="bilinear", width=W, height=H_,
                   crop="disabled"),
        "encode": n("VAEEncode", pixels=["scale", 0], vae=["vae", 0]),
        "save_latent": n("SaveLatent", samples=["encode", 0], filename_prefix=f"{prefix}/core_enc"),
        "dec_core": n("VAEDecode", samples=["encode", 0], vae=["vae", 0]),
        "save_core": n("KLVSaveImageTensor", images=["dec_core", 0], filename_prefix=f"{prefix}/core"),
        "dec_ours": n("LowVRAMTiledVAEDecode", samples=["encode", 0], vae=["vae", 0], tile_size=tile,
                      vram_budget_mb=budget_mb),
        "save_ours": n("KLVSaveImageTensor", images=["dec_ours", 0], filename_prefix=f"{prefix}/ours"),
        "enc_ours": n("LowVRAMTiledVAEEncode", pixels=["scale", 0], vae=["vae", 0], tile_size=tile,
                      vram_budget_mb=budget_mb),
        "save_enc_ours": n("SaveLatent", samples=["enc_ours", 0], filename_prefix=f"{prefix}/ours_enc"),
    }


def _check(comfy, out, label):
    core = comfy.saved_image_tensor(out, "save_core")
    ours = comfy.saved_image_tensor(out, "save_ours")
    assert ours.shape == core.shape == (1, H_, W, 3)
    lat_core = comfy.saved_latent(out, "save_latent")
    lat_ours = comfy.saved_latent(out, "save_enc_ours")
    assert lat_core.shape == (1, 128, H_ // 16, W // 16), "core did not load the file as the FLUX.2 VAE"
    assert lat_ours.shape == lat_core.shape
    p, r = psnr(ours, core), rel_l2(lat_ours, lat_core)
    spread = (core.max() - core.min()).item()
    msg = (f"\n[ComfyUI {comfy.version}, FLUX.2 VAE, {label}, {W}x{H_}] decode PSNR vs core VAEDecode {p:.1f} dB "
           f"(max |d| {(ours - core).abs().max():.1e}, image range {spread:.2f}); encode rel-L2 vs core VAEEncode "
           f"{r:.1e}")
    print(msg)
    assert spread > 0.05, "decoded image is flat: the test VAE does not exercise anything" + msg
    assert p >= 45.0, msg
    assert r <= 1e-3, msg


def test_flux2_tiled_decode_encode_match_untiled(comfy, flux2_vae):
    since = len(comfy.log_text())
    out = comfy.run(graph(flux2_vae, "tiled_vae_flux2", tile=TILE), timeout=1200)
    _check(comfy, out, f"tile_size {TILE}")
    _assert_tiled(comfy, since)


def test_flux2_budget_mode(comfy, flux2_vae):
    """Auto tile size from an 8 MiB VRAM budget (honoured on CPU too): many tiles, same result."""
    since = len(comfy.log_text())
    out = comfy.run(graph(flux2_vae, "tiled_vae_flux2_budget", tile=0, budget_mb=8), timeout=1200)
    _check(comfy, out, "tile_size auto, 8 MiB budget")
    _assert_tiled(comfy, since)
