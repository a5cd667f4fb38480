"""A safetensors file written one tensor at a time.

The safetensors library has no streaming writer: `save_file` / `serialize` take every tensor at once, which for a
converted FLUX model means the whole output in RAM. This writes the same format (8-byte little-endian header
length, the JSON header, the tensors' bytes back to back) with the data first and the header last, into space
reserved for it at the start and padded with spaces, as the library itself pads headers. Every file it writes is
read back with the safetensors library in the tests (tests/test_convert.py).
"""
from __future__ import annotations

import json
import struct

import torch

DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.uint8: "U8", torch.int8: "I8",
               torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL"}
ALIGN = 8


def header_bound(names, metadata=None) -> int:
    """Bytes that surely hold the JSON header of tensors named `names` (any dtype, up to 4 dims of 12 digits,
    offsets of 15 digits) and `metadata`, rounded up to 8."""
    n = sum(len(json.dumps(name)) + 128 for name in names) + 64
    if metadata:
        n += len(json.dumps({str(k): str(v) for k, v in metadata.items()}))
    return -(-n // ALIGN) * ALIGN


class StreamingSafetensorsWriter:
    """write(name, tensor) for each tensor, then close(metadata). `reserve` is the header space (header_bound)."""

    def __init__(self, path, reserve: int):
        self.path, self.reserve = path, reserve
        self.f = open(path, "wb")
        self.f.write(b"\0" * (8 + reserve))
        self.offset = 0
        self.header = {}

    def write(self, name: str, t: torch.Tensor) -> int:
        if name in self.header:
            raise ValueError(f"duplicate tensor name {name!r}")
        t = t.detach().contiguous().cpu()
        data = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        data.numpy().tofile(self.f)
        n = data.numel()
        self.header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                             "data_offsets": [self.offset, self.offset + n]}
        self.offset += n
        return n

    def close(self, metadata=None):
        header = dict(self.header)
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        if len(raw) > self.reserve:
            raise RuntimeError(f"safetensors header of {len(raw)} bytes exceeds the {self.reserve} reserved")
        self.f.flush()
        self.f.seek(0)
        self.f.write(struct.pack("<Q", self.reserve) + raw + b" " * (self.reserve - len(raw)))
        self.f.close()

    def abort(self):
        if not self.f.closed:
            self.f.close()
