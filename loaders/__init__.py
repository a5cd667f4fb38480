"""Model files in, state dicts out: GGUF, safetensors (bf16/fp16/fp32, fp8, scaled fp8, comfy_quant) and NF4.

Nothing here imports ComfyUI. Quantized entries are `QTensor`s (see optimizations/qtensor.py) that carry their
format; plain entries are ordinary tensors. Keys come back in BFL/ComfyUI naming with any
`model.diffusion_model.` prefix removed.
"""
import os

from .detect import detect_container
from .errors import ModelFileError
from .keys import should_quantize, strip_prefix

CONVERSIONS = ("none", "fp8_e4m3fn_scaled", "nf4", "q8_0")
FAMILY_FIX = ("this loader takes FLUX-family diffusion models (FLUX.1 / Kontext, FLUX.2 [dev] / [klein], Chroma); "
              "text encoders and VAEs have their own loaders")


def load_model_file(path, convert: str = "none", progress=None, check_arch: bool = True, verify: bool = True):
    """-> (state dict, info). `convert` quantizes a bf16/fp16/fp32 file while loading (see CONVERSIONS). `verify`:
    a `<file>.sha256` sidecar, where there is one, must match first (integrity.py: once per file identity)."""
    path = os.fspath(path)
    container = detect_container(path)
    if verify:
        from .integrity import verify_sidecar
        verify_sidecar(path)
    if container == "gguf":
        from .gguf_loader import read_gguf
        sd, info = read_gguf(path, progress)
    else:
        from .safetensors_loader import read_safetensors
        sd, info = read_safetensors(path, progress)
    prefix = strip_prefix(sd)
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if check_arch:  # the FLUX family and bounded checks; which model it is, and whether it runs, is the host's call
        from .transformer import check_transformer
        try:
            found = check_transformer({k: tuple(v.shape) for k, v in sd.items()})
        except ValueError as e:
            raise ModelFileError(path, f"not a FLUX transformer ({e})", FAMILY_FIX) from None
        info["transformer"] = found.name
        if found.config is not None:
            info["flux2_config" if found.family == "FLUX.2" else "flux_config"] = found.config
    info["file"] = path
    info["file_bytes"] = os.path.getsize(path)
    sd = convert_state_dict(sd, convert, info, progress)
    return sd, info


def convert_state_dict(sd, convert, info, progress=None):
    """Quantize the big block linears of a float state dict (on-load conversion)."""
    from ..optimizations import QTensor
    convert = convert or "none"
    if convert not in CONVERSIONS:
        raise ValueError(f"unknown conversion {convert!r}; choose one of {', '.join(CONVERSIONS)}")
    if convert == "none":
        return sd
    if any(isinstance(v, QTensor) for v in sd.values()):
        info["conversion"] = f"{convert} skipped: file is already {quantized_format(info)}"
        return sd
    out = quantize_state_dict(sd, convert, progress)
    info["conversion"] = f"{convert}: {sum(out[k] is not sd[k] for k in sd)} tensors quantized"
    return out


def quantize_state_dict(sd, fmt, progress=None, select=should_quantize):
    """A copy of `sd` with the entries `select(key, shape)` picks (default: the big block linears,
    keys.should_quantize) quantized to `fmt`, any format `optimizations.quantize` takes ("Q5_1", "nf4",
    "fp8_e4m3fn_scaled", ...); other entries are shared."""
    from ..optimizations import quantize
    keys = [k for k, v in sd.items() if select(k, v.shape) and v.is_floating_point()]
    out = dict(sd)
    for i, k in enumerate(keys):
        out[k] = quantize(sd[k], fmt)
        if progress:
            progress(i + 1, len(keys))
    return out


def resident_bytes(sd) -> int:
    """Bytes the state dict's tensors take as stored (raw quantized storage, its statistics, plain tensors)."""
    from ..optimizations import QTensor
    return sum(v.nbytes_total() if isinstance(v, QTensor) else v.numel() * v.element_size() for v in sd.values())


def type_counts(info) -> str:
    """A GGUF file's tensor types, most frequent first ("Q8_0 x304, F32 x39"); "" for other files."""
    counts = info.get("tensor_types") or {}
    return ", ".join(f"{t} x{n}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def quantized_format(info) -> str:
    """The quantized format of a loaded file in words: "GGUF Q4_K/Q6_K" (its block types, most frequent first),
    "fp8 (scaled)", "nf4"."""
    counts = info.get("tensor_types") or {}
    blocks = [t for t, _ in sorted(counts.items(), key=lambda kv: -kv[1]) if t not in ("F32", "F16", "BF16")]
    if blocks:
        return "GGUF " + "/".join(blocks)
    return info.get("format") or info.get("container", "quantized")


def load_summary(sd, info) -> str:
    """One line saying what a load did: file, detected format, resident size, quantized tensors, conversion."""
    from ..optimizations import QTensor
    fmt = info.get("format") or (f"GGUF {type_counts(info)}" if type_counts(info) else info.get("container", "?"))
    n_quant = sum(isinstance(v, QTensor) for v in sd.values())
    line = (f"{os.path.basename(info['file'])}: {fmt}; {resident_bytes(sd) / 2**30:.2f} GiB resident, "
            f"{n_quant} of {len(sd)} tensors quantized")
    conversion = info.get("conversion")
    return line + (f"; convert_on_load={conversion}" if conversion else "; no conversion")


def load_state_dict(path, convert: str = "none"):
    """The state dict alone (QTensor for quantized entries)."""
    return load_model_file(path, convert=convert)[0]


__all__ = ["load_state_dict", "load_model_file", "convert_state_dict", "quantize_state_dict", "load_summary",
           "quantized_format", "resident_bytes", "ModelFileError", "CONVERSIONS"]
