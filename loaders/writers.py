"""Writers for every format we read (the CLI demo, the bench and tests write models with them; the conditioning
cache writes its entries through atomic_write). Outputs are written to a temporary name and renamed into place, so
an interrupted write never leaves a half-written file behind."""
import json
import math
import os
import uuid

import torch

from ..optimizations.qtensor import QTensor
from .gguf_loader import ORIG_SHAPE

FP8_STYLES = ("scaled", "comfy_quant")


PARTIAL = ".partial"
GGUF_MAX_DIMS = 4  # ggml's limit; a tensor of more dims is stored as rows with its shape in ORIG_SHAPE


def atomic_write(path, write):
    """write(tmp) then rename tmp onto `path`; the temp name is unique per writer (concurrent writers of one
    path never share it) and ends in PARTIAL, and it is removed whatever happens."""
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}{PARTIAL}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_gguf(path, sd, arch="flux", progress=None):
    """GGUF in city96/ComfyUI-GGUF layout: general.architecture + BFL key names; QTensor gguf entries are
    written as their raw blocks, plain tensors as F32 (1-D) or their own F16/BF16/F32 dtype."""
    import gguf
    import numpy as np

    from ..optimizations.quant import gguf as gq

    def write(tmp):
        w = gguf.GGUFWriter(tmp, arch=arch)
        w.add_file_type(gguf.LlamaFileType.ALL_F32)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for i, (k, t) in enumerate(sd.items()):
            shape = tuple(t.shape)  # logical
            if not shape:
                raise ValueError(f"{k}: a 0-d tensor cannot be stored in GGUF")
            stored = shape
            if len(shape) > GGUF_MAX_DIMS:  # stored as rows; the logical shape goes in the metadata
                stored = (math.prod(shape) // shape[-1], shape[-1])
                w.add_array(ORIG_SHAPE + k, [int(d) for d in shape])
            if isinstance(t, QTensor):
                if t.qformat != "gguf":
                    raise ValueError(f"{k}: {t.quant_name} cannot be stored in GGUF; quantize it to a GGUF type")
                qtype = gguf.GGMLQuantizationType[t.meta["qtype"]]
                # bytes in rows of the logical shape, so gguf-py (and every reader) gets that shape back
                byte_rows = gq.byte_shape(stored, t.meta["qtype"])
                raw = t.raw.contiguous().view(torch.uint8)
                if raw.numel() != math.prod(byte_rows):
                    raise ValueError(f"{k}: {raw.numel()} raw bytes do not hold {t.quant_name} {shape}")
                w.add_tensor(k, raw.reshape(byte_rows).numpy(), raw_dtype=qtype)
            elif t.dtype == torch.bfloat16:
                w.add_tensor(k, t.contiguous().reshape(stored).view(torch.uint8).numpy(),
                             raw_dtype=gguf.GGMLQuantizationType.BF16)
            else:
                dt = np.float16 if t.dtype == torch.float16 else np.float32
                w.add_tensor(k, t.to(torch.float16 if dt is np.float16 else torch.float32).reshape(stored).numpy())
            if progress:
                progress(i + 1, len(sd))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    return atomic_write(path, write)


def to_safetensors_dict(sd, fp8_style="scaled"):
    """Flatten QTensor entries into the key layout real checkpoints use (scaled-fp8 / comfy_quant / bnb NF4)."""
    from ..optimizations.quant import nf4, nf4_weight_from_parts
    if fp8_style not in FP8_STYLES:
        raise ValueError(f"fp8_style must be one of {FP8_STYLES}")
    out, layers, metadata = {}, {}, {}
    for k, t in sd.items():
        if not isinstance(t, QTensor):
            out[k] = t.contiguous()
            continue
        layer = k[: -len(".weight")]
        if t.qformat == "fp8":
            out[k] = t.raw.contiguous()
            if "scale" in t.aux:
                out[layer + (".scale_weight" if fp8_style == "scaled" else ".weight_scale")] = t.aux["scale"].reshape(())
                layers[layer] = {"format": str(t.raw.dtype).replace("torch.", "")}
        elif t.qformat == "nf4":
            out.update(nf4.to_bnb_state_dict(nf4_weight_from_parts(t.qweight), layer + "."))
        else:
            raise ValueError(f"{k}: GGUF blocks ({t.quant_name}) cannot be stored in safetensors; use write_gguf")
    if layers and fp8_style == "scaled":
        out["scaled_fp8"] = torch.empty(0, dtype=next(iter(out[l + ".weight"] for l in layers)).dtype)
    elif layers:
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
    return out, metadata


def write_safetensors(path, sd, fp8_style="scaled", metadata=None):
    from safetensors.torch import save_file
    flat, meta = to_safetensors_dict(sd, fp8_style)
    meta.update(metadata or {})
    return atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=meta or None))
