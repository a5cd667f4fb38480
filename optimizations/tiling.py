"""Seam-free, single-pass tiled VAE encode/decode (plain PyTorch, no ComfyUI import).

Why tiles seam in the first place
---------------------------------
A VAE decoder is convolutions, GroupNorms, nearest upsampling and one spatial self-attention. Cut the latent into
tiles and run each through the whole decoder (ComfyUI core's ``decode_tiled_``) and two things go wrong at every
tile border: each GroupNorm normalises with *that tile's* mean/variance instead of the image's (a brightness/contrast
step between tiles), and the convolutions near the cut see zero padding instead of the neighbours' pixels. Core
hides this by decoding three times with differently shaped tiles, feathering the overlaps and averaging.

What this module does instead
-----------------------------
The network is run **layer by layer** (stage by stage) over the whole image, one pass per stage:

* Every intermediate feature map is materialised (on the GPU if it fits the budget, otherwise in host memory) and
  each stage is computed tile by tile, reading its input window **with a halo** of exactly the convolution's
  receptive field (1 px for a 3x3 conv; the stride-2 downsample reads ``[2y, 2y+3)``). Interior tile borders
  therefore see their real neighbours, image borders see the same zero padding the untiled network sees: the
  convolutions are exact.
* **GroupNorm is two-phase**: while a stage writes its output tiles it accumulates per-(sample, group) count, mean
  and M2 (Chan et al.'s parallel-variance combination, in float64); the next stage normalises every tile with those
  *global* statistics and the layer's own affine parameters. This is exactly ``F.group_norm`` on the full map,
  up to floating-point summation order.
* The **mid-block attention** (a single-head spatial attention over all 1/8-resolution positions in the FLUX /
  SD VAE) needs the whole map by definition, so it runs untiled on the full map. At 1/8 resolution that map is
  small (512 ch x 128 x 128 = 32 MB fp32 for a 1024² image) and the attention uses the module's own (SDPA/sliced)
  kernel, so this is the same computation the untiled VAE does.

The result matches the untiled decode to float rounding (PSNR > 100 dB in fp32 in the tests), with no
overlap averaging and no seams; each output pixel is computed once (halo recomputation is 1 px per tile side).

Modules are duck-typed on the attribute names of the LDM / ComfyUI ``Encoder`` / ``Decoder`` (``conv_in``,
``down[i].block[j]`` / ``down[i].downsample``, ``mid.block_1`` / ``attn_1`` / ``block_2``, ``up[i].block[j]`` /
``up[i].upsample``, ``norm_out``, ``conv_out``; ResnetBlock ``norm1/conv1/norm2/conv2/nin_shortcut``), and every
convolution is called *as a module*, so a host's weight casting / offloading inside ``forward`` keeps working.
GroupNorm affine parameters come from ``norm_params(module, like)`` (default: the module's ``weight``/``bias``);
a host whose weights live elsewhere (ComfyUI's cast ops) supplies its own.

Memory: the tile working set is chosen per stage from a byte budget (``auto``) or from a fixed tile size given in
image pixels; see :func:`plan`. A stage whose whole map fits one tile runs its GroupNorm module directly (no
statistics pass), so with a large budget the computation is the untiled one, stage by stage.

Not covered: 3-D / causal video VAEs, blocks of other classes than ``ResnetBlock`` / ``Upsample`` / ``Downsample``
(refused with :class:`UnsupportedVAE`, the node then falls back to core tiling), and overlap of transfers with
compute when feature maps live in host memory (copies are synchronous).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_CPU_TILE",
    "MIN_TILE",
    "OOM_TILE_FLOOR",
    "GroupStats",
    "TiledPlan",
    "UnsupportedVAE",
    "decoder_program",
    "encoder_program",
    "plan",
    "run",
    "tiled_decode",
    "tiled_encode",
    "supports_decoder",
    "supports_encoder",
    "free_device_memory",
    "default_norm_params",
]

#: Tile side (image pixels) used when ``tile_size`` is auto and there is no byte budget to fit (CPU without one).
DEFAULT_CPU_TILE = 512
#: Smallest tile side (in the stage's own pixels) auto mode goes down to.
MIN_TILE = 8
#: Smallest tile side (image pixels) an out-of-memory retry halves down to: 8 latent pixels, below which the halo
#: and per-tile overhead outweigh the memory saved.
OOM_TILE_FLOOR = 64
#: Fraction of the free device memory auto mode plans with (allocator fragmentation, conv workspaces).
FREE_MEMORY_FRACTION = 0.8
#: Auto mode keeps intermediate maps on the compute device when they take at most this share of the budget.
DEVICE_STORAGE_SHARE = 0.5


class UnsupportedVAE(ValueError):
    """The module tree is not a 2-D LDM-style Encoder/Decoder this tiler understands."""


# --------------------------------------------------------------------------------------------
# GroupNorm statistics across tiles
# --------------------------------------------------------------------------------------------

class GroupStats:
    """Per-(sample, group) count / mean / M2 over many tiles, combined exactly (Chan et al.).

    ``add(tile)`` takes an exact output tile ``[B, C, h, w]``; ``normalizer(w, b, eps)`` returns the GroupNorm
    of any tile of the same map under these global statistics.
    Tiles are reduced in float32 per group chunk and combined in float64 (float32 on MPS, which has no float64).
    """

    #: elements per float32 chunk when reducing a tile (bounds the temporary to 64 MB)
    CHUNK_ELEMS = 1 << 24

    def __init__(self, num_groups: int, channels: int):
        if channels % num_groups:
            raise UnsupportedVAE(f"GroupNorm with {channels} channels is not divisible into {num_groups} groups")
        self.groups = int(num_groups)
        self.channels = int(channels)
        self.n = 0
        self.mean: Optional[torch.Tensor] = None
        self.m2: Optional[torch.Tensor] = None

    def add(self, t: torch.Tensor) -> None:
        B, C = t.shape[:2]
        if C != self.channels:
            raise ValueError(f"stats for {self.channels} channels got a {C}-channel tile")
        cpg = C // self.groups
        hw = t.shape[2] * t.shape[3]
        if hw == 0:
            return
        acc = torch.float32 if t.device.type == "mps" else torch.float64
        gchunk = max(1, min(self.groups, self.CHUNK_ELEMS // max(1, B * cpg * hw)))
        means, vars_ = [], []
        for g0 in range(0, self.groups, gchunk):
            g1 = min(self.groups, g0 + gchunk)
            x = t[:, g0 * cpg:g1 * cpg].to(torch.float32).reshape(B, g1 - g0, cpg * hw)
            v, m = torch.var_mean(x, dim=-1, correction=0)
            means.append(m)
            vars_.append(v)
            del x
        nb = cpg * hw
        mb = torch.cat(means, 1).to(acc)
        m2b = torch.cat(vars_, 1).to(acc) * nb
        if self.mean is None:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        na = self.n
        n = na + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + m2b + delta * delta * (na * nb / n)
        self.n = n

    def merged(self, other: "GroupStats") -> "GroupStats":
        """This and ``other`` combined (tests; distributed accumulation)."""
        out = GroupStats(self.groups, self.channels)
        for s in (self, other):
            if s.mean is None:
                continue
            if out.mean is None:
                out.n, out.mean, out.m2 = s.n, s.mean.clone(), s.m2.clone()
            else:
                n = out.n + s.n
                delta = s.mean.to(out.mean.device) - out.mean
                out.mean = out.mean + delta * (s.n / n)
                out.m2 = out.m2 + s.m2.to(out.m2.device) + delta * delta * (out.n * s.n / n)
                out.n = n
        return out

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mean is None:
            raise RuntimeError("GroupStats: no tile was added")
        return self.mean, self.m2 / self.n

    def normalizer(self, weight, bias, eps: float, device=None) -> Callable[[torch.Tensor], torch.Tensor]:
        """``f(x) == F.group_norm(x, G, weight, bias, eps)`` (as float32) with these global statistics.

        Applied as ``(x - m_hi) * scale + (bias - m_lo * scale)`` with the mean split into a float32 head and
        tail, so a large mean against a small spread cancels exactly instead of losing digits in
        ``x * scale + shift``.
        """
        mean, var = self.mean_var()
        dev = device if device is not None else mean.device
        cpg = self.channels // self.groups
        rstd_c = torch.rsqrt(var + eps).repeat_interleave(cpg, dim=1)     # [B, C]
        mean_c = mean.repeat_interleave(cpg, dim=1)
        scale = rstd_c if weight is None else rstd_c * weight.to(rstd_c.device, rstd_c.dtype).reshape(1, -1)
        m_hi = mean_c.to(torch.float32)
        m_lo = (mean_c - m_hi.to(mean_c.dtype)).to(torch.float32)

        beta = -m_lo.to(scale.dtype) * scale
        if bias is not None:
            beta = beta + bias.to(beta.device, beta.dtype).reshape(1, -1)

        def col(t):
            return t.to(dev, torch.float32)[..., None, None]
        m_hi, scale, beta = col(m_hi), col(scale), col(beta)

        def apply(x: torch.Tensor) -> torch.Tensor:
            y = torch.sub(x.to(torch.float32), m_hi)  # a new tensor: the input (maybe a stored map) is untouched
            return y.mul_(scale).add_(beta)
        return apply


def default_norm_params(module: torch.nn.Module, like: torch.Tensor):
    """``(weight, bias)`` of a GroupNorm as float32 tensors on ``like``'s device (None where not affine)."""
    w = getattr(module, "weight", None)
    b = getattr(module, "bias", None)
    w = None if w is None else w.detach().to(like.device, torch.float32)
    b = None if b is None else b.detach().to(like.device, torch.float32)
    return w, b


# --------------------------------------------------------------------------------------------
# The program: a 2-D Encoder/Decoder as a list of stages over named feature maps
# --------------------------------------------------------------------------------------------

@dataclass
class Stage:
    kind: str                                   # "conv" | "down" | "global"
    name: str
    src: int                                    # input map id
    out: int                                    # output map id
    module: torch.nn.Module                     # conv / Downsample / global module (attention)
    norm: Optional[torch.nn.Module] = None      # GroupNorm (+SiLU) applied to src before the conv
    up: bool = False                            # nearest x2 before the conv (Upsample)
    res: Optional[int] = None                   # residual map added to the output
    shortcut: Optional[torch.nn.Module] = None  # conv applied to the residual first (channel change)
    post: Optional[Callable] = None             # elementwise op on the output (tanh_out)
    stats_groups: Optional[int] = None          # set when a later stage normalises `out`
    frees: tuple = ()                           # maps no longer needed after this stage


@dataclass
class Program:
    maps: dict = field(default_factory=dict)    # id -> (C, H, W)
    stages: list = field(default_factory=list)
    input: int = 0
    output: int = 0
    input_stats_groups: Optional[int] = None
    image_hw: tuple = (0, 0)                    # image-space size (tile sizes are given in image pixels)

    # ---- building --------------------------------------------------------------------------
    def _new(self, c, h, w) -> int:
        i = len(self.maps)
        self.maps[i] = (int(c), int(h), int(w))
        return i

    def _producer(self, mid: int) -> Optional[Stage]:
        for st in self.stages:
            if st.out == mid:
                return st
        return None

    def _need_stats(self, mid: int, norm) -> None:
        g = int(norm.num_groups)
        st = self._producer(mid)
        cur = st.stats_groups if st is not None else self.input_stats_groups
        if cur is not None and cur != g:
            raise UnsupportedVAE(f"map {mid} is normalised with {cur} and {g} groups")
        if st is None:
            self.input_stats_groups = g
        else:
            st.stats_groups = g

    def conv(self, src: int, conv, *, norm=None, up=False, res=None, shortcut=None, post=None, name="") -> int:
        _check_conv(conv, name)
        c, h, w = self.maps[src]
        if int(conv.in_channels) != c:
            raise UnsupportedVAE(f"{name}: conv expects {conv.in_channels} channels, map has {c}")
        if norm is not None:
            _check_norm(norm, c, name)
            self._need_stats(src, norm)
        if up:
            h, w = 2 * h, 2 * w
        out = self._new(conv.out_channels, h, w)
        if res is not None:
            rc, rh, rw = self.maps[res]
            if (rh, rw) != (h, w):
                raise UnsupportedVAE(f"{name}: residual is {rh}x{rw}, output {h}x{w}")
            if shortcut is not None:
                _check_conv(shortcut, name + ".shortcut")
                rc = shortcut.out_channels
            if rc != conv.out_channels:
                raise UnsupportedVAE(f"{name}: residual has {rc} channels, output {conv.out_channels}")
        self.stages.append(Stage("conv", name, src, out, conv, norm=norm, up=up, res=res, shortcut=shortcut,
                                 post=post))
        return out

    def upsample(self, src: int, mod, name="") -> int:
        _check_kind(mod, "upsample", name)
        sf = getattr(mod, "scale_factor", 2.0)
        sfs = tuple(sf) if isinstance(sf, (tuple, list)) else (sf, sf)
        if any(float(s) != 2.0 for s in sfs):
            raise UnsupportedVAE(f"{name}: only x2 nearest upsampling is supported (got {sf})")
        if getattr(mod, "with_conv", True):
            return self.conv(src, mod.conv, up=True, name=name + ".conv")
        c, h, w = self.maps[src]
        out = self._new(c, 2 * h, 2 * w)
        self.stages.append(Stage("conv", name, src, out, torch.nn.Identity(), up=True))
        return out

    def downsample(self, src: int, mod, name="") -> int:
        _check_kind(mod, "downsample", name)
        c, h, w = self.maps[src]
        if getattr(mod, "with_conv", True):
            conv = mod.conv
            if not isinstance(conv, torch.nn.Conv2d) or _pair(conv.kernel_size) != (3, 3) or \
                    _pair(conv.stride) != (2, 2) or _pair(conv.padding) != (0, 0) or _pair(conv.dilation) != (1, 1):
                raise UnsupportedVAE(f"{name}: expected a 3x3 stride-2 unpadded Conv2d (asymmetric-pad downsample)")
            if conv.in_channels != c:
                raise UnsupportedVAE(f"{name}: conv expects {conv.in_channels} channels, map has {c}")
            c = conv.out_channels
        out = self._new(c, h // 2, w // 2)
        self.stages.append(Stage("down", name, src, out, mod))
        return out

    def glob(self, src: int, mod, name="") -> int:
        c, h, w = self.maps[src]
        out = self._new(c, h, w)
        self.stages.append(Stage("global", name, src, out, mod))
        return out

    def resblock(self, x: int, blk, name="") -> int:
        _check_kind(blk, "resnet", name)
        # VAE ResnetBlocks run without a timestep embedding (temb_proj unused); dropout is inactive in eval mode
        drop = getattr(blk, "dropout", None)
        if drop is not None and blk.training and getattr(drop, "p", 0.0) > 0:
            raise UnsupportedVAE(f"{name}: dropout in training mode")
        for a in ("norm1", "conv1", "norm2", "conv2"):
            if not hasattr(blk, a):
                raise UnsupportedVAE(f"{name}: not a ResnetBlock (no {a})")
        h = self.conv(x, blk.conv1, norm=blk.norm1, name=name + ".conv1")
        sc = None
        if blk.conv1.in_channels != blk.conv2.out_channels:
            if getattr(blk, "use_conv_shortcut", False) and hasattr(blk, "conv_shortcut"):
                sc = blk.conv_shortcut
            else:
                sc = getattr(blk, "nin_shortcut", None)
            if sc is None:
                raise UnsupportedVAE(f"{name}: channel change without nin_shortcut/conv_shortcut")
        return self.conv(h, blk.conv2, norm=blk.norm2, res=x, shortcut=sc, name=name + ".conv2")

    def finish(self, out: int) -> "Program":
        self.output = out
        last = {}
        for i, st in enumerate(self.stages):
            for m in (st.src, st.res):
                if m is not None:
                    last[m] = i
        for i, st in enumerate(self.stages):
            st.frees = tuple(m for m, j in last.items() if j == i and m != self.output)
        return self

    # ---- shapes ----------------------------------------------------------------------------
    def storage_peak_bytes(self, elem_size: int, batch: int = 1) -> int:
        """Largest sum of live feature maps (input/residual/output of one stage and everything still needed)."""
        live = {self.input}
        peak = 0
        for st in self.stages:
            live.add(st.out)
            peak = max(peak, sum(_numel(self.maps[m]) for m in live))
            live -= set(st.frees)
        return peak * elem_size * batch


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _numel(chw) -> int:
    return chw[0] * chw[1] * chw[2]


def _check_conv(conv, name) -> None:
    if not isinstance(conv, torch.nn.Conv2d):
        raise UnsupportedVAE(f"{name}: expected a Conv2d, got {type(conv).__name__}")
    k, s, p, d = (_pair(conv.kernel_size), _pair(conv.stride), _pair(conv.padding), _pair(conv.dilation))
    if s != (1, 1) or d != (1, 1) or k[0] % 2 == 0 or k[1] % 2 == 0 or p != (k[0] // 2, k[1] // 2):
        raise UnsupportedVAE(f"{name}: only stride-1 'same' convolutions are tiled (k={k}, s={s}, p={p}, d={d})")


#: Blocks whose forward this module re-implements stage by stage. A block of another class with the same
#: attribute names may compute something else, so it is refused (the node then falls back to core tiling).
KNOWN_BLOCKS = {"resnet": ("ResnetBlock",), "upsample": ("Upsample",), "downsample": ("Downsample",)}


def _check_kind(mod, kind, name) -> None:
    if type(mod).__name__ not in KNOWN_BLOCKS[kind]:
        raise UnsupportedVAE(f"{name}: {type(mod).__name__} is not a known {kind} block {KNOWN_BLOCKS[kind]}")


def _check_norm(norm, channels, name) -> None:
    if not isinstance(norm, torch.nn.GroupNorm):
        raise UnsupportedVAE(f"{name}: expected a GroupNorm before the conv, got {type(norm).__name__}")
    if norm.num_channels != channels:
        raise UnsupportedVAE(f"{name}: GroupNorm over {norm.num_channels} channels, map has {channels}")


def decoder_program(dec, latent_shape) -> Program:
    """The stages of a 2-D LDM Decoder (``conv_in -> mid -> up[...] -> norm_out/conv_out``) for a latent of
    ``[B, C, h, w]`` (or ``(C, h, w)``)."""
    c, h, w = tuple(latent_shape)[-3:]
    for a in ("conv_in", "mid", "up", "norm_out", "conv_out"):
        if not hasattr(dec, a):
            raise UnsupportedVAE(f"not an LDM Decoder (no {a})")
    if getattr(dec, "carried", False):
        raise UnsupportedVAE("causal 3-D (video) decoders are not tiled")
    p = Program()
    x = p.input = p._new(c, h, w)
    x = p.conv(x, dec.conv_in, name="conv_in")
    x = p.resblock(x, dec.mid.block_1, "mid.block_1")
    x = p.glob(x, dec.mid.attn_1, "mid.attn_1")
    x = p.resblock(x, dec.mid.block_2, "mid.block_2")
    for i in reversed(range(len(dec.up))):
        up = dec.up[i]
        attn = getattr(up, "attn", ())
        for j, blk in enumerate(up.block):
            x = p.resblock(x, blk, f"up.{i}.block.{j}")
            if len(attn) > 0:
                x = p.glob(x, attn[j], f"up.{i}.attn.{j}")
        if i != 0 and hasattr(up, "upsample"):
            x = p.upsample(x, up.upsample, f"up.{i}.upsample")
    post = torch.tanh if getattr(dec, "tanh_out", False) else None
    x = p.conv(x, dec.conv_out, norm=dec.norm_out, post=post, name="conv_out")
    oc, oh, ow = p.maps[x]
    p.image_hw = (oh, ow)
    return p.finish(x)


def encoder_program(enc, image_shape) -> Program:
    """The stages of a 2-D LDM Encoder (``conv_in -> down[...] -> mid -> norm_out/conv_out``) for an image of
    ``[B, C, H, W]`` (or ``(C, H, W)``). The output is the encoder's raw moments (mean and logvar channels)."""
    c, h, w = tuple(image_shape)[-3:]
    for a in ("conv_in", "down", "mid", "norm_out", "conv_out"):
        if not hasattr(enc, a):
            raise UnsupportedVAE(f"not an LDM Encoder (no {a})")
    if getattr(enc, "carried", False):
        raise UnsupportedVAE("causal 3-D (video) encoders are not tiled")
    p = Program(image_hw=(h, w))
    x = p.input = p._new(c, h, w)
    x = p.conv(x, enc.conv_in, name="conv_in")
    n = len(enc.down)
    for i in range(n):
        down = enc.down[i]
        attn = getattr(down, "attn", ())
        for j, blk in enumerate(down.block):
            x = p.resblock(x, blk, f"down.{i}.block.{j}")
            if len(attn) > 0:
                x = p.glob(x, attn[j], f"down.{i}.attn.{j}")
        if i != n - 1 and hasattr(down, "downsample"):
            x = p.downsample(x, down.downsample, f"down.{i}.downsample")
    x = p.resblock(x, enc.mid.block_1, "mid.block_1")
    x = p.glob(x, enc.mid.attn_1, "mid.attn_1")
    x = p.resblock(x, enc.mid.block_2, "mid.block_2")
    x = p.conv(x, enc.conv_out, norm=enc.norm_out, name="conv_out")
    return p.finish(x)


def supports_decoder(dec, latent_shape=(16, 8, 8)) -> bool:
    try:
        decoder_program(dec, latent_shape)
        return True
    except (UnsupportedVAE, AttributeError, TypeError):
        return False


def supports_encoder(enc, image_shape=(3, 64, 64)) -> bool:
    try:
        encoder_program(enc, image_shape)
        return True
    except (UnsupportedVAE, AttributeError, TypeError):
        return False


# --------------------------------------------------------------------------------------------
# Planning: storage device and tile size per stage
# --------------------------------------------------------------------------------------------

def free_device_memory(device) -> Optional[int]:
    """Free bytes on a CUDA device (driver free + memory torch has reserved but not allocated); None elsewhere."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def _halo(st: Stage) -> int:
    if st.kind != "conv" or isinstance(st.module, torch.nn.Identity):
        return 0
    return max(_pair(st.module.padding))


def stage_tile_bytes(prog: Program, st: Stage, side: int, elem: int) -> int:
    """Rough peak bytes on the compute device for one ``side`` x ``side`` output tile of ``st``
    (input window with halo, normalised fp32 copy, upsampled copy, conv output, residual, fp32 stats chunk)."""
    cin, hin, win = prog.maps[st.src]
    cout, hout, wout = prog.maps[st.out]
    ty, tx = min(side, hout), min(side, wout)
    if st.kind == "global":
        # the whole map, q/k/v, the output and a margin for the attention kernel
        return int(6 * cin * hin * win * elem)
    if st.kind == "down":
        a_in = (2 * ty + 1) * (2 * tx + 1)
        return int(a_in * cin * elem * 2 + ty * tx * cout * (elem + 4))
    h = _halo(st)
    if st.up:
        iy, ix = -(-ty // 2) + 2 * -(-h // 2) + 1, -(-tx // 2) + 2 * -(-h // 2) + 1
        a_in, a_mid = iy * ix, 4 * iy * ix
    else:
        a_in = (ty + 2 * h) * (tx + 2 * h)
        a_mid = a_in
    b = a_in * cin * elem                                  # input window
    if st.norm is not None:
        b += a_in * cin * (4 + (elem if elem != 4 else 0))  # fp32 normalised copy (+ cast back)
    if st.up:
        b += a_mid * cin * elem                            # upsampled window
    b += 2 * a_mid * cout * elem                           # conv output + workspace allowance
    b += ty * tx * cout * (elem + 4)                        # residual sum, fp32 stats chunk
    if st.res is not None:
        rc = prog.maps[st.res][0]
        b += (ty + 2) * (tx + 2) * rc * elem               # residual window
    return int(b * 1.15)


@dataclass
class TiledPlan:
    program: Program
    tiles: list                      # per stage: tile side in that stage's output pixels (None = whole map)
    storage: torch.device            # where full feature maps live
    device: torch.device             # where tiles are computed
    dtype: torch.dtype
    budget: Optional[int]            # bytes the plan was fitted to (None: fixed tile size)
    tile_size: Optional[int]         # image-space tile side (fixed mode), None in auto mode
    est_tile_bytes: int = 0          # largest tile working set over the stages
    est_storage_bytes: int = 0       # feature maps kept on `storage` at the peak

    @property
    def est_device_bytes(self) -> int:
        """Estimated peak extra memory on the compute device (tile working set + maps stored there)."""
        on_dev = self.storage == self.device and self.device.type != "cpu"
        return self.est_tile_bytes + (self.est_storage_bytes if on_dev else 0)

    def num_tiles(self) -> int:
        n = 0
        for st, side in zip(self.program.stages, self.tiles):
            _, h, w = self.program.maps[st.out]
            n += 1 if side is None else len(list(_regions(h, w, side)))
        return n

    def image_tile(self) -> int:
        """The smallest tile side any stage uses, in image pixels (the image's side when no stage is tiled): the
        side of the stages at the budget's limit, which a retry with smaller tiles halves. A fixed `tile_size`
        plan gives `tile_size` back."""
        img_h, img_w = self.program.image_hw
        side_px = max(img_h, img_w)
        for st, side in zip(self.program.stages, self.tiles):
            if side is not None:
                _, h, w = self.program.maps[st.out]
                side_px = min(side_px, int(side * min(img_h / h, img_w / w)))
        return side_px

    def describe(self) -> str:
        sides = sorted({s for s in self.tiles if s is not None})
        return (f"{len(self.program.stages)} stages, {self.num_tiles()} tiles, tile sides {sides or ['whole']} px, "
                f"maps on {self.storage}, ~{self.est_device_bytes / 2**20:.0f} MiB on {self.device}")


def _fit_side(prog: Program, st: Stage, avail: int, elem: int) -> Optional[int]:
    """Largest tile side (stage px) whose working set fits ``avail`` bytes; None = the whole map fits."""
    _, h, w = prog.maps[st.out]
    full = max(h, w)
    if stage_tile_bytes(prog, st, full, elem) <= avail:
        return None
    lo, hi = min(MIN_TILE, full), full
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if stage_tile_bytes(prog, st, mid, elem) <= avail:
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan(prog: Program, *, device, dtype: torch.dtype, tile_size: Optional[int] = None,
         budget_bytes: Optional[int] = None, storage=None, uniform_tiles: bool = False) -> TiledPlan:
    """Choose where feature maps live and the tile side of every stage.

    * ``budget_bytes`` (or, when neither it nor ``tile_size`` is given, on CUDA, the free device memory x
      ``FREE_MEMORY_FRACTION``): feature maps stay on the device if they take at most ``DEVICE_STORAGE_SHARE`` of
      the budget, otherwise in host memory; each stage then uses the largest tile whose working set fits what is
      left (down to ``MIN_TILE``).
    * ``tile_size`` (image pixels): the working-set bytes of a ``tile_size`` tile in the costliest stage become the
      budget, so every stage gets the largest tile with that same peak (low-resolution stages, cheap per image
      pixel, take fewer, larger tiles). ``uniform_tiles=True`` instead uses exactly ``tile_size`` image pixels,
      scaled to each stage's resolution, everywhere (tests: real tiling at every level).
    * neither (CPU): ``tile_size = DEFAULT_CPU_TILE``.
    ``storage``: force ``"device"`` / ``"cpu"`` (or a torch.device) for the feature maps.
    """
    device = torch.device(device)
    elem = torch.empty((), dtype=dtype).element_size()
    storage_bytes = prog.storage_peak_bytes(elem)
    room = budget_bytes
    if room is None:
        free = free_device_memory(device)
        if free is not None:
            room = int(free * FREE_MEMORY_FRACTION)
            if tile_size is None:
                budget_bytes = room
    if storage is None:
        if device.type == "cpu" or room is None:
            store = device
        else:
            store = device if storage_bytes <= DEVICE_STORAGE_SHARE * room else torch.device("cpu")
    elif storage == "device":
        store = device
    elif storage == "cpu":
        store = torch.device("cpu")
    else:
        store = torch.device(storage)
    on_device = store == device and device.type != "cpu"

    img_h, img_w = prog.image_hw
    if tile_size is None and budget_bytes is None:
        tile_size = DEFAULT_CPU_TILE
    if tile_size is not None:
        tile_size = max(1, int(tile_size))
        uniform = []
        for st in prog.stages:
            _, h, w = prog.maps[st.out]
            side = max(1, math.ceil(tile_size * max(h / img_h, w / img_w)))
            uniform.append(None if st.kind == "global" or side >= max(h, w) else side)
        if uniform_tiles:
            tiles = uniform
        else:
            avail = max(stage_tile_bytes(prog, st, side or max(prog.maps[st.out][1:]), elem)
                        for st, side in zip(prog.stages, uniform) if st.kind != "global")
            tiles = [None if st.kind == "global" else _fit_side(prog, st, avail, elem) for st in prog.stages]
        budget = None
    else:
        budget = int(budget_bytes)
        avail = budget - (storage_bytes if on_device else 0)
        tiles = [None if st.kind == "global" else _fit_side(prog, st, avail, elem) for st in prog.stages]
    est = 0
    for st, side in zip(prog.stages, tiles):
        _, h, w = prog.maps[st.out]
        est = max(est, stage_tile_bytes(prog, st, side or max(h, w), elem))
    return TiledPlan(prog, tiles, store, device, dtype, budget, tile_size, est_tile_bytes=est,
                     est_storage_bytes=storage_bytes)


# --------------------------------------------------------------------------------------------
# Execution
# --------------------------------------------------------------------------------------------

def _regions(h: int, w: int, side: Optional[int]) -> Iterator[tuple]:
    """Non-overlapping near-equal tiles of at most ``side`` px covering ``h`` x ``w``."""
    if side is None:
        yield 0, h, 0, w
        return
    ny, nx = max(1, -(-h // side)), max(1, -(-w // side))
    ys = [round(i * h / ny) for i in range(ny + 1)]
    xs = [round(j * w / nx) for j in range(nx + 1)]
    for i in range(ny):
        for j in range(nx):
            yield ys[i], ys[i + 1], xs[j], xs[j + 1]


class _Runner:
    def __init__(self, pl: TiledPlan, norm_params, progress, total):
        self.pl = pl
        self.dev = pl.device
        self.dtype = pl.dtype
        self.norm_params = norm_params or default_norm_params
        self.progress = progress
        self.total = total
        self.done = 0
        self.non_blocking = pl.device.type == "cuda"

    def tick(self, n=1):
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total)

    def read(self, src: torch.Tensor, y0, y1, x0, x1) -> torch.Tensor:
        # contiguous: CPU convolutions take a slow path on strided windows
        return src[:, :, y0:y1, x0:x1].to(self.dev, self.dtype, non_blocking=self.non_blocking).contiguous()

    def norm_fn(self, st: Stage, stats: GroupStats):
        like = torch.empty((), device=self.dev, dtype=self.dtype)
        w, b = self.norm_params(st.norm, like)
        norm = stats.normalizer(w, b, float(st.norm.eps), device=self.dev)

        def apply(x: torch.Tensor) -> torch.Tensor:
            y = norm(x)
            if y.dtype != x.dtype:
                y = y.to(x.dtype)
            return F.silu(y, inplace=True)
        return apply

    def conv_window(self, src: torch.Tensor, conv, region, *, pre=None, up=False) -> torch.Tensor:
        oy0, oy1, ox0, ox1 = region
        H, W = src.shape[-2:]
        h = 0 if isinstance(conv, torch.nn.Identity) else max(_pair(conv.padding))
        if up:
            iy0, iy1, ix0, ix1, hh = oy0 // 2, -(-oy1 // 2), ox0 // 2, -(-ox1 // 2), -(-h // 2)
        else:
            iy0, iy1, ix0, ix1, hh = oy0, oy1, ox0, ox1, h
        wy0, wy1 = max(0, iy0 - hh), min(H, iy1 + hh)
        wx0, wx1 = max(0, ix0 - hh), min(W, ix1 + hh)
        x = self.read(src, wy0, wy1, wx0, wx1)
        if pre is not None:
            x = pre(x)
        f = 1
        if up:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            f = 2
        out = conv(x)
        del x
        return out[:, :, oy0 - f * wy0:oy1 - f * wy0, ox0 - f * wx0:ox1 - f * wx0]

    def down_window(self, src: torch.Tensor, mod, region) -> torch.Tensor:
        oy0, oy1, ox0, ox1 = region
        H, W = src.shape[-2:]
        if getattr(mod, "with_conv", True):
            # Downsample pads (0, 1, 0, 1) with zeros, then a 3x3 stride-2 conv: output y reads rows [2y, 2y + 3)
            wy1, wx1 = 2 * oy1 + 1, 2 * ox1 + 1
            x = self.read(src, 2 * oy0, min(H, wy1), 2 * ox0, min(W, wx1))
            py, px = wy1 - min(H, wy1), wx1 - min(W, wx1)
            if py or px:
                x = F.pad(x, (0, px, 0, py))
            return mod.conv(x)
        x = self.read(src, 2 * oy0, 2 * oy1, 2 * ox0, 2 * ox1)
        return F.avg_pool2d(x, kernel_size=2, stride=2)

    def whole_norm_fn(self, st: Stage):
        """A single-tile stage sees the whole map: the GroupNorm module itself gives the same result, fused."""
        def apply(x: torch.Tensor) -> torch.Tensor:
            return F.silu(st.norm(x), inplace=True)
        return apply

    def run(self, x: torch.Tensor) -> torch.Tensor:
        prog, pl = self.pl.program, self.pl
        B = x.shape[0]
        maps = {prog.input: x}
        stats: dict[int, GroupStats] = {}
        # statistics are gathered only for maps a *tiled* stage normalises
        need_stats = {st.src for st, side in zip(prog.stages, pl.tiles) if st.norm is not None and side is not None}
        if prog.input in need_stats:
            s = GroupStats(prog.input_stats_groups, x.shape[1])
            for r in _regions(x.shape[2], x.shape[3], DEFAULT_CPU_TILE):
                s.add(self.read(x, *r))
            stats[prog.input] = s
        for st, side in zip(prog.stages, pl.tiles):
            c, h, w = prog.maps[st.out]
            src = maps[st.src]
            acc = GroupStats(st.stats_groups, c) if st.out in need_stats else None
            if st.kind == "global":
                full = src.to(self.dev, self.dtype)
                y = st.module(full)
                del full
                if acc is not None:
                    acc.add(y)
                out = y.to(pl.storage)
                del y
                self.tick()
            else:
                out = None if side is None else torch.empty((B, c, h, w), device=pl.storage, dtype=self.dtype)
                pre = None
                if st.norm is not None:
                    pre = self.whole_norm_fn(st) if side is None else self.norm_fn(st, stats[st.src])
                res = maps[st.res] if st.res is not None else None
                for region in _regions(h, w, side):
                    if st.kind == "down":
                        t = self.down_window(src, st.module, region)
                    else:
                        t = self.conv_window(src, st.module, region, pre=pre, up=st.up)
                    if res is not None:
                        if st.shortcut is not None:
                            r = self.conv_window(res, st.shortcut, region)
                        else:
                            r = self.read(res, *region)
                        t = r + t
                        del r
                    if st.post is not None:
                        t = st.post(t)
                    if acc is not None:
                        acc.add(t)
                    if out is None:  # one tile: it is the map
                        out = t.to(pl.storage)
                    else:
                        oy0, oy1, ox0, ox1 = region
                        out[:, :, oy0:oy1, ox0:ox1].copy_(t)  # blocking: a later stage may read it from host memory
                    del t
                    self.tick()
            maps[st.out] = out
            if acc is not None:
                stats[st.out] = acc
            for m in st.frees:
                maps.pop(m, None)
                stats.pop(m, None)
        if self.non_blocking:
            torch.cuda.synchronize(self.dev)
        return maps[prog.output]


def run(pl: TiledPlan, x: torch.Tensor, *, norm_params=None, progress=None, out_device=None) -> torch.Tensor:
    """Execute a plan on ``x`` (``[B, C, H, W]``), one sample at a time (GroupNorm statistics are per sample).

    ``progress(done, total)`` is called after every tile; ``out_device`` defaults to the plan's storage device.
    """
    prog = pl.program
    c, h, w = prog.maps[prog.input]
    if tuple(x.shape[1:]) != (c, h, w):
        raise ValueError(f"plan was made for {(c, h, w)}, got input {tuple(x.shape[1:])}")
    total = pl.num_tiles() * x.shape[0]
    runner = _Runner(pl, norm_params, progress, total)
    outs = []
    with torch.no_grad():
        for i in range(x.shape[0]):
            y = runner.run(x[i:i + 1])
            outs.append(y.to(out_device) if out_device is not None else y)
            del y
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)


def _compute_device(module: torch.nn.Module, x: torch.Tensor, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    if x.device.type != "cpu":
        return x.device
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return x.device


def tiled_decode(decoder: torch.nn.Module, z: torch.Tensor, *, tile_size: Optional[int] = None,
                 budget_bytes: Optional[int] = None, device=None, storage=None, norm_params=None,
                 progress=None, out_device=None, uniform_tiles: bool = False) -> torch.Tensor:
    """``decoder(z)`` computed stage by stage over tiles: same result, bounded memory, no seams.

    ``tile_size``: tile side in output-image pixels (None/0 = auto from ``budget_bytes`` or free VRAM; on CPU
    without a budget ``DEFAULT_CPU_TILE``). ``device``: where tiles are computed (default: ``z``'s device, or the
    decoder's when ``z`` is on the CPU). Activations use ``z``'s dtype.
    """
    dev = _compute_device(decoder, z, device)
    prog = decoder_program(decoder, z.shape)
    pl = plan(prog, device=dev, dtype=z.dtype, tile_size=tile_size or None, budget_bytes=budget_bytes,
              storage=storage, uniform_tiles=uniform_tiles)
    return run(pl, z, norm_params=norm_params, progress=progress, out_device=out_device)


def tiled_encode(encoder: torch.nn.Module, x: torch.Tensor, *, tile_size: Optional[int] = None,
                 budget_bytes: Optional[int] = None, device=None, storage=None, norm_params=None,
                 progress=None, out_device=None, uniform_tiles: bool = False) -> torch.Tensor:
    """``encoder(x)`` (the raw moments) computed stage by stage over tiles; see :func:`tiled_decode`.
    ``tile_size`` is in input-image pixels."""
    dev = _compute_device(encoder, x, device)
    prog = encoder_program(encoder, x.shape)
    pl = plan(prog, device=dev, dtype=x.dtype, tile_size=tile_size or None, budget_bytes=budget_bytes,
              storage=storage, uniform_tiles=uniform_tiles)
    return run(pl, x, norm_params=norm_params, progress=progress, out_device=out_device)
