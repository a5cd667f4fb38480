"""Read a safetensors header without loading tensors: dtypes, shapes and metadata for format detection.

The format is 8 bytes little-endian header length, then a JSON header; we validate it ourselves so a corrupt or
truncated file gets a clear error instead of a crash deep inside a reader (and nothing is ever unpickled).
Every entry is checked as the safetensors spec has it: `__metadata__` maps strings to strings; a tensor has a
known dtype, a shape of non-negative ints and two int data offsets whose span is exactly the tensor's bytes,
inside the data section, overlapping no other tensor.
"""
import json
import os
import struct

from .errors import REDOWNLOAD, ModelFileError, check_file

MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
# json.loads builds a Python object per value: 100 MiB of "{}," becomes 2.4 GiB (measured), "[1000," 0.8 GiB.
# Every value but the first in a container follows a ',' and every container opens with '{' or '[', so counting
# those bytes bounds the objects (up to ~90 B each, measured) before parsing. Real headers use ~8 per tensor
# (FLUX.1: ~6k), so 2M admits a 250k-tensor file and bounds a hostile one to ~180 MB of objects.
MAX_JSON_TOKENS = 2_000_000

# Bits per element of every dtype the safetensors library (0.8) knows; F4 / F6 pack below a byte.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64,
    "I64": 64, "U64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}


def _brief(v):
    """A header value for a message: a hostile one can be megabytes long."""
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_uint(v):
    return type(v) is int and v >= 0  # JSON true/false load as bool, a subclass of int: not a size


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
    tokens = raw.count(b",") + raw.count(b"{") + raw.count(b"[")
    if tokens > MAX_JSON_TOKENS:
        raise ModelFileError(path, f"corrupt safetensors header ({tokens} JSON values, at most {MAX_JSON_TOKENS} "
                             "allowed)", REDOWNLOAD)
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        raise ModelFileError(path, f"corrupt safetensors header ({type(e).__name__}: {e})", REDOWNLOAD) from None
    metadata = _metadata(header.pop("__metadata__", None), path)
    data_size = size - 8 - n
    spans = [_check_entry(name, info, data_size, path) for name, info in header.items()]
    _check_overlaps(spans, path)
    return header, metadata


def _metadata(meta, path):
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise ModelFileError(path, f"corrupt safetensors header (__metadata__ is a {type(meta).__name__}, not an "
                             "object of strings)", REDOWNLOAD)
    for k, v in meta.items():
        if not isinstance(v, str):
            raise ModelFileError(path, f"corrupt safetensors header (__metadata__ value for {k!r} is not a string: "
                                 f"{_brief(v)})", REDOWNLOAD)
    return meta


def _check_entry(name, info, data_size, path):
    """(start, end, name) of a valid tensor entry; ModelFileError naming the tensor otherwise."""
    def bad(problem):
        return ModelFileError(path, f"corrupt safetensors header entry for {_brief(name)}: {problem}", REDOWNLOAD)

    if not isinstance(info, dict):
        raise bad(f"a {type(info).__name__}, not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise bad(f"unknown dtype {_brief(dtype)}")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise bad(f"shape {_brief(shape)} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_uint(o) for o in offsets):
        raise bad(f"data_offsets {_brief(offsets)} is not a list of two non-negative integers")
    start, end = offsets
    if start > end:
        raise bad(f"data_offsets {offsets} run backwards")
    if end > data_size:
        raise ModelFileError(path, f"tensor {_brief(name)} ends at byte {end} but the file holds {data_size} data "
                             "bytes", REDOWNLOAD)
    numel = 0 if 0 in shape else 1
    for d in shape if numel else ():
        numel *= d
        if numel > 8 * data_size:  # cannot fit already; stop before thousands of huge dims make a giant int
            break
    bits = numel * DTYPE_BITS[dtype]
    if bits > 8 * data_size:
        raise bad(f"{dtype} {_brief(shape)} needs more bytes than the file's {data_size} data bytes")
    if bits % 8:
        raise bad(f"{dtype} {_brief(shape)} is not a whole number of bytes")
    if end - start != bits // 8:
        raise bad(f"{dtype} {_brief(shape)} needs {bits // 8} bytes but data_offsets {offsets} hold {end - start}")
    return start, end, name


def _check_overlaps(spans, path):
    spans = sorted(s for s in spans if s[1] > s[0])  # empty tensors occupy no bytes
    for a, b in zip(spans, spans[1:]):
        if b[0] < a[1]:
            raise ModelFileError(path, f"tensors {_brief(a[2])} and {_brief(b[2])} overlap in the file "
                                 f"({a[0]}..{a[1]} and {b[0]}..{b[1]})", REDOWNLOAD)
