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
- FLUX.2 ([dev], [klein] 4B / 9B, MODEL_SPECS): weights exact from the real shapes (loaders/flux2_layout.py; the
  shared modulation layers count as block linears, as city96's files quantize them); everything else is an
  ESTIMATE scaled from the FLUX.1 measurements above, since nothing was measured on FLUX.2 yet: activations by the
  single block's widths (ACTIVATION_BYTES_PER_TOKEN_HIDDEN_FLUX2), the fixed share plus the bigger dequantization
  buffers of its bigger layers, the text encoders from their parameter counts, the VAE as FLUX.1's (same decoder
  widths). Same token count: 16x latent downscale (8x VAE, 2x2 packed) and at least 512 text tokens.
"""
from dataclasses import dataclass
from functools import lru_cache

GIB = 1 << 30
TEXT_TOKENS = 512  # T5 tokens FLUX always pads to
LATENT_DOWNSCALE = 16  # 8x VAE, then 2x2 patches
ACTIVATION_BYTES_PER_TOKEN_HIDDEN = 56  # core bf16 torch peak 1.4 GiB / (8704 tokens x 3072), measured
# ESTIMATE: FLUX.1's measured 56 scaled by what one single block holds per token and hidden unit — FLUX.1: linear1
# out 7h, GELU 4h, concat 5h, q/k/v + attention 4h, two residual streams 2h = 22h; FLUX.2 (SwiGLU, mlp_ratio 3):
# linear1 out 9h, gate + product 6h, concat 4h, q/k/v + attention 4h, 2h = 25h
ACTIVATION_BYTES_PER_TOKEN_HIDDEN_FLUX2 = 56 * 25 / 22

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


def tensor_shapes(cfg=None) -> dict:
    """Every transformer key -> shape of `cfg`: a loaders.flux_layout.FluxConfig (FLUX.1 [dev] / Kontext [dev] when
    None) or a loaders.flux2_layout.Flux2Config."""
    from ..loaders.flux2_layout import Flux2Config, flux2_tensor_shapes
    from ..loaders.flux_layout import FLUX_DEV, flux_tensor_shapes
    if isinstance(cfg, Flux2Config):
        return flux2_tensor_shapes(cfg)
    return flux_tensor_shapes(FLUX_DEV if cfg is None else cfg)


@lru_cache(maxsize=None)
def flux_parameters(cfg=None):
    """(parameters in the block linears, parameters elsewhere) of a FLUX transformer of `cfg` (tensor_shapes);
    block linears are what city96's files and our conversion quantize (loaders.keys.should_quantize: the blocks'
    2-D weights, and FLUX.2's shared modulation layers)."""
    from ..loaders.keys import should_quantize
    blocks = rest = 0
    for key, shape in tensor_shapes(cfg).items():
        n = 1
        for d in shape:
            n *= d
        if should_quantize(key, shape):
            blocks += n
        else:
            rest += n
    return blocks, rest


@lru_cache(maxsize=None)
def largest_linear(cfg=None) -> int:
    """Values of the biggest block linear of `cfg` (what one dequantization buffer holds)."""
    from ..loaders.keys import should_quantize
    return max(shape[0] * shape[1] for key, shape in tensor_shapes(cfg).items() if should_quantize(key, shape))


def weight_bytes(fmt, bits=None, cfg=None) -> float:
    """Resident weight bytes of a FLUX.1 transformer (`cfg`, FLUX.1 [dev] by default) in `fmt` (or at `bits` per
    block weight): the block linears at those bits, everything else at 16."""
    blocks, rest = flux_parameters(cfg)
    return blocks * (fmt.bits if bits is None else bits) / 8 + rest * 2


def weight_gib(fmt, bits=None, cfg=None) -> float:
    """Resident weight bytes of FLUX.1 (or of `cfg`) in `fmt` (or at `bits` per block weight), in GiB."""
    return weight_bytes(fmt, bits, cfg) / GIB


def fixed_gib(family: str, cfg=None) -> float:
    """The runtime share that does not scale with weights or tokens (context, workspaces, dequant buffers), measured
    on FLUX.1; for another `cfg` (FLUX.2) plus two dequantization buffers (bf16) of its bigger largest layer: an
    ESTIMATE."""
    bits, peak = MEASURED_PEAKS[family]
    measured = peak - weight_gib(None, bits) - activation_gib(MEASURED_TOKENS)
    if cfg is None:
        return measured
    return measured + max(0, largest_linear(cfg) - largest_linear()) * 2 * 2 / GIB


def tokens(width: int, height: int, references: int) -> int:
    """Tokens per step: the image, each reference latent at the same size, and the text."""
    image = (width // LATENT_DOWNSCALE) * (height // LATENT_DOWNSCALE)
    return image * (1 + references) + TEXT_TOKENS


def activation_gib(n_tokens: int, hidden: int = 3072,
                   per_token_hidden: float = ACTIVATION_BYTES_PER_TOKEN_HIDDEN) -> float:
    return per_token_hidden * n_tokens * hidden / GIB


def model_activation_gib(n_tokens: int, cfg=None) -> float:
    """Activations of `cfg` (FLUX.1 [dev] when None, measured; FLUX.2 estimated) at `n_tokens` a step."""
    from ..loaders.flux2_layout import Flux2Config
    if cfg is None:
        return activation_gib(n_tokens)
    per = ACTIVATION_BYTES_PER_TOKEN_HIDDEN_FLUX2 if isinstance(cfg, Flux2Config) else ACTIVATION_BYTES_PER_TOKEN_HIDDEN
    return activation_gib(n_tokens, cfg.hidden_size, per)


def denoise_gib(fmt: ModelFormat, n_tokens: int, cfg=None) -> float:
    """Device peak while sampling with the weights resident (FLUX.1 [dev] / Kontext, or `cfg`)."""
    return weight_gib(fmt, cfg=cfg) + model_activation_gib(n_tokens, cfg) + fixed_gib(fmt.family, cfg)


def streaming_denoise_gib(fmt: ModelFormat, n_tokens: int, cfg=None) -> float:
    """Device peak while sampling with the weights streamed from RAM (dynamic VRAM / --lowvram): activations, the
    fixed share and a window of a few blocks (FLUX.1: one single block is 1/38 of ~2/3 of the weights, 57 blocks
    in all; four in flight)."""
    blocks = 57 if cfg is None else cfg.depth + cfg.depth_single_blocks
    return model_activation_gib(n_tokens, cfg) + fixed_gib(fmt.family, cfg) + 4 * weight_gib(fmt, cfg=cfg) / blocks


def text_encode_gib(enc: TextEncoderFormat, extra_gib: float = CLIP_L_GIB) -> float:
    """The encode's device peak: the big encoder, what loads beside it (FLUX.1: CLIP-L) and the measured 0.4 GiB of
    work (T5; taken for FLUX.2's LLM encoders too: an estimate)."""
    return enc.t5_gib + extra_gib + TEXT_ENCODE_GPU_EXTRA_GIB


def vae_decode_gib(width: int, height: int, budget_gib: float | None = None) -> float:
    """Untiled, or with the tiled decode held to `budget_gib`."""
    untiled = VAE_GIB_PER_MPIX * width * height / (1 << 20)
    work = untiled if budget_gib is None else min(untiled, max(budget_gib, TILED_VAE_MIN_GIB))
    return VAE_WEIGHTS_GIB + work


# --------------------------------------------------------------------------------------------
# The models the planner knows: FLUX.1 Kontext [dev] (measured) and FLUX.2 [dev] / [klein] 4B / 9B (estimates)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    key: str  # `kontext-lowvram plan --model KEY`
    title: str
    cfg: object  # its transformer config (None: FLUX.1 [dev], the default of every function above)
    formats: tuple  # ModelFormat rows with this model's file names, best first
    text_encoders: tuple  # the encoder choices the planner weighs, best (and biggest) first
    extra_encoder_gib: float  # weights loaded beside the big encoder (FLUX.1: CLIP-L)
    extra_encoder_file: str
    measured: bool  # whether BENCHMARKS.md has rows of this model (else every peak is an estimate)
    notes: tuple = ()


# city96's _M mixes put the double blocks' fused qkv one type up (tools/lcpp.patch): (base bits, qkv bits)
M_MIXES = {"Q5_K_M": (5.5, 6.5625), "Q4_K_M": (4.5, 5.5), "Q3_K_M": (3.4375, 4.5)}


def qkv_share(cfg) -> float:
    """The double blocks' qkv weights as a share of the block linears (what an _M mix puts one type up)."""
    blocks, _ = flux_parameters(cfg)
    qkv = sum(s[0] * s[1] for k, s in tensor_shapes(cfg).items()
              if k.startswith("double_blocks.") and k.endswith("_attn.qkv.weight"))
    return qkv / blocks


def mix_bits(name: str, cfg) -> float | None:
    """Bits per block weight of an _M mix on `cfg`, from its shapes; None for the uniform formats."""
    if name not in M_MIXES:
        return None
    base, up = M_MIXES[name]
    return round(base + (up - base) * qkv_share(cfg), 3)


# FLUX.2 files: names from ComfyUI's own FLUX.2 templates (comfyui_workflow_templates: flux2_dev_fp8mixed,
# flux-2-klein-4b-fp8 / -9b-fp8, mistral_3_small_flux2_bf16, qwen_3_4b, qwen_3_8b_fp8mixed), the BFL bf16 files, and
# for GGUF the usual <model>-<type>.gguf naming of city96's / unsloth's repositories (check the model page). No NF4
# FLUX.2 is published: our loader reads one, or makes one from bf16 with convert_on_load, but the planner does not
# send people looking for a file that does not exist.
FLUX2_FILES = {
    "flux2-dev": ("FLUX.2 [dev]", "flux2-dev", "flux2-dev.safetensors", "flux2_dev_fp8mixed.safetensors"),
    "flux2-klein-4b": ("FLUX.2 [klein] 4B", "flux-2-klein-4b", "flux-2-klein-4b.safetensors",
                       "flux-2-klein-4b-fp8.safetensors"),
    "flux2-klein-9b": ("FLUX.2 [klein] 9B", "flux-2-klein-9b", "flux-2-klein-9b.safetensors",
                       "flux-2-klein-9b-fp8.safetensors"),
}
# Text encoders (ESTIMATES from parameter counts: comfy/text_encoders/llama.py configs): Mistral-Small-3 24B as
# ComfyUI's split file keeps it (the 30 layers FLUX.2 reads, 17.3 B), Qwen3-4B (4.0 B), Qwen3-8B (8.2 B).
MISTRAL3_FLUX2_PARAMS = 17.34e9
QWEN3_4B_PARAMS = 4.02e9
QWEN3_8B_PARAMS = 8.19e9
# llama.cpp's Q4_K_M keeps half the attn_v / ffn_down tensors in Q6_K: ~4.9 bits a weight in an LLM (an estimate)
LLM_Q4_K_M_BITS = 4.9
FLUX2_TEXT_ENCODERS = {
    # fp8 only, as the T5 choice for FLUX.1: the bf16 file (mistral_3_small_flux2_bf16, 32 GiB) is never what fits,
    # and a Mistral GGUF needs its tekken.json beside it, which its repositories do not ship
    "flux2-dev": (TextEncoderFormat("fp8_e4m3fn", MISTRAL3_FLUX2_PARAMS / GIB,
                                    "mistral_3_small_flux2_fp8.safetensors"),),
    # Qwen3 GGUFs (unsloth's names) for cards where the safetensors file does not fit beside nothing: a 4-8 B LLM
    # on the CPU takes minutes a prompt, on the GPU seconds
    "flux2-klein-4b": (TextEncoderFormat("bf16", QWEN3_4B_PARAMS * 2 / GIB, "qwen_3_4b.safetensors"),
                       TextEncoderFormat("Q8_0", QWEN3_4B_PARAMS * 8.5 / 8 / GIB, "Qwen3-4B-Q8_0.gguf"),
                       TextEncoderFormat("Q4_K_M", QWEN3_4B_PARAMS * LLM_Q4_K_M_BITS / 8 / GIB,
                                         "Qwen3-4B-Q4_K_M.gguf")),
    "flux2-klein-9b": (TextEncoderFormat("fp8 mixed", QWEN3_8B_PARAMS / GIB, "qwen_3_8b_fp8mixed.safetensors"),
                       TextEncoderFormat("Q4_K_M", QWEN3_8B_PARAMS * LLM_Q4_K_M_BITS / 8 / GIB,
                                         "Qwen3-8B-Q4_K_M.gguf")),
}


def _flux2_spec(key: str) -> ModelSpec:
    from dataclasses import replace

    from ..loaders.flux2_layout import FLUX2_MODELS
    title, stem, bf16_file, fp8_file = FLUX2_FILES[key]
    cfg = FLUX2_MODELS[key]
    rows = []
    for f in FORMATS:
        if f.name == "nf4":
            continue
        file = bf16_file if f.name == "bf16" else fp8_file if f.name.startswith("fp8") else f"{stem}-{f.name}.gguf"
        rows.append(replace(f, bits=mix_bits(f.name, cfg) or f.bits, measured=False, file=file))
    return ModelSpec(key, title, cfg, tuple(rows), FLUX2_TEXT_ENCODERS[key], 0.0, "", False, (
        f"{title}: weights from its real shapes ({cfg.num_params / 1e9:.1f} B parameters); activations, the fixed "
        "runtime share and the text encoder are ESTIMATES scaled from FLUX.1 Kontext's measured rows (nothing was "
        "measured on FLUX.2 yet)",))


@lru_cache(maxsize=None)
def model_spec(key: str = "kontext") -> ModelSpec:
    if key == "kontext":
        return ModelSpec("kontext", "FLUX.1 Kontext [dev]", None, FORMATS, TEXT_ENCODERS[1:], CLIP_L_GIB, CLIP_L_FILE,
                         True)
    if key in FLUX2_FILES:
        return _flux2_spec(key)
    raise ValueError(f"unknown model {key!r}; known: kontext, {', '.join(FLUX2_FILES)}")


MODEL_KEYS = ("kontext",) + tuple(FLUX2_FILES)
