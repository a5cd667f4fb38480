"""Read a safetensors header without loading tensors: dtypes, shapes and metadata for format detection.

The format is 8 bytes little-endian header length, then a JSON header; we validate it ourselves so a corrupt or
truncated file gets a clear error instead of a crash deep inside a reader (and nothing is ever unpickled).
"""
import json
import os
import struct

from .errors import REDOWNLOAD, ModelFileError, check_file

MAX_HEADER = 100 * 1024 * 1024


def read_header(path):
    """-> (tensors: {name: {"dtype", "shape", "data_offsets"}}, metadata: dict)"""
    path = check_file(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFileError(path, "too short to be a safetensors file", REDOWNLOAD)
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > MAX_HEADER or 8 + n > size:
            raise ModelFileError(path, f"not a safetensors file (header length {n} does not fit a {size}-byte file)",
                                 "is it really .safetensors? " + REDOWNLOAD)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelFileError(path, f"corrupt safetensors header ({e})", REDOWNLOAD) from None
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    for name, info in header.items():
        try:
            start, end = info["data_offsets"]
            info["dtype"], info["shape"]
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(path, f"corrupt safetensors header entry for {name!r}", REDOWNLOAD) from None
        if end > data_size or start > end:
            raise ModelFileError(path, f"tensor {name!r} ends at byte {end} but the file holds {data_size} data bytes",
                                 REDOWNLOAD)
    return header, metadata
