"""QTensor: a quantized state-dict entry that carries its own format.

Loaders return these; ComfyUI's model detection reads `.shape` (the logical shape) from the state dict, and our
quantized ops unpack them into plain raw-storage parameters when the model is built. Torch operations on a
QTensor act on the raw storage and return plain tensors (torch-function dispatch is disabled), so nothing
downstream mistakes raw bytes for values.
"""
import torch


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
