"""Seam-free tiled VAE (optimizations/tiling.py) against the untiled network, on CPU, without ComfyUI.

The reference is the plain-torch LDM/FLUX AutoencoderKL in tests/fixtures/vae.py, with the FLUX VAE's module names,
so the tiler walks it exactly as it walks ComfyUI's ``comfy.ldm.modules.diffusionmodules.model`` Encoder/Decoder.
"""
import math
import os
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kontext_lowvram.loaders.flux_layout import FluxVAEConfig
from kontext_lowvram.optimizations import tiling
from fixtures.vae import ResnetBlock, make_vae

torch.set_grad_enabled(False)


#: Narrow VAE with the FLUX structure (4 levels, 2 res blocks, mid attention) for fast tests.
SMALL = FluxVAEConfig(ch=16, ch_mult=(1, 2, 2, 4))
SMALL_GROUPS = 8
#: Narrower still, for the large non-multiple sizes.
TINY = FluxVAEConfig(ch=16, ch_mult=(1, 1, 2, 2))
TINY_GROUPS = 8


@pytest.fixture(scope="module")
def small_vae():
    return make_vae(SMALL, SMALL_GROUPS)


@pytest.fixture(scope="module")
def tiny_vae():
    return make_vae(TINY, TINY_GROUPS)


def psnr(a, b, peak=2.0):
    """PSNR of two decoder outputs in [-1, 1] (peak-to-peak 2)."""
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return float("inf") if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def rel_l2(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def latent(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def image(b, h, w, seed=0):
    """A smooth image with texture in [-1, 1] (what process_input feeds the encoder)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([xx, yy, 1 - 0.5 * (xx + yy)])[None].repeat(b, 1, 1, 1)
    return (base * 2 - 1 + 0.2 * torch.randn(b, 3, h, w, generator=g)).clamp(-1, 1)


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("offset", [0.0, 300.0])
def test_group_stats_over_tiles_equal_group_norm(offset):
    """Per-tile sums combined (Chan) == GroupNorm over the whole map, also with a large mean (no cancellation)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24, 37, 29, generator=g) * 0.05 + offset
    w, b = torch.randn(24, generator=g), torch.randn(24, generator=g)
    st = tiling.GroupStats(6, 24)
    for y0, y1, x0, x1 in tiling._regions(37, 29, 10):
        st.add(x[:, :, y0:y1, x0:x1])
    got = st.normalizer(w, b, 1e-6)(x)
    want = F.group_norm(x.double(), 6, w.double(), b.double(), 1e-6)
    native = F.group_norm(x, 6, w, b, 1e-6)  # torch's own float32 GroupNorm on the whole map
    err, err_native = (got.double() - want).abs().max(), (native.double() - want).abs().max()
    assert err <= max(1e-5, 1.01 * err_native), (err, err_native)
    # merging two partial accumulations gives the same statistics
    a, c = tiling.GroupStats(6, 24), tiling.GroupStats(6, 24)
    a.add(x[:, :, :20])
    c.add(x[:, :, 20:])
    m1, v1 = a.merged(c).mean_var()
    m2, v2 = st.mean_var()
    assert torch.allclose(m1, m2) and torch.allclose(v1, v2, rtol=1e-4)


@pytest.mark.parametrize("h,w,side", [(37, 29, 10), (8, 8, 8), (5, 100, 7), (64, 64, 1000)])
def test_regions_partition_the_map(h, w, side):
    cover = torch.zeros(h, w, dtype=torch.int32)
    for y0, y1, x0, x1 in tiling._regions(h, w, side):
        assert 0 < y1 - y0 <= side and 0 < x1 - x0 <= side
        cover[y0:y1, x0:x1] += 1
    assert (cover == 1).all()


def test_program_walks_the_flux_layout():
    ae = make_vae(FluxVAEConfig(), perturb=False)
    dec = tiling.decoder_program(ae.decoder, (1, 16, 16, 12))
    assert dec.image_hw == (128, 96)
    assert dec.maps[dec.output] == (3, 128, 96)
    assert [s.name for s in dec.stages if s.kind == "global"] == ["mid.attn_1"]
    assert sum(s.up for s in dec.stages) == 3
    # 2 mid + 4 x 3 up resblocks, 2 convs each; conv_in, 3 upsample convs, conv_out
    assert len([s for s in dec.stages if s.kind == "conv"]) == 2 * (2 + 12) + 1 + 3 + 1
    # every GroupNorm input is produced by a stage that gathers its statistics with the right group count
    producers = {s.out: s for s in dec.stages}
    for s in dec.stages:
        if s.norm is not None:
            assert producers[s.src].stats_groups == s.norm.num_groups == 32
    enc = tiling.encoder_program(ae.encoder, (1, 3, 128, 96))
    assert enc.maps[enc.output] == (32, 16, 12)
    assert [s.name for s in enc.stages if s.kind == "down"] == [f"down.{i}.downsample" for i in range(3)]


def test_unsupported_trees_are_refused():
    assert not tiling.supports_decoder(nn.Conv2d(4, 4, 3))
    ae = make_vae(SMALL, SMALL_GROUPS, perturb=False)
    assert tiling.supports_decoder(ae.decoder) and tiling.supports_encoder(ae.encoder)
    ae.decoder.up[1].upsample.conv = nn.Conv2d(32, 32, 3, padding=2, dilation=2)
    with pytest.raises(tiling.UnsupportedVAE, match="stride-1 'same'"):
        tiling.decoder_program(ae.decoder, (1, 16, 8, 8))

    class GatedBlock(ResnetBlock):  # same attribute names, different forward: must not be tiled as a ResnetBlock
        def forward(self, x):
            return super().forward(x) * 0.5

    ae = make_vae(SMALL, SMALL_GROUPS, perturb=False)
    old = ae.encoder.down[0].block[0]
    new = GatedBlock(old.in_channels, old.out_channels, SMALL_GROUPS)
    new.load_state_dict(old.state_dict())
    ae.encoder.down[0].block[0] = new
    assert not tiling.supports_encoder(ae.encoder)
    with pytest.raises(tiling.UnsupportedVAE, match="GatedBlock"):
        tiling.encoder_program(ae.encoder, (1, 3, 64, 64))


def test_node_swaps_forward_on_the_instance_only(small_vae):
    """The ComfyUI node routes ``decoder(...)`` to the tiled forward for one call and restores it after (also on
    errors); GroupNorm parameters of plain modules come without importing comfy."""
    from kontext_lowvram.host import vae as tiled_vae

    dec = small_vae.decoder
    z = latent((1, 16, 8, 8))
    with tiled_vae._forward_swapped(dec, lambda x: tiling.tiled_decode(dec, x, tile_size=32, uniform_tiles=True)):
        a = dec(z)
    assert "forward" not in dec.__dict__
    assert (a - dec(z)).abs().max() < 1e-4
    with pytest.raises(RuntimeError):
        with tiled_vae._forward_swapped(dec, lambda x: (_ for _ in ()).throw(RuntimeError("interrupted"))):
            dec(z)
    assert "forward" not in dec.__dict__
    w, b = tiled_vae.comfy_norm_params(dec.norm_out, torch.empty(()))
    assert torch.equal(w, dec.norm_out.weight) and torch.equal(b, dec.norm_out.bias)


# --------------------------------------------------------------------------------------------
# Decode / encode against the untiled network
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tile", [40, 4096])
def test_small_decode_matches_untiled(small_vae, tile):
    """Tile sizes that do not divide the image, down to 5-px tiles at 1/8 resolution; 4096 = one tile."""
    z = latent((1, 16, 16, 12))
    ref = small_vae.decoder(z)
    got = tiling.tiled_decode(small_vae.decoder, z, tile_size=tile, uniform_tiles=True)
    assert got.shape == ref.shape == (1, 3, 128, 96)
    assert psnr(got, ref) >= 45.0
    assert (got - ref).abs().max() < 1e-4  # exact up to float summation order


def test_decode_batch_keeps_per_sample_statistics(small_vae):
    z = torch.cat([latent((1, 16, 12, 12), 1), 3.0 * latent((1, 16, 12, 12), 2) + 1.0])
    ref = small_vae.decoder(z)
    got = tiling.tiled_decode(small_vae.decoder, z, tile_size=56, uniform_tiles=True)
    assert (got - ref).abs().max() < 1e-4


def test_decode_non_multiple_size_1000x744(tiny_vae):
    """1000x744 output (latent 125x93: odd sizes) with 200-px tiles that divide neither side."""
    z = latent((1, 16, 125, 93), 3)
    ref = tiny_vae.decoder(z)
    calls = []
    got = tiling.tiled_decode(tiny_vae.decoder, z, tile_size=200, uniform_tiles=True,
                              progress=lambda d, t: calls.append((d, t)))
    assert got.shape == (1, 3, 1000, 744)
    p = psnr(got, ref)
    print(f"\ndecode 1000x744 tiled(200) vs untiled: PSNR {p:.1f} dB, max |d| {(got - ref).abs().max():.2e}")
    assert p >= 45.0
    assert calls and calls[-1][0] == calls[-1][1] and [d for d, _ in calls] == sorted(d for d, _ in calls)


@pytest.mark.parametrize("hw,tile,cfg", [((136, 104), 48, "small"), ((100, 76), 40, "small"),
                                         ((1000, 744), 320, "tiny")])
def test_encode_matches_untiled(small_vae, tiny_vae, hw, tile, cfg):
    """Encode, including sizes that are not multiples of 8 (the stride-2 downsample's right/bottom pad)."""
    vae = small_vae if cfg == "small" else tiny_vae
    x = image(1, *hw)
    ref = vae.encoder(x)
    got = tiling.tiled_encode(vae.encoder, x, tile_size=tile, uniform_tiles=True)
    assert got.shape == ref.shape
    mean_got, mean_ref = got.chunk(2, 1)[0], ref.chunk(2, 1)[0]  # the latent a VAE Encode returns
    assert rel_l2(mean_got, mean_ref) <= 1e-3
    assert rel_l2(got, ref) <= 1e-5


def test_budget_picks_tiles_and_stays_exact(small_vae):
    z = latent((1, 16, 24, 24), 4)
    prog = tiling.decoder_program(small_vae.decoder, z.shape)
    big = tiling.plan(prog, device="cpu", dtype=torch.float32, budget_bytes=1 << 34)
    small = tiling.plan(prog, device="cpu", dtype=torch.float32, budget_bytes=2 << 20)
    assert all(s is None for s in big.tiles)            # everything fits: one tile per stage
    assert small.num_tiles() > 4 * len(prog.stages)     # a 3 MiB budget forces real tiling
    assert small.est_tile_bytes <= 2 << 20
    ref = small_vae.decoder(z)
    got = tiling.run(small, z)
    assert (got - ref).abs().max() < 1e-4
    # uniform fixed tiles scale with each stage's resolution (image px -> stage px) ...
    uni = tiling.plan(prog, device="cpu", dtype=torch.float32, tile_size=64, uniform_tiles=True)
    sides = {prog.maps[s.out][1]: t for s, t in zip(prog.stages, uni.tiles) if s.kind == "conv"}
    assert sides == {24: 8, 48: 16, 96: 32, 192: 64}
    # ... while the default turns the tile size into its peak working set: same peak, far fewer tiles
    eq = tiling.plan(prog, device="cpu", dtype=torch.float32, tile_size=64)
    assert eq.est_tile_bytes <= uni.est_tile_bytes and eq.num_tiles() < uni.num_tiles() / 2
    assert (tiling.run(eq, z) - ref).abs().max() < 1e-4


def test_storage_moves_to_host_when_maps_exceed_half_the_budget(small_vae):
    """Planning only (no GPU needed): on a CUDA device the feature maps stay in VRAM if they are small against
    the budget, else they live in host memory and the whole budget goes to tiles."""
    prog = tiling.decoder_program(small_vae.decoder, (1, 16, 128, 128))
    peak = prog.storage_peak_bytes(2)
    roomy = tiling.plan(prog, device="cuda", dtype=torch.bfloat16, budget_bytes=4 * peak)
    tight = tiling.plan(prog, device="cuda", dtype=torch.bfloat16, budget_bytes=peak)
    assert roomy.storage == torch.device("cuda") and tight.storage == torch.device("cpu")
    assert roomy.est_device_bytes <= 4 * peak and tight.est_device_bytes <= peak
    forced = tiling.plan(prog, device="cuda", dtype=torch.bfloat16, budget_bytes=peak, storage="device")
    assert forced.storage.type == "cuda"


def test_bf16_tiled_is_as_accurate_as_untiled(small_vae):
    """In bf16 (the GPU dtype) tiled and untiled differ by bf16 rounding, not by tiling: against the fp32 network
    the tiled bf16 decode/encode is as accurate as the untiled bf16 one."""
    vb = make_vae(SMALL, SMALL_GROUPS).to(torch.bfloat16)
    z = latent((1, 16, 16, 12))
    ref32, refb = small_vae.decoder(z), vb.decoder(z.bfloat16())
    gotb = tiling.tiled_decode(vb.decoder, z.bfloat16(), tile_size=40, uniform_tiles=True)
    assert gotb.dtype == torch.bfloat16
    assert psnr(gotb, ref32) >= psnr(refb, ref32) - 1.0
    assert psnr(gotb, refb) >= 45.0
    x = image(1, 128, 96)
    e32, eb = small_vae.encoder(x), vb.encoder(x.bfloat16())
    got = tiling.tiled_encode(vb.encoder, x.bfloat16(), tile_size=40, uniform_tiles=True)
    assert rel_l2(got, e32) <= 1.1 * rel_l2(eb, e32)


def test_norm_params_hook_is_used(small_vae):
    """Hosts whose weights live elsewhere (ComfyUI cast ops) supply GroupNorm affine parameters via a hook."""
    seen = []

    def hook(module, like):
        seen.append(module)
        return tiling.default_norm_params(module, like)

    z = latent((1, 16, 8, 8))
    got = tiling.tiled_decode(small_vae.decoder, z, tile_size=32, norm_params=hook, uniform_tiles=True)
    assert (got - small_vae.decoder(z)).abs().max() < 1e-4
    n_norms = sum(isinstance(m, nn.GroupNorm) for m in small_vae.decoder.modules()) - 1  # attn norm runs inside
    assert len(seen) == n_norms


def test_flux_vae_full_width():
    """Real FLUX VAE layout and width (ch 128, mult 1,2,4,4, 32 groups): decode 16x12 -> 128x96 and encode
    128x96 with 56-px tiles at every stage (7-px tiles on the latent)."""
    ae = make_vae(FluxVAEConfig())
    z = latent((1, 16, 16, 12), 5)
    ref = ae.decoder(z)
    got = tiling.tiled_decode(ae.decoder, z, tile_size=56, uniform_tiles=True)
    p = psnr(got, ref)
    print(f"\nFLUX VAE decode 128x96 tiled(56) vs untiled: PSNR {p:.1f} dB, max |d| {(got - ref).abs().max():.2e}")
    assert got.shape == (1, 3, 128, 96) and p >= 45.0
    x = image(1, 128, 96, 6)
    ref = ae.encoder(x).chunk(2, 1)[0]
    got = tiling.tiled_encode(ae.encoder, x, tile_size=56, uniform_tiles=True).chunk(2, 1)[0]
    r = rel_l2(got, ref)
    print(f"FLUX VAE encode 128x96 tiled(56) vs untiled: rel-L2 {r:.2e}")
    assert r <= 1e-3


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("KLV_SLOW_TESTS"), reason="full-width FLUX VAE at 1024x1024 on CPU: ~10 TFLOP "
                    "per decode, minutes on 2 cores; set KLV_SLOW_TESTS=1")
def test_flux_vae_full_width_1024():
    """The full-size bound: FLUX VAE decode 128x128 -> 1024x1024 with 384-px tiles (not a divisor of 1024),
    and encode 1024x1024 with 384-px tiles."""
    ae = make_vae(FluxVAEConfig())
    z = latent((1, 16, 128, 128), 5)
    t0 = time.perf_counter()
    ref = ae.decoder(z)
    t1 = time.perf_counter()
    got = tiling.tiled_decode(ae.decoder, z, tile_size=384)
    t2 = time.perf_counter()
    p = psnr(got, ref)
    print(f"\nFLUX VAE decode 1024x1024 tiled(384) vs untiled: PSNR {p:.1f} dB, max |d| {(got - ref).abs().max():.2e}"
          f" (untiled {t1 - t0:.0f} s, tiled {t2 - t1:.0f} s)")
    assert got.shape == (1, 3, 1024, 1024) and p >= 45.0
    x = (ref.clamp(-1, 1)).contiguous()
    del ref, got
    t0 = time.perf_counter()
    ref = ae.encoder(x).chunk(2, 1)[0]
    t1 = time.perf_counter()
    got = tiling.tiled_encode(ae.encoder, x, tile_size=384).chunk(2, 1)[0]
    t2 = time.perf_counter()
    r = rel_l2(got, ref)
    print(f"FLUX VAE encode 1024x1024 tiled(384) vs untiled: rel-L2 {r:.2e} "
          f"(untiled {t1 - t0:.0f} s, tiled {t2 - t1:.0f} s)")
    assert r <= 1e-3
