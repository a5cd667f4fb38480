"""Bounded validation of a GGUF file's header, run before `gguf.GGUFReader` is handed the file.

GGUFReader trusts every count in a header and builds numpy views item by item, so a 60-byte file that declares a
2^60-element array makes it loop and grow without end. Here every count is checked against the bytes that remain
and against caps, reading only the header (buffered, bounded reads; tensor data is never read), and the memory
GGUFReader will need is estimated from what it builds per item (measured with gguf 0.19 / numpy 2.4, RSS growth
while GGUFReader parses): ≈1.36 KB per string array element, ≈0.71 KB per numeric element, ≈2.0 KB per nested
array, ≈3.2 KB per key/value, ≈5.2 KB per tensor, plus about twice each key / tensor name's length.
"""
import os
import struct
from typing import NamedTuple

from .errors import REDOWNLOAD, ModelFileError, check_file

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
GGML_MAX_DIMS = 4  # llama.cpp's limit; gguf-py writes no more
DEFAULT_ALIGNMENT = 32

MAX_TENSORS = 65536  # FLUX.1 has ~800, the largest LLM GGUFs a few thousand
MAX_KVS = 65536  # city96 files carry one comfy.gguf.orig_shape.* entry per reshaped tensor
MAX_KEY_BYTES = 64 * 1024  # keys and tensor names
MAX_STRING_BYTES = 64 * 1024 * 1024  # one string value (chat templates, tokenizer.huggingface.json are MBs)
MAX_ARRAY_DEPTH = 3  # arrays of arrays of arrays; no real file nests at all (llama.cpp rejects any nesting)
# What GGUFReader may cost in RSS (estimate below). 768 MiB keeps a worst-case file well under 1 GiB of growth and
# admits the largest real tokenizers: Gemma 3 (262k tokens + scores + types, ≈720 MiB), Llama 3 / Mistral 3
# (≈130k tokens + ≈280k merges + types, ≈650 MiB), Qwen3 (≈520 MiB). 1M numeric elements pass; 1M strings
# (1.3 GiB measured) do not.
READER_BUDGET = 768 * 1024 * 1024
PART_COST = 720  # one numpy view GGUFReader makes: a scalar, a string's length or its bytes, an array header field
KV_COST = 3300  # a key/value record with one value part: its views, ReaderField, dict entry
TENSOR_COST = 5300  # a tensor info: 6 views, ReaderField, ReaderTensor, the data view

# GGUF value types: 0..12 (GGUFValueType); fixed sizes of the scalar ones.
STRING, ARRAY, UINT32 = 8, 9, 4
SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
TYPE_NAMES = ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL", "STRING", "ARRAY",
              "UINT64", "INT64", "FLOAT64")
MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, the smallest value
MIN_TENSOR_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset
INT64_MAX = 2 ** 63 - 1
CHUNK = 1 << 20

_U32, _U64, _ARRAY_HEAD = struct.Struct("<I"), struct.Struct("<Q"), struct.Struct("<IQ")
_HEAD = struct.Struct("<4sIQQ")


def _q(name):
    """A key or tensor name for a message, clipped: a hostile one can be 64 KiB."""
    text = repr(name)
    return text if len(text) <= 100 else text[:97] + "..."


class GGUFHeader(NamedTuple):
    version: int
    tensor_count: int
    kv_count: int
    alignment: int
    data_offset: int  # where the tensor data section starts (header end rounded up to the alignment)
    array_elements: int  # metadata array elements, nested ones included
    reader_bytes: int  # estimated RSS GGUFReader will take to parse this header


def gguf_module(path):
    """The gguf package, or the ModelFileError that says how to get it."""
    try:
        import gguf
    except ImportError:
        raise ModelFileError(path, "reading GGUF files needs the 'gguf' Python package",
                             "pip install gguf (into the Python that runs ComfyUI)") from None
    return gguf


def validate_gguf_header(path) -> GGUFHeader:
    """Check a GGUF header against its file (see the module doc); ModelFileError naming the file and what is wrong."""
    path = check_file(path)
    gguf = gguf_module(path)
    with open(path, "rb") as f:
        return _Parser(f, os.path.getsize(path), path, gguf).parse()


class _Parser:
    def __init__(self, f, size, path, gguf):
        self.f, self.size, self.path, self.gguf = f, size, path, gguf
        self.pos = 0  # file offset of the next unread byte
        self.buf, self.buf_start = b"", 0
        self.where = "the GGUF header"
        self.cost = 0
        self.elements = 0

    # ---- bounded reads ----
    def fail(self, problem, fix=REDOWNLOAD, plain=False):
        raise ModelFileError(self.path, problem if plain else "invalid GGUF header: " + problem, fix)

    def _fill(self, n):
        """Make [pos, pos + n) readable in self.buf; the offset of pos in it."""
        if n > self.size - self.pos:
            self.fail(f"ends inside {self.where} (byte {self.pos} of {self.size})")
        off = self.pos - self.buf_start
        if 0 <= off and off + n <= len(self.buf):
            return off
        self.f.seek(self.pos)
        self.buf, self.buf_start = self.f.read(max(n, min(CHUNK, self.size - self.pos))), self.pos
        if len(self.buf) < n:
            self.fail(f"ends inside {self.where}: the file shrank while being read")
        return 0

    def unpack(self, st):
        off = self._fill(st.size)
        self.pos += st.size
        return st.unpack_from(self.buf, off)

    def u32(self):
        return self.unpack(_U32)[0]

    def u64(self):
        return self.unpack(_U64)[0]

    def skip(self, n):
        if n > self.size - self.pos:
            self.fail(f"ends inside {self.where} (needs {n} more bytes at byte {self.pos}, the file has "
                      f"{self.size})")
        self.pos += n

    def name(self, what):
        """A key or tensor name: bounded, UTF-8 (GGUFReader decodes it and would fail less clearly)."""
        n = self.u64()
        if n > MAX_KEY_BYTES:
            self.fail(f"{what} is {n} bytes long (at most {MAX_KEY_BYTES} allowed)")
        off = self._fill(n)
        self.pos += n
        try:
            return self.buf[off:off + n].decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} at byte {self.pos - n} is not valid UTF-8")

    def charge(self, cost, what):
        self.cost += cost
        if self.cost > READER_BUDGET:
            self.fail(f"{what} would make the GGUF reader build more than {READER_BUDGET >> 20} MiB of Python "
                      f"objects (the file declares absurd sizes)", "the file is corrupt or not a real GGUF: "
                      "download it again")

    # ---- the format ----
    def parse(self):
        if self.size < _HEAD.size:
            self.fail(f"is {self.size} bytes, too short for a GGUF header ({_HEAD.size} bytes)", plain=True)
        magic, version, n_tensors, n_kv = self.unpack(_HEAD)
        if magic != MAGIC:
            self.fail(f"is not a GGUF file (starts with {magic!r}, not {MAGIC!r})", plain=True)
        self._check_version(version)
        left = self.size - self.pos
        for count, cap, least, what in ((n_tensors, MAX_TENSORS, MIN_TENSOR_BYTES, "tensors"),
                                        (n_kv, MAX_KVS, MIN_KV_BYTES, "metadata entries")):
            if count > cap:
                self.fail(f"declares {count} {what}, more than the {cap} allowed")
            if count * least > left:
                self.fail(f"declares {count} {what}, but its remaining {left} bytes hold at most {left // least}")
        if n_tensors * MIN_TENSOR_BYTES + n_kv * MIN_KV_BYTES > left:
            self.fail(f"declares {n_tensors} tensors and {n_kv} metadata entries, more than its {left} "
                      "remaining bytes can hold")
        self.charge(n_tensors * TENSOR_COST + n_kv * KV_COST, f"{n_tensors} tensors and {n_kv} metadata entries")
        alignment = self._kvs(n_kv)
        tensors = self._tensor_infos(n_tensors)
        data_offset = self.pos + (-self.pos % alignment)
        self._check_tensor_ranges(tensors, data_offset, alignment)
        return GGUFHeader(version, n_tensors, n_kv, alignment, data_offset, self.elements, self.cost)

    def _check_version(self, version):
        if version in SUPPORTED_VERSIONS:
            return
        swapped = struct.unpack(">I", struct.pack("<I", version))[0]
        if version and version & 0xFFFF == 0:  # gguf-py's test: a small version number read with swapped bytes
            self.fail(f"is a big-endian GGUF (version {swapped}); big-endian GGUF is not supported",
                      "use the little-endian file (the usual download) or convert it with gguf-py's "
                      "gguf_convert_endian", plain=True)
        if version == 1:
            self.fail("is GGUF version 1, an obsolete format that is no longer read",
                      "download a current (v3) file or reconvert the model with a recent llama.cpp / ComfyUI-GGUF",
                      plain=True)
        self.fail(f"is GGUF version {version}, which is not supported (versions 2 and 3 are)",
                  "is it really a GGUF? " + REDOWNLOAD, plain=True)

    def unique_name(self, seen, where, what, where_named, what_named):
        """The next key or tensor name, refused when `seen` has it, its text charged to the reader budget. `where` /
        `what` word the record and the name before it is read, `where_named` / `what_named` ("... {}") after."""
        self.where = where
        name = self.name(what)
        self.where = where_named.format(_q(name))
        label = what_named.format(_q(name))
        if name in seen:
            self.fail(f"{label} appears twice")
        seen.add(name)
        self.charge(2 * len(name), label)
        return name

    def _kvs(self, n_kv):
        alignment, keys = DEFAULT_ALIGNMENT, set()
        for i in range(n_kv):
            key = self.unique_name(keys, f"metadata entry {i}", f"metadata key {i}", "metadata entry {}",
                                   "metadata key {}")
            vtype = self.u32()
            if key == "general.alignment":
                alignment = self._alignment(vtype)
            else:
                self._value(vtype, key, depth=0)
        return alignment

    def _alignment(self, vtype):
        if vtype != UINT32:
            self.fail(f"general.alignment must be a UINT32, not {TYPE_NAMES[vtype] if vtype < 13 else vtype}")
        a = self.u32()
        if a == 0 or a & (a - 1):
            self.fail(f"general.alignment is {a}, not a power of two")
        return a

    def _value(self, vtype, key, depth):
        if vtype in SCALAR_SIZE:
            self.skip(SCALAR_SIZE[vtype])
        elif vtype == STRING:
            self.charge(PART_COST, f"metadata {_q(key)}")
            n = self.u64()
            if n > MAX_STRING_BYTES:
                self.fail(f"metadata {_q(key)} holds a {n}-byte string (at most {MAX_STRING_BYTES} allowed)")
            self.skip(n)
        elif vtype == ARRAY:
            self._array(key, depth + 1)
        else:
            self.fail(f"metadata {_q(key)} has unknown value type {vtype} (GGUF has 0..12)")

    def _array(self, key, depth):
        if depth > MAX_ARRAY_DEPTH:
            self.fail(f"metadata {_q(key)} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        etype, count = self.unpack(_ARRAY_HEAD)
        if depth == 1:  # a top-level array's type + count: one part more than the scalar KV_COST assumes
            self.charge(PART_COST, f"metadata {_q(key)}")
        if etype in SCALAR_SIZE:
            least, parts = SCALAR_SIZE[etype], 1
        elif etype == STRING:
            least, parts = 8, 2
        elif etype == ARRAY:
            least, parts = _ARRAY_HEAD.size, 2  # each inner array's type + count; its elements are charged inside
        else:
            self.fail(f"metadata array {_q(key)} has unknown element type {etype} (GGUF has 0..12)")
        left = self.size - self.pos
        if count * least > left:
            self.fail(f"metadata array {_q(key)} declares {count} {TYPE_NAMES[etype]} elements, but the remaining "
                      f"{left} bytes hold at most {left // least}")
        self.elements += count
        self.charge(count * parts * PART_COST, f"metadata array {_q(key)} ({count} {TYPE_NAMES[etype]} elements)")
        if etype in SCALAR_SIZE:
            self.skip(count * least)
        elif etype == STRING:
            self._skip_strings(count, key)
        else:
            for _ in range(count):
                self._array(key, depth + 1)

    def _skip_strings(self, count, key):
        """Walk `count` length-prefixed strings: lengths are read from the buffer, contents skipped by arithmetic."""
        unpack_u64, done = _U64.unpack_from, 0
        while done < count:
            off = self._fill(8)
            buf, base, end = self.buf, self.buf_start, len(self.buf)
            while True:  # stay inside the buffer while the next length is in it
                n = unpack_u64(buf, off)[0]
                if n > MAX_STRING_BYTES:
                    self.fail(f"metadata array {_q(key)} element {done} is a {n}-byte string")
                done += 1
                nxt = off + 8 + n
                if done == count or nxt + 8 > end:
                    break
                off = nxt
            self.pos = base + off
            self.skip(8 + n)  # the last string seen may run past the buffer or the file: checked here

    def _tensor_infos(self, n_tensors):
        gguf, tensors, names = self.gguf, [], set()
        for i in range(n_tensors):
            name = self.unique_name(names, f"tensor info {i}", f"tensor {i}'s name", "the info of tensor {}",
                                    "tensor {}")
            n_dims = self.u32()
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                self.fail(f"tensor {_q(name)} has {n_dims} dimensions (GGUF tensors have 1 to {GGML_MAX_DIMS})")
            dims = self.unpack(struct.Struct(f"<{n_dims}Q"))
            numel = 1
            for d in dims:
                if d < 1 or d > INT64_MAX:
                    self.fail(f"tensor {_q(name)} has an invalid dimension {d} in shape {list(dims)}")
                numel *= d
            if numel > INT64_MAX:
                self.fail(f"tensor {_q(name)} has an absurd shape {list(dims)} ({numel} elements)")
            type_id, offset = self.unpack(_ARRAY_HEAD)
            try:
                qtype = gguf.GGMLQuantizationType(type_id)
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                self.fail(f"tensor {_q(name)} uses quant type {type_id}, which this gguf library does not know",
                          "update gguf (`pip install -U gguf`) or requantize with a supported type; "
                          "if neither helps, " + REDOWNLOAD)
            if dims[0] % block:
                self.fail(f"tensor {_q(name)}: its first dimension {dims[0]} is not a whole number of "
                          f"{qtype.name} blocks ({block} values each)")
            tensors.append((name, offset, numel // block * type_size))
        return tensors

    def _check_tensor_ranges(self, tensors, data_offset, alignment):
        spans = []
        for name, offset, nbytes in tensors:
            if offset % alignment:
                self.fail(f"tensor {_q(name)} starts at data offset {offset}, not a multiple of the alignment "
                          f"{alignment}")
            start = data_offset + offset
            if start + nbytes > self.size:
                self.fail(f"tensor {_q(name)} needs bytes {start}..{start + nbytes} but the file has only "
                          f"{self.size}")
            spans.append((start, start + nbytes, name))
        spans.sort()
        if not spans:
            return
        last = spans[0]  # the span reaching furthest so far
        for span in spans[1:]:
            if span[0] < last[1]:
                how = "share the same bytes" if span[:2] == last[:2] else "overlap"
                self.fail(f"tensors {_q(last[2])} and {_q(span[2])} {how} ({last[0]}..{last[1]} and "
                          f"{span[0]}..{span[1]})")
            if span[1] > last[1]:
                last = span
