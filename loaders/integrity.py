"""sha256 sidecars: `<file>.sha256` next to a weights file, in `sha256sum`'s format ("<hex>  <name>\\n"), checked
before the file is loaded. No sidecar: no check. A file's digest is computed once per identity (path, size,
mtime) in this process, so loading the same 12 GB file again does not read it twice."""
import hashlib
import logging
import os
import re
import time
from typing import NamedTuple

from .errors import ModelFileError, printable

log = logging.getLogger("kontext_lowvram")

SUFFIX = ".sha256"
CHUNK = 8 << 20  # bytes read per step (and per progress report)
MAX_SIDECAR = 1 << 20  # a checksum list longer than this is not a sidecar
# sha256sum's line: optional "\" (escaped name), 64 hex digits, then " " + " " (text) or "*" (binary) + the name.
_LINE = re.compile(rb"^(\\?)([0-9a-fA-F]{64})(?:[ \t]+\*?(.*))?$")
_BSD_LINE = re.compile(rb"^SHA256 \((.*)\) = ([0-9a-fA-F]{64})$")  # `shasum -a 256 --tag`, BSD/macOS `sha256`

_digests = {}  # (real path, size, mtime_ns) -> hex digest


class SidecarCheck(NamedTuple):
    sidecar: str
    digest: str
    hashed: bool  # False when the digest came from this process's cache


def sidecar_path(path) -> str:
    return os.fspath(path) + SUFFIX


def identity(path):
    st = os.stat(path)
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


def sha256_file(path, progress=None, chunk=None) -> str:
    """The file's sha256 (hex), read `chunk` bytes (default CHUNK) at a time; `progress(bytes done, total)` after
    each."""
    chunk = chunk or CHUNK
    h = hashlib.sha256()
    total = os.path.getsize(path)
    buf = bytearray(chunk)
    view = memoryview(buf)
    done = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            done += n
            if progress:
                progress(done, total)
    return h.hexdigest()


def file_digest(path, progress=None):
    """-> (hex digest, whether the file was read): once per file identity per process."""
    key = identity(path)
    if key in _digests:
        return _digests[key], False
    digest = sha256_file(path, progress)
    if identity(path) == key:  # a file changed while it was read gets no cache entry
        _digests[key] = digest
    return digest, True


def _unescape(name: bytes) -> bytes:
    return re.sub(rb"\\(.)", lambda m: b"\n" if m.group(1) == b"n" else m.group(1), name)


def read_sidecar(path):
    """The digest `<path>.sha256` expects for `path` (lower-case hex), None when there is no sidecar.
    ModelFileError naming the sidecar when it is unreadable or holds no sha256sum line for the file."""
    side = sidecar_path(path)
    if not os.path.isfile(side):
        return None
    fix = (f"write it as `sha256sum` does ('<64 hex digits>  {printable(os.path.basename(os.fspath(path)))}'), or "
           "delete it to load the file unchecked")
    if os.path.getsize(side) > MAX_SIDECAR:
        raise ModelFileError(side, f"is {os.path.getsize(side)} bytes, too long for a sha256 sidecar", fix)
    try:
        with open(side, "rb") as f:
            lines = [ln.strip(b"\r") for ln in f.read().split(b"\n") if ln.strip()]
    except OSError as e:
        raise ModelFileError(side, f"cannot be read ({type(e).__name__}: {e.strerror or e})", fix) from None
    entries = []
    for ln in lines:
        m, bsd = _LINE.match(ln.strip()), _BSD_LINE.match(ln.strip())
        if m is not None:
            name = m.group(3) or b""
            entries.append((m.group(2).decode().lower(), _unescape(name) if m.group(1) else name))
        elif bsd is not None:
            entries.append((bsd.group(2).decode().lower(), bsd.group(1)))
        else:
            raise ModelFileError(side, f"is not a sha256sum file (line {printable(ln[:80])!r})", fix)
    if not entries:
        raise ModelFileError(side, "is empty", fix)
    if len(entries) == 1:  # a renamed file keeps its sidecar: the one entry is this file's, whatever its name says
        return entries[0][0]
    own = os.path.basename(os.fsencode(os.fspath(path)))
    named = [d for d, name in entries if os.path.basename(name.replace(b"\\", b"/")) == own]
    if not named:
        raise ModelFileError(side, f"lists {len(entries)} files, none named {printable(own)}", fix)
    return named[0]


def write_sidecar(path, progress=None) -> str:
    """Write `<path>.sha256` for the file as it is now (atomically) -> the sidecar's path."""
    path = os.fspath(path)
    digest, _ = file_digest(path, progress)
    name = os.fsencode(os.path.basename(path))
    escaped = b"\\" in name or b"\n" in name
    if escaped:
        name = name.replace(b"\\", b"\\\\").replace(b"\n", b"\\n")
    side = sidecar_path(path)
    tmp = f"{side}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write((b"\\" if escaped else b"") + digest.encode() + b"  " + name + b"\n")
    os.replace(tmp, side)
    return side


def mismatch_error(path, actual, expected) -> ModelFileError:
    side = os.path.basename(sidecar_path(path))
    return ModelFileError(path, f"its sha256 is {actual}, but {side} expects {expected}",
                          f"the file is damaged or incomplete: download it again (if you changed the file on purpose, "
                          f"delete {side} or rewrite it with `kontext-lowvram inspect --write-sidecar FILE`)")


def verify_sidecar(path, progress=None):
    """Check `path` against its sidecar -> SidecarCheck, or None when it has none (nothing is read then).
    ModelFileError naming the file, both digests and the fix when they differ."""
    path = os.fspath(path)
    expected = read_sidecar(path)
    if expected is None:
        return None
    t0 = time.perf_counter()
    actual, hashed = file_digest(path, progress)
    if actual != expected:
        raise mismatch_error(path, actual, expected)
    how = f"read in {time.perf_counter() - t0:.1f} s" if hashed else "hashed earlier, the file is unchanged since"
    log.info("Kontext LowVRAM: %s matches its sha256 sidecar (%s)", printable(os.path.basename(path)), how)
    return SidecarCheck(sidecar_path(path), actual, hashed)


def clear_cache():
    _digests.clear()
