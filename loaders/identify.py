"""What a weights file is, from its tensor names and shapes: a FLUX.1 transformer (dev / Kontext, schnell, Fill,
Depth / Canny), a FLUX.2 transformer, a T5 or CLIP-L text encoder, or unknown; and the numbers
`kontext-lowvram inspect` prints about it, in plain words. Nothing here imports ComfyUI."""
import os
import re

from .detect import detect_container
from .errors import ModelFileError
from .keys import strip_prefix

FLUX2_MARK = "double_stream_modulation_img.lin.weight"
NOT_FLUX = "not a FLUX transformer ("  # load_model_file's words when the keys are no FLUX.1 transformer
NOT_DIFFUSION = (NOT_FLUX, "is a text-encoder/LLM GGUF", "architecture ")  # ... and read_gguf's for other GGUFs
FLUX1_VARIANTS = {128: "Depth / Canny", 384: "Fill"}
# safetensors header dtypes in the names the rest of the report uses
_ST_TYPES = {"BF16": "BF16", "F16": "F16", "F32": "F32", "F64": "F64", "F8_E4M3": "float8_e4m3fn",
             "F8_E5M2": "float8_e5m2", "U8": "U8", "I8": "I8", "I32": "I32", "I64": "I64"}
_PLAIN_TYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64"}


def tensor_names(path, container):
    """The tensor names a file holds (header only: nothing is loaded)."""
    if container == "gguf":
        from .gguf_loader import open_reader
        return [t.name for t in open_reader(path).tensors]
    from .safetensors_header import read_header
    return list(read_header(path)[0])


def looks_like_text_encoder(names) -> bool:
    from .text_encoders import CLIP_L_MARK, OPEN_CLIP_MARK, T5_MARK
    return any(n.endswith((T5_MARK, CLIP_L_MARK, OPEN_CLIP_MARK)) or n.startswith("enc.blk.") for n in names)


def type_histogram(sd) -> dict:
    """{type name: count} of a loaded state dict: a QTensor's quant type, else the dtype (BF16, F16, F32, ...)."""
    from ..optimizations import QTensor
    counts = {}
    for v in sd.values():
        name = v.quant_name if isinstance(v, QTensor) else _PLAIN_TYPES.get(str(v.dtype)[6:], str(v.dtype)[6:])
        counts[name] = counts.get(name, 0) + 1
    return counts


def header_histogram(path) -> dict:
    from .safetensors_header import read_header
    counts = {}
    for entry in read_header(path)[0].values():
        name = _ST_TYPES.get(entry["dtype"], entry["dtype"])
        counts[name] = counts.get(name, 0) + 1
    return counts


def read_any(path, container):
    """Every tensor of a file whatever it holds -> (state dict without a transformer prefix, info)."""
    if container == "gguf":
        from .gguf_loader import _field_str, open_reader, read_tensors
        reader = open_reader(path)
        sd, counts = read_tensors(reader, path)
        info = {"container": "gguf", "architecture": _field_str(reader, "general.architecture") or "unknown",
                "tensor_types": counts}
    else:
        from .safetensors_loader import read_safetensors
        sd, info = read_safetensors(path)
    prefix = strip_prefix(sd)
    return ({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)} if prefix else sd), info


def _blocks(sd, prefix) -> int:
    return len({m.group(1) for k in sd for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m})


def flux1_words(cfg, path) -> str:
    if cfg.in_channels == 64:
        variant = "dev / Kontext" if cfg.guidance_embed else "schnell"
        if cfg.guidance_embed and "kontext" in os.path.basename(path).lower():
            variant = "Kontext, by its file name: its tensors are those of FLUX.1 dev"
    else:
        variant = FLUX1_VARIANTS.get(cfg.in_channels, f"{cfg.in_channels} input channels")
    return (f"FLUX.1 transformer ({variant}): hidden {cfg.hidden_size}, {cfg.num_heads} heads, {cfg.depth} double "
            f"+ {cfg.depth_single_blocks} single blocks, "
            + ("guidance embedding" if cfg.guidance_embed else "no guidance embedding"))


def flux2_words(sd) -> str:
    from .flux2_layout import detect_flux2_config, flux2_variant
    img_in = sd.get("img_in.weight")
    hidden = f"hidden {img_in.shape[0]}, " if img_in is not None else ""
    words = f"FLUX.2 transformer: {hidden}{_blocks(sd, 'double_blocks.')} double + {_blocks(sd, 'single_blocks.')} single blocks"
    try:
        cfg = detect_flux2_config({k: tuple(v.shape) for k, v in sd.items()})
    except ValueError as e:
        return f"{words} (not loadable: {e})"
    return (f"{words}, {cfg.num_heads} heads, text width {cfg.context_in_dim}, "
            + ("guidance embedding" if cfg.guidance_embed else "no guidance embedding")
            + f": FLUX.2 {flux2_variant(cfg)} (needs a ComfyUI that runs FLUX.2, e.g. v0.29)")


def text_encoder_words(sd, info) -> str:
    from .text_encoders import t5_config_overrides
    if info["kind"] == "t5":
        c = info["t5_config"]
        which = "T5-XXL" if not t5_config_overrides(c) else "not the T5-XXL size FLUX was trained with"
        return (f"T5 text encoder ({which}): width {c['d_model']}, {c['num_layers']} layers, {c['num_heads']} heads, "
                f"feed-forward {c['d_ff']}")
    layers = _blocks(sd, "text_model.encoder.layers.") or _blocks(sd, "transformer.resblocks.")
    return f"CLIP-L text encoder: width 768, {layers} layers"


def identify(path):
    """-> (state dict, info) of any weights file; info also has `kind` ("flux1" | "flux2" | "t5" | "clip_l" |
    "unknown"), `what` (the architecture in words) and `tensor_types` ({type: count}, as stored). A file that looks
    like a FLUX.1 transformer or a text encoder is read by that loader, whose checks apply (ModelFileError naming
    the file); integrity is not checked here (see integrity.py)."""
    from . import load_model_file
    from .text_encoders import read_text_encoder
    path = os.fspath(path)
    container = detect_container(path)
    names = tensor_names(path, container)
    if looks_like_text_encoder(names):
        sd, info = read_text_encoder(path, verify=False)
        info["what"] = text_encoder_words(sd, info)
        if container == "safetensors":
            info["tensor_types"] = header_histogram(path)
    elif any(n.endswith(FLUX2_MARK) for n in names):
        sd, info = read_any(path, container)
        info.update(kind="flux2", what=flux2_words(sd))
    else:
        try:
            sd, info = load_model_file(path, verify=False)
            info.update(kind="flux1", what=flux1_words(info["flux_config"], path))
        except ModelFileError as e:
            if not e.problem.startswith(NOT_DIFFUSION):
                raise
            sd, info = read_any(path, container)
            if e.problem.startswith(NOT_FLUX):
                why = e.problem[len(NOT_FLUX):-1]
            else:
                why = f"a GGUF of architecture {info.get('architecture')}, no FLUX.1 transformer or T5 / CLIP-L encoder"
            info.update(kind="unknown", what=f"unknown ({why})")
    info.setdefault("tensor_types", type_histogram(sd))
    info.update(file=path, file_bytes=os.path.getsize(path), container=container)
    return sd, info


def parameter_count(sd) -> int:
    """Values in the state dict at their logical shapes (quantized tensors count what they stand for)."""
    n = 0
    for v in sd.values():
        c = 1
        for d in v.shape:
            c *= int(d)
        n += c
    return n


def estimated_vram_bytes(sd) -> int:
    """The weights as ComfyUI keeps them on a GPU: quantized tensors as stored (with their statistics), float
    tensors at 16 bits (ComfyUI's bf16/fp16 compute dtype; fp32 files are cast down)."""
    from ..optimizations import QTensor
    total = 0
    for v in sd.values():
        if isinstance(v, QTensor):
            total += v.nbytes_total()
        else:
            total += v.numel() * (min(v.element_size(), 2) if v.is_floating_point() else v.element_size())
    return total


def size_words(n_bytes) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def count_words(n) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e5 else str(n)


def describe(sd, info) -> list:
    """The file in plain words and numbers, one fact a line (what `kontext-lowvram inspect` prints)."""
    from ..optimizations import QTensor
    from . import type_counts
    fmt = info.get("format") or info["container"].upper()
    n_quant = sum(isinstance(v, QTensor) for v in sd.values())
    return [
        f"file: {info['file']}",
        f"size: {size_words(info['file_bytes'])} on disk ({info['container']})",
        f"format: {fmt}",
        f"architecture: {info['what']}",
        f"parameters: {count_words(parameter_count(sd))}",
        f"tensors: {len(sd)}, {n_quant} of them quantized",
        f"tensor types: {type_counts(info) or 'none'}",
        f"estimated resident VRAM: {size_words(estimated_vram_bytes(sd))} for the weights (quantized ones as stored, "
        "float ones at 16 bits; activations come on top: see `kontext-lowvram plan`)",
    ]
