"""How much VRAM and RAM a FLUX.1 Kontext edit takes, per phase: the numbers the planner reasons with.

Plain Python. Where BENCHMARKS.md has a measured row the constant below comes from it (H100, ComfyUI v0.29 with
dynamic VRAM, Kontext 1024²: 4096 image + 4096 reference + 512 text tokens, 2026-11-23) and says so; everything
else is an estimate and says so. The planner's answers are estimates: they tell which setup fits a card, not
what a profiler would print.

- Weights: exact byte counts from the real FLUX.1 shapes (11.9 B parameters), or those of any FluxConfig: the
  block linears at the format's bits per weight (scales and statistics included), everything else in 16 bits
  (city96's files keep txt_in, the embedders' out layers and final_layer's adaLN in F16, img_in, the embedders'
  in layers, final_layer.linear and all 1-D tensors in F32: 15 MB more than this on FLUX.1; a file with every 2-D
  tensor quantized holds up to 1.6 % less). tests/test_memory_model_measured.py writes small FLUX files in every
  format, loads them and holds these numbers to the bytes the loaded tensors take.
- Denoise: weights + activations + a fixed runtime share. Activations scale with the token count T (image, every
  reference latent and the 512 text tokens) as ACTIVATION_BYTES_PER_TOKEN_HIDDEN x T x hidden: core bf16's torch
  peak at T = 8704 (1.4 GiB) is 56 bytes (28 bf16 values) per token and hidden unit, about what one single block
  holds at once
  (its linear1 output 7h, the MLP activation 4h, the concatenation 5h, q/k/v and the attention output 4h, the
  residual streams). Attention is a memory-lean kernel (sdpa / flash / sage), never a T x T score matrix: the
  `split` backend bounds it where none is available. The fixed share (CUDA context, cuBLAS workspace, dynamic
  VRAM bookkeeping, our dequantization buffers) is the measured device peak minus weights minus activations
  (MEASURED_PEAKS); on a consumer card the CUDA context is smaller, so these peaks err on the safe side.
- Text encode: the encoders' bytes plus a measured 0.4 GiB on the GPU; a cached prompt loads nothing.
- VAE decode: 2.04 GiB of working memory per 2^20 pixels untiled (measured: 2.14 GiB at 1024², 8.57 at 2048²); the
  seam-free tiled decode holds what its budget allows.
"""
from dataclasses import dataclass
from functools import lru_cache

GIB = 1 << 30
TEXT_TOKENS = 512  # T5 tokens FLUX always pads to
LATENT_DOWNSCALE = 16  # 8x VAE, then 2x2 patches
ACTIVATION_BYTES_PER_TOKEN_HIDDEN = 56  # core bf16 torch peak 1.4 GiB / (8704 tokens x 3072), measured

MEASURED_TOKENS = 8704  # Kontext 1024²: the token count of the measured rows
#: family -> (bits per block weight of the measured file, measured device peak GiB) at Kontext 1024² on the H100
#: (BENCHMARKS.md, 2026-11-23, run A: core bf16, ours fp8 / Q8_0 / Q5_K / Q4_K / nf4). The fixed share of a
#: family is that peak minus the file's weights minus the activations; formats without a row of their own take
#: the nearest family's share (FORMATS marks them unmeasured).
MEASURED_PEAKS = {"bf16": (16.0, 25.2), "fp8": (8.0, 15.1), "Q8_0": (8.5, 17.9), "Q5_K": (5.5, 12.0),
                  "Q4_K": (4.5, 10.5), "nf4": (4.13, 11.2)}

TEXT_ENCODE_GPU_EXTRA_GIB = 0.4  # measured: 5.19 GiB peak for CLIP-L + fp8 T5-XXL (4.79 GiB of weights)
PROCESS_RAM_GIB = 3.0  # Python + torch + ComfyUI before any model (estimate; 5.3 GiB measured with CUDA libs)
VAE_GIB_PER_MPIX = 2.04  # untiled decode working memory per 2^20 pixels, measured at 1024² (2.14) and 2048² (8.57)
VAE_WEIGHTS_GIB = 0.16
TILED_VAE_MIN_GIB = 0.5  # a 512-px tile's working set (estimate; core's 512-px tiled decode measured 0.54)


@dataclass(frozen=True)
class ModelFormat:
    name: str  # what people call the file's format
    bits: float  # bits per weight of the block linears with scales (_M: city96 puts the double blocks' qkv one
    # type up, +0.09 bit on FLUX.1, rounded to 0.1; tests/test_memory_model_measured.py measures each)
    family: str  # its row in MEASURED_PEAKS
    measured: bool  # whether BENCHMARKS.md has a row for this exact kind of file
    file: str  # the common file name of FLUX.1 Kontext [dev] in it
    error: float | None  # relative L2 error of the weights: llama.cpp's quantizer on N(0, 0.02) for GGUF, ours for
    # fp8 / nf4 (the integration tests' random models); None where nobody measured it


# best first: the planner takes the first that fits
FORMATS = (
    ModelFormat("bf16", 16.0, "bf16", True, "flux1-kontext-dev.safetensors", 0.0),
    ModelFormat("Q8_0", 8.5, "Q8_0", True, "flux1-kontext-dev-Q8_0.gguf", 0.0053),
    ModelFormat("Q6_K", 6.5625, "Q5_K", False, "flux1-kontext-dev-Q6_K.gguf", 0.018),
    ModelFormat("fp8_e4m3fn", 8.0, "fp8", True, "flux1-kontext-dev-fp8_e4m3fn.safetensors", 0.025),
    ModelFormat("Q5_K_M", 5.6, "Q5_K", True, "flux1-kontext-dev-Q5_K_M.gguf", 0.036),
    ModelFormat("Q4_K_M", 4.6, "Q4_K", True, "flux1-kontext-dev-Q4_K_M.gguf", 0.071),
    ModelFormat("nf4", 4.13, "nf4", True, "flux1-kontext-dev-bnb-nf4.safetensors", 0.085),
    ModelFormat("Q3_K_M", 3.55, "Q4_K", False, "flux1-kontext-dev-Q3_K_M.gguf", 0.15),
    ModelFormat("Q2_K", 2.7, "Q4_K", False, "flux1-kontext-dev-Q2_K.gguf", None),
)
FORMAT_BY_NAME = {f.name: f for f in FORMATS}


@dataclass(frozen=True)
class TextEncoderFormat:
    name: str
    t5_gib: float  # T5-XXL encoder weights (estimate from 4.76 B parameters at the format's bits)
    file: str


CLIP_L_GIB = 0.23  # 123 M parameters in bf16
CLIP_L_FILE = "clip_l.safetensors"
T5_PARAMS = 4.76e9
TEXT_ENCODERS = (
    TextEncoderFormat("fp16", T5_PARAMS * 2 / GIB, "t5xxl_fp16.safetensors"),
    TextEncoderFormat("fp8_e4m3fn_scaled", T5_PARAMS / GIB, "t5xxl_fp8_e4m3fn_scaled.safetensors"),
    TextEncoderFormat("Q8_0", T5_PARAMS * 8.5 / 8 / GIB, "t5-v1_1-xxl-encoder-Q8_0.gguf"),
    TextEncoderFormat("Q5_K_M", T5_PARAMS * 5.6 / 8 / GIB, "t5-v1_1-xxl-encoder-Q5_K_M.gguf"),
    TextEncoderFormat("Q4_K_M", T5_PARAMS * 4.6 / 8 / GIB, "t5-v1_1-xxl-encoder-Q4_K_M.gguf"),
)


@lru_cache(maxsize=None)
def flux_parameters(cfg=None):
    """(parameters in the block linears, parameters elsewhere) of a FLUX.1 transformer of `cfg`, a
    loaders.flux_layout.FluxConfig; FLUX.1 [dev] / Kontext [dev] by default."""
    from ..loaders.flux_layout import FLUX_DEV, flux_tensor_shapes
    blocks = rest = 0
    for key, shape in flux_tensor_shapes(FLUX_DEV if cfg is None else cfg).items():
        n = 1
        for d in shape:
            n *= d
        if key.startswith(("double_blocks.", "single_blocks.")) and key.endswith(".weight") and len(shape) == 2:
            blocks += n
        else:
            rest += n
    return blocks, rest


def weight_bytes(fmt, bits=None, cfg=None) -> float:
    """Resident weight bytes of a FLUX.1 transformer (`cfg`, FLUX.1 [dev] by default) in `fmt` (or at `bits` per
    block weight): the block linears at those bits, everything else at 16."""
    blocks, rest = flux_parameters(cfg)
    return blocks * (fmt.bits if bits is None else bits) / 8 + rest * 2


def weight_gib(fmt, bits=None, cfg=None) -> float:
    """Resident weight bytes of FLUX.1 (or of `cfg`) in `fmt` (or at `bits` per block weight), in GiB."""
    return weight_bytes(fmt, bits, cfg) / GIB


def fixed_gib(family: str) -> float:
    """The runtime share that does not scale with weights or tokens (context, workspaces, dequant buffers)."""
    bits, peak = MEASURED_PEAKS[family]
    return peak - weight_gib(None, bits) - activation_gib(MEASURED_TOKENS)


def tokens(width: int, height: int, references: int) -> int:
    """Tokens per step: the image, each reference latent at the same size, and the text."""
    image = (width // LATENT_DOWNSCALE) * (height // LATENT_DOWNSCALE)
    return image * (1 + references) + TEXT_TOKENS


def activation_gib(n_tokens: int, hidden: int = 3072) -> float:
    return ACTIVATION_BYTES_PER_TOKEN_HIDDEN * n_tokens * hidden / GIB


def denoise_gib(fmt: ModelFormat, n_tokens: int) -> float:
    """Device peak while sampling with the weights resident."""
    return weight_gib(fmt) + activation_gib(n_tokens) + fixed_gib(fmt.family)


def streaming_denoise_gib(fmt: ModelFormat, n_tokens: int) -> float:
    """Device peak while sampling with the weights streamed from RAM (dynamic VRAM / --lowvram): activations, the
    fixed share and a window of a few blocks (one single block is 1/38 of ~2/3 of the weights; four in flight)."""
    return activation_gib(n_tokens) + fixed_gib(fmt.family) + 4 * weight_gib(fmt) / 57


def text_encode_gib(enc: TextEncoderFormat) -> float:
    return enc.t5_gib + CLIP_L_GIB + TEXT_ENCODE_GPU_EXTRA_GIB


def vae_decode_gib(width: int, height: int, budget_gib: float | None = None) -> float:
    """Untiled, or with the tiled decode held to `budget_gib`."""
    untiled = VAE_GIB_PER_MPIX * width * height / (1 << 20)
    work = untiled if budget_gib is None else min(untiled, max(budget_gib, TILED_VAE_MIN_GIB))
    return VAE_WEIGHTS_GIB + work
