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


def load_model_file(path, convert: str = "none", progress=None, check_arch: bool = True):
    """-> (state dict, info). `convert` quantizes a bf16/fp16/fp32 file while loading (see CONVERSIONS)."""
    path = os.fspath(path)
    container = detect_container(path)
    if container == "gguf":
        from .gguf_loader import read_gguf
        sd, info = read_gguf(path, progress)
    else:
        from .safetensors_loader import read_safetensors
        sd, info = read_safetensors(path, progress)
    prefix = strip_prefix(sd)
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if check_arch:
        from .flux_layout import detect_flux_config
        try:
            info["flux_config"] = detect_flux_config({k: tuple(v.shape) for k, v in sd.items()})
        except ValueError as e:
            raise ModelFileError(path, f"not a FLUX transformer ({e})",
                                 "this loader takes FLUX.1 / Kontext diffusion models; text encoders and VAEs have their own loaders") from None
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
        info["conversion"] = f"skipped: the file is already quantized ({info.get('format', 'gguf')})"
        return sd
    out = quantize_state_dict(sd, convert, progress)
    info["conversion"] = f"{convert}: {sum(out[k] is not sd[k] for k in sd)} tensors"
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


def load_summary(sd, info) -> str:
    """One line saying what a load did: file, detected format, resident size, quantized tensors, conversion."""
    from ..optimizations import QTensor
    fmt = info.get("format") or (f"GGUF {type_counts(info)}" if type_counts(info) else info.get("container", "?"))
    n_quant = sum(isinstance(v, QTensor) for v in sd.values())
    line = (f"{os.path.basename(info['file'])}: {fmt}; {resident_bytes(sd) / 2**30:.2f} GiB resident, "
            f"{n_quant} of {len(sd)} tensors quantized")
    conversion = info.get("conversion")
    return line + (f"; convert_on_load {conversion}" if conversion else "")


def load_state_dict(path, convert: str = "none"):
    """The state dict alone (QTensor for quantized entries)."""
    return load_model_file(path, convert=convert)[0]


__all__ = ["load_state_dict", "load_model_file", "convert_state_dict", "quantize_state_dict", "load_summary",
           "resident_bytes", "ModelFileError", "CONVERSIONS"]
