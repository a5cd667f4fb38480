"""On-disk conditioning cache: text-encoder outputs as safetensors files, keyed by what produced them.

Pure torch + safetensors (no ComfyUI). A CONDITIONING is a list of [tensor, dict] entries; the tensors of every
entry are stored as safetensors tensors and the dict's other (JSON) values in the file's metadata. Writes go to a
`.partial` file that is renamed into place, so a crash never leaves a half-written entry under a real name. A read
that fails counts as a miss and the caller writes the entry again; a corrupt entry is deleted first. The directory is
kept under a byte cap by deleting the least recently used entries (a hit refreshes the entry's mtime; atime is
unreliable on noatime mounts). The cache is an optimization only: no file-system state, damaged file or odd string
makes it raise; it logs one line saying why it was skipped and the caller encodes as usual.
"""
import hashlib
import json
import logging
import os
import time

import torch

from ..loaders.errors import printable
from ..loaders.writers import PARTIAL, atomic_write

log = logging.getLogger("kontext_lowvram")

FORMAT = 1
SUFFIX = ".safetensors"
STALE_PARTIAL_SECONDS = 3600  # a writer that has not finished in an hour is gone
HEADER_SLACK = 1 << 20  # our safetensors headers are a few hundred bytes; bounds what a damaged file makes us read
_swept = set()  # directories whose stale temporaries this process has already removed


def file_identity(path) -> dict:
    """Who the weights are, from the file system alone (no bytes read): name, size and mtime. Touching or
    replacing the file changes it; moving it to another folder does not."""
    st = os.stat(path)
    return {"name": os.path.basename(os.fspath(path)), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def make_key(encoder, prompts, settings) -> str:
    """sha256 over canonical JSON of the encoder identity, the prompt(s) and the encoder settings."""
    blob = json.dumps({"format": FORMAT, "encoder": encoder, "prompts": prompts, "settings": settings},
                      sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    # surrogatepass: a lone surrogate (a prompt from JSON "\ud800", a file name os.fsdecode()d from non-UTF-8 bytes)
    # gets bytes of its own instead of raising; every other string encodes as plain UTF-8, so existing keys stay valid
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def pack(conditioning):
    """-> (tensors, entries) or None when something in it cannot be stored (e.g. hook objects)."""
    tensors, entries = {}, []
    for i, item in enumerate(conditioning):
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and torch.is_tensor(item[0]) and isinstance(item[1], dict)):
            return None
        tensors[f"{i}.cond"] = item[0]
        names, values = [], {}
        for k, v in item[1].items():
            if torch.is_tensor(v):
                tensors[f"{i}.{k}"] = v
                names.append(k)
            elif _jsonable(v):
                values[k] = v
            else:
                return None
        entries.append({"tensors": names, "values": values})
    # clone: safetensors refuses tensors that share storage (a pooled output can be a view of the hidden states)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, entries


def unpack(tensors, entries):
    if not (isinstance(entries, list) and all(isinstance(e, dict) and isinstance(e.get("tensors"), list)
                                              and isinstance(e.get("values"), dict) for e in entries)):
        raise ValueError("the entries in the metadata are not what this cache writes")
    out = []
    for i, e in enumerate(entries):
        d = {k: tensors[f"{i}.{k}"] for k in e["tensors"]}
        d.update(e["values"])
        out.append([tensors[f"{i}.cond"], d])
    if len(tensors) != sum(1 + len(e["tensors"]) for e in entries):
        raise ValueError("tensor count does not match the entries")
    return out


def decode(data: bytes, key: str):
    """An entry's bytes -> its conditioning. Metadata and tensors both come from these bytes, so a writer that
    replaces the file meanwhile cannot hand us its metadata with another writer's tensors."""
    from safetensors.torch import load
    n = int.from_bytes(data[:8], "little")  # safetensors: u64 header length, JSON header, tensor bytes
    if len(data) < 8 or n > min(len(data) - 8, HEADER_SLACK):
        raise ValueError("truncated file or implausible header length")
    meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
    if meta.get("klv_format") != str(FORMAT) or meta.get("klv_key") != key:
        raise ValueError("not an entry for this key")
    return unpack(load(data), json.loads(meta["klv_entries"]))


def is_temporary(name: str) -> bool:
    """A half-written file: ours (loaders.writers.atomic_write, `<name>.<pid>.<hex>.partial`) or safetensors' own
    (save_file >= 0.8 writes `.tmpXXXXXX` in the target's folder, then renames it onto the target; 0.7 wrote in
    place, which our .partial covers). Neither is ever read or counted as an entry."""
    return name.endswith(PARTIAL) or name.startswith(".tmp")


class CondCache:
    def __init__(self, directory, max_bytes: int):
        self.directory = os.fspath(directory)
        self.max_bytes = int(max_bytes)
        if self.directory not in _swept:  # first use in this process: clear what killed writers left behind
            _swept.add(self.directory)
            self.entries()

    def path_for(self, key: str) -> str:
        return os.path.join(self.directory, key + SUFFIX)

    def get(self, key: str):
        """The stored conditioning, or None (absent, unreadable, or corrupt: then the file is removed)."""
        path = self.path_for(key)
        try:
            with open(path, "rb") as f:  # one open, one read: everything below comes from the same bytes
                st = os.fstat(f.fileno())
                if st.st_size > self.max_bytes + HEADER_SLACK:
                    return None  # stored under a larger cap; put() says why it is not stored again
                data = f.read(st.st_size)
        except (OSError, ValueError) as e:  # absent, no folder, permissions, I/O error, NUL in the path, ...
            # a miss; the put() after it replaces the entry or logs the one line saying why it cannot
            log.debug("Kontext LowVRAM conditioning cache: %r not read (%s)", path, e)
            return None
        try:
            cond = decode(data, key)
        except Exception as e:  # a corrupt entry must never fail a prompt: recompute it
            removed = _remove(path, unless_replaced_since=st)
            _warn("corrupt entry %s ignored%s (%s: %s)", path, " and removed" if removed else "", type(e).__name__, e)
            return None
        try:
            os.utime(path)  # LRU: a hit makes the entry the most recent
        except OSError:
            pass
        return cond

    def put(self, key: str, conditioning) -> bool:
        """Store atomically; False when it cannot be stored (unserializable, larger than the cap, I/O error)."""
        from safetensors.torch import save_file
        packed = pack(conditioning)
        if packed is None:
            log.info("Kontext LowVRAM conditioning cache: this conditioning holds non-tensor objects; not cached")
            return False
        tensors, entries = packed
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if size > self.max_bytes:
            log.info("Kontext LowVRAM conditioning cache: this conditioning (%d bytes) is larger than the cap "
                     "(%d bytes); not cached", size, self.max_bytes)
            return False
        path = self.path_for(key)
        meta = {"klv_format": str(FORMAT), "klv_key": key, "klv_entries": json.dumps(entries)}
        try:
            os.makedirs(self.directory, exist_ok=True)
            atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        except Exception as e:  # disk full, read-only or uncreatable folder, a file in its place (safetensors
            # reports I/O errors as SafetensorError, not OSError): the prompt goes on uncached
            _warn("not stored in %s (%s: %s)", self.directory, type(e).__name__, e)
            return False
        self.evict(keep=path)
        return True

    def entries(self):
        """[(mtime, bytes, path)] of the stored entries, oldest first; removes stale temporaries on the way."""
        out = []
        try:
            names = os.listdir(self.directory)
        except (OSError, ValueError):
            return out
        for n in names:
            p = os.path.join(self.directory, n)
            try:
                st = os.stat(p)
            except OSError:
                continue
            if n.endswith(SUFFIX):
                out.append((st.st_mtime, st.st_size, p))
            elif is_temporary(n) and time.time() - st.st_mtime > STALE_PARTIAL_SECONDS:
                # by age, not pid: os.kill(pid, 0) terminates the process on Windows, and a folder shared by
                # machines or containers holds pids this process cannot see; a live writer touches its file
                _remove(p)
        return sorted(out)

    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self.entries())

    def evict(self, keep=None):
        """Delete least recently used entries until the total fits the cap; -> removed paths."""
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        removed = []
        for _, size, p in entries:
            if total <= self.max_bytes:
                break
            if p == keep:
                continue
            _remove(p)
            removed.append(p)
            total -= size
        return removed


def _warn(fmt, *args):
    """One log line; a lone surrogate in a path or message is escaped (a strict UTF-8 log stream would raise)."""
    log.warning("%s", printable("Kontext LowVRAM conditioning cache: " + fmt % args))


def _remove(path, unless_replaced_since=None) -> bool:
    """Delete quietly; with a stat result, only if `path` is still that file (not one a writer renamed in since)."""
    try:
        if unless_replaced_since is not None:
            now, then = os.stat(path), unless_replaced_since
            if (now.st_ino, now.st_dev) != (then.st_ino, then.st_dev):
                return False
        os.remove(path)
        return True
    except OSError:
        return False
