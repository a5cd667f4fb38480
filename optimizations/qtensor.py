"""QTensor: a quantized state-dict entry that carries its own format.

Loaders return these; ComfyUI's model detection reads `.shape` (the logical shape) from the state dict, and our
quantized ops unpack them into plain raw-storage parameters when the model is built. Torch operations on a
QTensor act on the raw storage and return plain tensors (torch-function dispatch is disabled), so nothing
downstream mistakes raw bytes for values.
"""
from typing import NamedTuple

import torch


class QWeight(NamedTuple):
    """A quantized weight as one value: raw storage, its format and what reading it takes. Every kernel entry
    point and the quantized ops take this, so the group never travels as five loose arguments. Plain fields (a
    NamedTuple of tensors, strings and dicts), which torch.compile traces."""
    raw: torch.Tensor  # uint8 blocks (GGUF, NF4) or float8 values
    qformat: str  # "gguf" | "nf4" | "fp8"
    shape: torch.Size  # logical
    meta: dict  # plain values, e.g. {"qtype": "Q4_K"} or {"blocksize": 64, ...}
    aux: dict  # small tensors on raw's device: nf4 absmax/code, fp8 scale


class QTensor(torch.Tensor):
    """Raw quantized storage (uint8 blocks or float8 values) plus what it takes to dequantize it.

    qformat: "gguf" | "nf4" | "fp8"
    meta: plain values (e.g. {"qtype": "Q4_K"} or {"blocksize": 64})
    aux: small tensors the format needs (nf4 absmax/code, fp8 scale)
    """

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, raw: torch.Tensor, *, qformat: str, shape, meta=None, aux=None):
        t = torch.Tensor._make_subclass(cls, raw.detach(), False)
        t.qformat = qformat
        t.qshape = torch.Size(shape)
        t.meta = dict(meta or {})
        t.aux = dict(aux or {})
        return t

    @property
    def shape(self):  # the logical shape: what model detection and LoRA see
        return self.qshape

    @property
    def raw(self) -> torch.Tensor:
        return self.as_subclass(torch.Tensor)

    @property
    def qweight(self) -> QWeight:
        return QWeight(self.raw, self.qformat, self.qshape, self.meta, self.aux)

    @property
    def quant_name(self) -> str:
        if self.qformat == "gguf":
            return self.meta["qtype"]
        if self.qformat == "fp8":
            return f"{str(self.raw.dtype).replace('torch.', '')}{'_scaled' if 'scale' in self.aux else ''}"
        return self.qformat

    def to_device(self, device) -> "QTensor":
        """The same quantized tensor on `device` (raw storage and aux move; nothing is dequantized)."""
        return QTensor(self.raw.to(device), qformat=self.qformat, shape=self.qshape, meta=self.meta,
                       aux={k: v.to(device) for k, v in self.aux.items()})

    def nbytes_total(self) -> int:
        raw = self.raw
        return raw.numel() * raw.element_size() + sum(a.numel() * a.element_size() for a in self.aux.values())

    def __repr__(self):
        return f"QTensor({self.quant_name}, shape={tuple(self.qshape)}, raw={tuple(self.raw.shape)}:{self.raw.dtype})"
