"""On-disk conditioning cache: text-encoder outputs as safetensors files, keyed by what produced them.

Pure torch + safetensors (no ComfyUI). A CONDITIONING is a list of [tensor, dict] entries; the tensors of every
entry are stored as safetensors tensors and the dict's other (JSON) values in the file's metadata. Writes go to a
`.partial` file that is renamed into place, so a crash never leaves a half-written entry under a real name. Reads
that fail for any reason count as a miss: the file is deleted and the caller writes it again. The directory is
kept under a byte cap by deleting the least recently used entries (a hit refreshes the entry's mtime; atime is
unreliable on noatime mounts).
"""
import hashlib
import json
import logging
import os
import time

import torch

from ..loaders.writers import PARTIAL, atomic_write

log = logging.getLogger("kontext_lowvram")

FORMAT = 1
SUFFIX = ".safetensors"
STALE_PARTIAL_SECONDS = 3600  # a writer that has not finished in an hour is gone


def file_identity(path) -> dict:
    """Who the weights are, from the file system alone (no bytes read): name, size and mtime. Touching or
    replacing the file changes it; moving it to another folder does not."""
    st = os.stat(path)
    return {"name": os.path.basename(os.fspath(path)), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def make_key(encoder, prompts, settings) -> str:
    """sha256 over canonical JSON of the encoder identity, the prompt(s) and the encoder settings."""
    blob = json.dumps({"format": FORMAT, "encoder": encoder, "prompts": prompts, "settings": settings},
                      sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


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
    out = []
    for i, e in enumerate(entries):
        d = {k: tensors[f"{i}.{k}"] for k in e["tensors"]}
        d.update(e["values"])
        out.append([tensors[f"{i}.cond"], d])
    if len(tensors) != sum(1 + len(e["tensors"]) for e in entries):
        raise ValueError("tensor count does not match the entries")
    return out


class CondCache:
    def __init__(self, directory, max_bytes: int):
        self.directory = os.fspath(directory)
        self.max_bytes = int(max_bytes)

    def path_for(self, key: str) -> str:
        return os.path.join(self.directory, key + SUFFIX)

    def get(self, key: str):
        """The stored conditioning, or None (absent, or unreadable: then the file is removed)."""
        from safetensors import safe_open
        path = self.path_for(key)
        if not os.path.isfile(path):
            return None
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("klv_format") != str(FORMAT) or meta.get("klv_key") != key:
                    raise ValueError("not an entry for this key")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            cond = unpack(tensors, json.loads(meta["klv_entries"]))
        except FileNotFoundError:  # evicted by another process between the check and the open
            return None
        except Exception as e:  # a corrupt entry must never fail a prompt: recompute it
            log.warning("Kontext LowVRAM conditioning cache: corrupt entry %s ignored and removed (%s: %s)",
                        path, type(e).__name__, e)
            _remove(path)
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
            return False
        os.makedirs(self.directory, exist_ok=True)
        path = self.path_for(key)
        meta = {"klv_format": str(FORMAT), "klv_key": key, "klv_entries": json.dumps(entries)}
        try:
            atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
        except OSError as e:
            log.warning("Kontext LowVRAM conditioning cache: could not write %s (%s)", path, e)
            return False
        self.evict(keep=path)
        return True

    def entries(self):
        """[(mtime, bytes, path)] of the stored entries, oldest first."""
        out = []
        try:
            names = os.listdir(self.directory)
        except OSError:
            return out
        for n in names:
            p = os.path.join(self.directory, n)
            try:
                st = os.stat(p)
            except OSError:
                continue
            if n.endswith(SUFFIX):
                out.append((st.st_mtime, st.st_size, p))
            elif n.endswith(PARTIAL) and time.time() - st.st_mtime > STALE_PARTIAL_SECONDS:
                _remove(p)  # left behind by a writer that was killed
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


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass
