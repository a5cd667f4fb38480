"""GGUF diffusion models via gguf-py's memory-mapped GGUFReader: tensors stay views of the mapped file."""
import warnings

import numpy as np
import torch

from ..optimizations.qtensor import QTensor
from ..optimizations.quant.common import UnsupportedQuantType
from .errors import REDOWNLOAD, ModelFileError

# Architectures that are text encoders / LLMs: a clear pointer beats a shape mismatch later.
TEXT_ARCHS = {"llama", "t5", "t5encoder", "clip", "gemma", "gemma2", "gemma3", "qwen2", "qwen2vl", "qwen3", "umt5"}
DIFFUSION_ARCHS = {"flux"}


def _field_str(reader, name):
    field = reader.fields.get(name)
    if field is None:
        return None
    try:
        return str(bytes(field.parts[field.data[0]]), encoding="utf-8")
    except Exception:
        return None


ORIG_SHAPE = "comfy.gguf.orig_shape."  # city96's key for a tensor's logical shape where the stored one differs


def _orig_shape(reader, tensor_name, path):
    """The logical shape a file records for a tensor (city96's ARRAY of INT32), None if it records none."""
    import gguf
    field = reader.fields.get(ORIG_SHAPE + tensor_name)
    if field is None:
        return None
    ints = (gguf.GGUFValueType.INT32, gguf.GGUFValueType.UINT32, gguf.GGUFValueType.INT64, gguf.GGUFValueType.UINT64)
    if len(field.types) != 2 or field.types[0] != gguf.GGUFValueType.ARRAY or field.types[1] not in ints:
        raise ModelFileError(path, f"metadata {ORIG_SHAPE + tensor_name!r} is not an array of integers", REDOWNLOAD)
    dims = tuple(int(field.parts[i][0]) for i in field.data)
    if not 1 <= len(dims) <= 8 or min(dims) < 1:
        raise ModelFileError(path, f"metadata {ORIG_SHAPE + tensor_name!r} holds an invalid shape {dims}", REDOWNLOAD)
    return torch.Size(dims)


def open_reader(path):
    """gguf.GGUFReader on a file whose header has passed the bounded validator first (GGUFReader trusts the
    header's counts: a tiny hostile file would otherwise exhaust memory)."""
    from .gguf_header import gguf_module, validate_gguf_header
    gguf = gguf_module(path)
    validate_gguf_header(path)
    try:
        return gguf.GGUFReader(path)
    except ValueError as e:
        if "GGMLQuantizationType" in str(e):
            raise ModelFileError(path, f"uses a quant type this gguf library does not know ({e})",
                                 "update gguf (`pip install -U gguf`) or requantize with a supported type") from None
        raise ModelFileError(path, f"not a readable GGUF file ({e})", REDOWNLOAD) from None
    except Exception as e:  # gguf-py raises struct/index/numpy errors on truncated files
        raise ModelFileError(path, f"not a readable GGUF file ({type(e).__name__}: {e})", REDOWNLOAD) from None


def read_tensors(reader, path, progress=None):
    """Every tensor of an open GGUF as {file name: QTensor (block quants) | plain tensor view}, and the count per
    type. Sizes are checked against each type's block geometry, so a damaged file fails here, naming itself."""
    from ..optimizations.quant import gguf as gq
    sd, counts = {}, {}
    total = len(reader.tensors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # from_numpy on the read-only memmap: we never write to it
        for i, t in enumerate(reader.tensors):
            try:
                qtype = gq.qtype_of(int(t.tensor_type))
            except UnsupportedQuantType as e:
                raise ModelFileError(path, f"tensor {t.name!r}: {e}", "requantize the model with a supported type") from None
            stored = torch.Size(int(v) for v in reversed(t.shape))
            shape = _orig_shape(reader, t.name, path) or stored
            data = np.asarray(t.data)
            if shape.numel() != stored.numel():
                raise ModelFileError(path, f"tensor {t.name!r}: recorded shape {tuple(shape)} does not hold the "
                                     f"{stored.numel()} stored values {tuple(stored)}", REDOWNLOAD)
            try:
                expected = int(np.prod(gq.byte_shape(tuple(shape), qtype))) if gq.is_quantized(qtype) else None
            except ValueError as e:  # a row that is not whole blocks
                raise ModelFileError(path, f"tensor {t.name!r}: {e}", REDOWNLOAD) from None
            if expected is not None and data.nbytes != expected:
                raise ModelFileError(path, f"tensor {t.name!r} has {data.nbytes} bytes, {qtype.name} {tuple(shape)} needs {expected}", REDOWNLOAD)
            raw = torch.from_numpy(data)
            name = qtype.name
            if qtype.name in ("F32", "F16"):
                sd[t.name] = raw.view(shape)
            elif qtype.name == "BF16":
                sd[t.name] = raw.view(torch.uint8).view(torch.bfloat16).view(shape)
            else:
                sd[t.name] = QTensor(raw, qformat="gguf", shape=shape, meta={"qtype": name})
            counts[name] = counts.get(name, 0) + 1
            if progress:
                progress(i + 1, total)
    return sd, counts


def read_gguf(path, progress=None):
    """-> (state dict of QTensor / plain tensors with the file's key names, info dict)"""
    reader = open_reader(path)
    arch = _field_str(reader, "general.architecture")
    if arch in TEXT_ARCHS:
        raise ModelFileError(path, f"is a text-encoder/LLM GGUF (architecture {arch!r}), not a diffusion model",
                             "load it with a text-encoder loader (CLIPLoader / the GGUF CLIP loader)")
    if arch is not None and arch not in DIFFUSION_ARCHS:
        raise ModelFileError(path, f"architecture {arch!r} is not supported", f"this loader reads: {', '.join(sorted(DIFFUSION_ARCHS))}")

    sd, counts = read_tensors(reader, path, progress)
    info = {"container": "gguf", "architecture": arch or "unknown", "tensor_types": counts}
    return sd, info
