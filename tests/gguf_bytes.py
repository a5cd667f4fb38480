"""GGUF files byte by byte, with struct: for files no honest writer produces (wrong counts, bad types, overlaps).

Layout (GGUF v2/v3): magic, u32 version, u64 tensor count, u64 KV count, the KVs, the tensor infos, padding to
the alignment, the tensor data. `order` ">" packs every number big-endian, as a big-endian GGUF does.
"""
import struct

U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
SCALAR_FMT = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?", U64: "Q", I64: "q",
              F64: "d"}
F32_TYPE, Q8_0_TYPE = 0, 8  # ggml tensor type ids


def gstr(text, order="<"):
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack(order + "Q", len(raw)) + raw


def kv(key, vtype, payload, order="<"):
    """One key/value record; `payload` is the already-encoded value."""
    return gstr(key, order) + struct.pack(order + "I", vtype) + payload


def scalar(vtype, value, order="<"):
    return struct.pack(order + SCALAR_FMT[vtype], value)


def kv_scalar(key, vtype, value, order="<"):
    return kv(key, vtype, scalar(vtype, value, order), order)


def kv_str(key, value, order="<"):
    return kv(key, STRING, gstr(value, order), order)


def array(etype, count, body=b"", order="<"):
    """An array value: element type, declared count, then `body` (which may hold fewer elements than declared)."""
    return struct.pack(order + "IQ", etype, count) + body


def kv_array(key, etype, count, body=b"", order="<"):
    return kv(key, ARRAY, array(etype, count, body, order), order)


def string_array_body(strings):
    return b"".join(gstr(s) for s in strings)


def tensor_info(name, dims, ggml_type=F32_TYPE, offset=0, order="<"):
    """`dims` in GGUF order (ne0 first, the fastest-varying dimension)."""
    return (gstr(name, order) + struct.pack(order + "I", len(dims)) + struct.pack(order + f"{len(dims)}Q", *dims)
            + struct.pack(order + "IQ", ggml_type, offset))


def gguf_file(kvs=(), tensors=(), data=b"", version=3, n_tensors=None, n_kv=None, alignment=32, order="<"):
    """A whole file; the counts default to the records given, `data` goes at the aligned data-section start."""
    head = b"GGUF" + struct.pack(order + "IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    if not data:
        return body
    return body + b"\0" * (-len(body) % alignment) + data


def f32_tensor_file(specs, kvs=(), alignment=32):
    """A valid file of F32 tensors: specs [(name, dims)], each tensor's data zero-filled and aligned."""
    infos, offset = [], 0
    for name, dims in specs:
        n = 4
        for d in dims:
            n *= d
        infos.append(tensor_info(name, dims, F32_TYPE, offset))
        offset += n + (-n % alignment)
    return gguf_file(kvs, infos, data=b"\0" * offset, alignment=alignment)
