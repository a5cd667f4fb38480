"""LowVRAMTiledVAEDecode / LowVRAMTiledVAEEncode in a real ComfyUI, against core VAEDecode / VAEEncode (untiled)
and core VAEDecodeTiled / VAEEncodeTiled, on the random FLUX VAE (real layout) the harness writes.

Graph: LoadImage -> ImageScale (W x H) -> VAEEncode (core) -> {LowVRAMTiledVAEDecode, VAEDecode, VAEDecodeTiled}
-> KLVSaveImageTensor (float32 safetensors: PNG's 8 bits would hide the differences), and the scaled image ->
{LowVRAMTiledVAEEncode, VAEEncodeTiled} -> SaveLatent next to core VAEEncode's latent.
"""
import math
import re

import pytest
import torch

import comfy_harness as H
from fixtures.flux import perturb_vae_affine

W, H_ = 256, 192     # 4 x 3 tiles of 64 px at every stage (8-px tiles on the 32 x 24 latent)
TILE = 64
PERTURBED_VAE = "klv_flux_vae_affine.safetensors"


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0) -> float:
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def affine_vae(comfy) -> str:
    """A random FLUX VAE whose GroupNorms have non-trivial weight/bias and whose convs have biases (the harness
    VAE has GroupNorm weight 1 / bias 0, which would not exercise the affine part of the tiled GroupNorm)."""
    sd = perturb_vae_affine(H.random_flux_vae_state_dict(seed=7), seed=8)
    H.save_safetensors(sd, comfy.models_dir / "vae" / PERTURBED_VAE)
    return PERTURBED_VAE


def vae_graph(vae_name: str, prefix: str, *, tile: int = TILE, budget_mb: int = 0, core_tiled: bool = True,
              encode: bool = True) -> dict:
    n = H.node
    g = {
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
    }
    if core_tiled:
        g["dec_core_tiled"] = n("VAEDecodeTiled", samples=["encode", 0], vae=["vae", 0], tile_size=TILE,
                                overlap=16, temporal_size=64, temporal_overlap=8)
        g["save_core_tiled"] = n("KLVSaveImageTensor", images=["dec_core_tiled", 0],
                                 filename_prefix=f"{prefix}/core_tiled")
    if encode:
        g["enc_ours"] = n("LowVRAMTiledVAEEncode", pixels=["scale", 0], vae=["vae", 0], tile_size=tile,
                          vram_budget_mb=budget_mb)
        g["save_enc_ours"] = n("SaveLatent", samples=["enc_ours", 0], filename_prefix=f"{prefix}/ours_enc")
        if core_tiled:
            g["enc_core_tiled"] = n("VAEEncodeTiled", pixels=["scale", 0], vae=["vae", 0], tile_size=TILE,
                                    overlap=16, temporal_size=64, temporal_overlap=8)
            g["save_enc_core_tiled"] = n("SaveLatent", samples=["enc_core_tiled", 0],
                                         filename_prefix=f"{prefix}/core_tiled_enc")
    return g


def test_nodes_registered(comfy):
    info = comfy.object_info()
    for name in ("LowVRAMTiledVAEDecode", "LowVRAMTiledVAEEncode", "KLVSaveImageTensor"):
        assert name in info, f"{name} missing from ComfyUI {comfy.version}"
    for name in ("LowVRAMTiledVAEDecode", "LowVRAMTiledVAEEncode"):
        spec = info[name]
        assert spec["category"] == "Kontext LowVRAM/vae" and spec["description"]
        for section in ("required", "optional"):
            for inp, decl in spec["input"].get(section, {}).items():
                assert decl[1].get("tooltip"), f"{name}.{inp} has no tooltip"
    assert not comfy.custom_node_import_failed()


def _plans(comfy, kind: str, since: int) -> list:
    """(stages, tiles) of every tiled-VAE plan the node logged after byte offset ``since`` of the server log."""
    pat = rf"Kontext LowVRAM tiled VAE {kind}: (\d+) stages, (\d+) tiles"
    return [(int(a), int(b)) for a, b in re.findall(pat, comfy.log_text()[since:])]


def _check(comfy, out, label):
    core = comfy.saved_image_tensor(out, "save_core")
    ours = comfy.saved_image_tensor(out, "save_ours")
    assert ours.shape == core.shape == (1, H_, W, 3)
    p_ours = psnr(ours, core)
    lat_core = comfy.saved_latent(out, "save_latent")
    lat_ours = comfy.saved_latent(out, "save_enc_ours")
    assert lat_ours.shape == lat_core.shape == (1, 16, H_ // 8, W // 8)
    r_ours = rel_l2(lat_ours, lat_core)
    msg = (f"\n[ComfyUI {comfy.version}, {label}, {W}x{H_}] decode PSNR vs core VAEDecode: "
           f"ours {p_ours:.1f} dB (max |d| {(ours - core).abs().max():.1e})")
    if "save_core_tiled" in out:
        core_tiled = comfy.saved_image_tensor(out, "save_core_tiled")
        lat_ct = comfy.saved_latent(out, "save_enc_core_tiled")
        msg += (f", core VAEDecodeTiled {psnr(core_tiled, core):.1f} dB; encode rel-L2 vs core VAEEncode: "
                f"ours {r_ours:.1e}, core VAEEncodeTiled {rel_l2(lat_ct, lat_core):.1e}")
    else:
        msg += f"; encode rel-L2 vs core VAEEncode: ours {r_ours:.1e}"
    print(msg)
    assert p_ours >= 45.0, msg
    assert r_ours <= 1e-3, msg
    return p_ours, r_ours


def _assert_tiled(comfy, since: int) -> None:
    """Both nodes really ran tiled: more tiles than stages (the log line is the node's plan)."""
    for kind in ("decode", "encode"):
        plans = _plans(comfy, kind, since)
        assert plans, f"no tiled VAE {kind} plan in the server log"
        stages, tiles = plans[-1]
        assert tiles > stages + 10, f"{kind}: {tiles} tiles for {stages} stages: not tiled"


def test_tiled_decode_encode_match_untiled(comfy):
    since = len(comfy.log_text())
    out = comfy.run(vae_graph(H.VAE_NAME, "tiled_vae"), timeout=1200)
    _check(comfy, out, f"harness VAE, tile_size {TILE}; core tiled {TILE}/overlap 16")
    _assert_tiled(comfy, since)


def test_affine_groupnorm_vae_and_budget_mode(comfy, affine_vae):
    """Non-trivial GroupNorm affine parameters, and auto tile size from a VRAM budget (honoured on CPU too):
    an 8 MiB budget forces many tiles."""
    since = len(comfy.log_text())
    out = comfy.run(vae_graph(affine_vae, "tiled_vae_budget", tile=0, budget_mb=8, core_tiled=False),
                    timeout=1200)
    _check(comfy, out, "affine-GroupNorm VAE, tile_size auto, 8 MiB budget")
    _assert_tiled(comfy, since)
