"""Safetensors diffusion models: plain bf16/fp16/fp32, fp8 (plain, scaled, ComfyUI comfy_quant) and
bitsandbytes NF4. Every quantized weight comes back as a QTensor; scale/statistics keys are folded into it."""
import json
import logging

import torch

from ..optimizations.qtensor import QTensor
from ..optimizations.quant import nf4_parts_from_weight
from ..optimizations.quant.fp8 import is_fp8
from .errors import REDOWNLOAD, ModelFileError
from .safetensors_header import read_header

log = logging.getLogger("kontext_lowvram")

SCALED_FP8_MARKER = "scaled_fp8"
NF4_STATE_SUFFIX = ".quant_state.bitsandbytes__nf4"
# ComfyUI's comfy_quant formats we dequantize ourselves; the others (nvfp4, mxfp8, int8) belong to core's loader.
COMFY_QUANT_FP8 = {"float8_e4m3fn", "float8_e5m2"}


def _load_all(path, progress):
    from safetensors import safe_open
    sd = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            keys = list(f.keys())
            for i, k in enumerate(keys):
                sd[k] = f.get_tensor(k)
                if progress:
                    progress(i + 1, len(keys))
    except Exception as e:
        raise ModelFileError(path, f"could not read tensors ({type(e).__name__}: {e})", REDOWNLOAD) from None
    return sd


def _quant_layers(sd, metadata, path):
    """Per-layer comfy_quant configs, from `<layer>.comfy_quant` keys or the `_quantization_metadata` header."""
    layers = {}
    if "_quantization_metadata" in metadata:
        try:
            table = json.loads(metadata["_quantization_metadata"])["layers"]
            if not isinstance(table, dict):
                raise TypeError(f"'layers' is a {type(table).__name__}, not an object")
            layers.update(table)
        except (ValueError, KeyError, TypeError) as e:
            raise ModelFileError(path, f"corrupt _quantization_metadata ({e})", REDOWNLOAD) from None
    for k in [k for k in sd if k.endswith(".comfy_quant")]:
        t = sd.pop(k)
        try:
            if t.dtype != torch.uint8 or t.dim() != 1:
                raise ValueError(f"a {t.dtype} tensor of shape {tuple(t.shape)}, not the 1-D uint8 JSON bytes")
            layers[k[: -len(".comfy_quant")]] = json.loads(bytes(t.tolist()).decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ModelFileError(path, f"corrupt comfy_quant entry {k!r} ({e})", REDOWNLOAD) from None
    for layer, conf in layers.items():
        if not isinstance(conf, dict):
            raise ModelFileError(path, f"comfy_quant config of layer {layer!r} is a {type(conf).__name__}, not an object",
                                 REDOWNLOAD)
    return layers


def _fold_nf4(sd, path):
    from ..optimizations.quant import nf4
    weights = [k[: -len(NF4_STATE_SUFFIX)] for k in sd if k.endswith(NF4_STATE_SUFFIX)]
    for wk in weights:
        try:
            q = nf4.from_bnb_state_dict(sd, wk)
        except ValueError as e:
            raise ModelFileError(path, f"bitsandbytes weight {wk!r}: {e}", REDOWNLOAD) from None
        raw, meta, aux = nf4_parts_from_weight(q)
        sd[wk] = QTensor(raw, qformat="nf4", shape=q.shape, meta=meta, aux=aux)
    for k in [k for k in sd if nf4.is_bnb_nf4_key(k)]:
        del sd[k]
    return len(weights)


def _weight_scale(scale, layer, path):
    """A layer's fp8 weight scale as a float32 scalar, checked: one element, finite and not 0 (either turns the
    whole layer into NaN or zeros); a negative one flips the layer's sign, which no converter writes: warned."""
    if scale.numel() != 1:
        raise ModelFileError(path, f"layer {layer!r} has a {scale.numel()}-element weight scale",
                             "only per-tensor fp8 scales are supported: use a per-tensor scaled fp8, GGUF or NF4 file")
    if not scale.is_floating_point():
        raise ModelFileError(path, f"layer {layer!r} has a {scale.dtype} weight scale, not a float", REDOWNLOAD)
    value = scale.to(torch.float32).reshape(())
    if not torch.isfinite(value) or value == 0:
        raise ModelFileError(path, f"layer {layer!r} has weight scale {value.item()} (the layer would be NaN or 0)",
                             REDOWNLOAD)
    if value < 0:
        log.warning(
            "Kontext LowVRAM: %s: layer %r has a negative fp8 weight scale (%g); loaded as stored", path, layer,
            value.item())
    return value


def read_safetensors(path, progress=None):
    """-> (state dict with the file's key names, info dict)"""
    header, metadata = read_header(path)
    if any(k.endswith("__fp4") for k in header):
        raise ModelFileError(path, "is a bitsandbytes FP4 checkpoint; only NF4 is supported",
                             "use an NF4, GGUF or FP8 version of the model")
    sd = _load_all(path, progress)
    info = {"container": "safetensors"}

    if any(k.endswith(NF4_STATE_SUFFIX) for k in sd):
        info["format"] = "nf4"
        info["quantized_tensors"] = _fold_nf4(sd, path)
        return sd, info

    layers = _quant_layers(sd, metadata, path)
    marker = [k for k in sd if k == SCALED_FP8_MARKER or k.endswith("." + SCALED_FP8_MARKER)]
    for k in marker:
        del sd[k]
    n_quant = n_scaled = 0
    for key in [k for k in sd if k.endswith(".weight")]:
        w = sd[key]
        layer = key[: -len(".weight")]
        conf = layers.get(layer)
        if conf is not None and conf.get("format") not in COMFY_QUANT_FP8:
            raise ModelFileError(path, f"layer {layer!r} uses ComfyUI quant format {conf.get('format')!r}",
                                 "load this file with ComfyUI's own 'Load Diffusion Model' node, which runs that format natively")
        if not is_fp8(w.dtype):
            continue
        scale = sd.pop(layer + ".weight_scale", None)
        if scale is None:
            scale = sd.pop(layer + ".scale_weight", None)
        sd.pop(layer + ".input_scale", None)  # activation scales only matter to fp8 matmul kernels
        sd.pop(layer + ".scale_input", None)
        aux = {"scale": _weight_scale(scale, layer, path)} if scale is not None else {}
        sd[key] = QTensor(w, qformat="fp8", shape=w.shape, aux=aux)
        n_quant += 1
        n_scaled += scale is not None
    if n_quant:
        kind = "comfy_quant" if layers else ("scaled" if n_scaled else "plain")
        info["format"] = f"fp8 ({kind})"
    else:
        dtypes = sorted({str(t.dtype).replace("torch.", "") for t in sd.values()})
        info["format"] = "/".join(dtypes)
    info["quantized_tensors"] = n_quant
    return sd, info
