"""The on-disk conditioning cache: exact roundtrip, keys, LRU cap, corrupt and half-written files."""
import os
import time

import pytest
import torch

from kontext_lowvram.optimizations import cond_cache
from kontext_lowvram.optimizations.cond_cache import CondCache, file_identity, make_key

MB = 1 << 20


def flux_cond(seed=0, tokens=256):
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, tokens, 4096, generator=g)
    return [[cond, {"pooled_output": torch.randn(1, 768, generator=g).to(torch.bfloat16),
                    "attention_mask": torch.ones(1, tokens, dtype=torch.int64), "note": "x", "strength": 0.5}]]


def assert_same(a, b):
    assert len(a) == len(b)
    for (ca, da), (cb, db) in zip(a, b):
        assert torch.equal(ca, cb) and ca.dtype == cb.dtype
        assert da.keys() == db.keys()
        for k in da:
            if torch.is_tensor(da[k]):
                assert torch.equal(da[k], db[k]) and da[k].dtype == db[k].dtype, k
            else:
                assert da[k] == db[k], k


def key(prompt="a cat", **kw):
    args = {"encoder": [{"name": "t5.gguf", "bytes": 1, "mtime_ns": 2}], "prompts": {"clip_l": prompt, "t5xxl": prompt},
            "settings": {"clip_type": "flux"}}
    args.update(kw)
    return make_key(args["encoder"], args["prompts"], args["settings"])


def test_roundtrip_is_exact_and_survives_a_new_instance(tmp_path):
    c = flux_cond()
    assert CondCache(tmp_path, 100 * MB).put(key(), c)
    assert_same(CondCache(tmp_path, 100 * MB).get(key()), c)  # a new instance = after a restart
    assert CondCache(tmp_path, 100 * MB).get(key("a dog")) is None


def test_pooled_view_of_cond_is_stored():
    """A pooled output sharing storage with the hidden states (safetensors refuses shared tensors unless copied)."""
    h = torch.randn(1, 8, 16)
    tensors, entries = cond_cache.pack([[h, {"pooled_output": h[:, 0]}]])
    assert_same(cond_cache.unpack(tensors, entries), [[h, {"pooled_output": h[:, 0]}]])


def test_key_changes_with_every_input():
    base = key()
    variants = [key("a cat "), key(prompts={"clip_l": "a cat", "t5xxl": "a dog"}),
                key(encoder=[{"name": "t5.gguf", "bytes": 1, "mtime_ns": 3}]),
                key(encoder=[{"name": "t5b.gguf", "bytes": 1, "mtime_ns": 2}]),
                key(settings={"clip_type": "flux", "comfyui": "0.3.64"})]
    assert len({base, *variants}) == len(variants) + 1
    assert key() == base and len(base) == 64


def test_file_identity_reads_no_bytes(tmp_path):
    p = tmp_path / "w.safetensors"
    p.write_bytes(b"x" * 10)
    os.chmod(p, 0)  # unreadable (for non-root users); stat still works
    try:
        ident = file_identity(p)
    finally:
        os.chmod(p, 0o644)
    assert ident["name"] == "w.safetensors" and ident["bytes"] == 10
    os.utime(p, ns=(1, ident["mtime_ns"] + 1))
    assert file_identity(p) != ident  # touched -> new identity


def test_lru_eviction_respects_cap(tmp_path):
    one = flux_cond(0)  # ~4.2 MB
    size = sum(t.numel() * t.element_size() for t in cond_cache.pack(one)[0].values())
    cache = CondCache(tmp_path, int(3.5 * size))
    keys = [key(f"p{i}") for i in range(5)]
    for i, k in enumerate(keys[:3]):
        assert cache.put(k, flux_cond(i))
        os.utime(cache.path_for(k), (time.time() - 100 + i, time.time() - 100 + i))
    assert cache.get(keys[0]) is not None  # a hit makes p0 the most recent
    cache.put(keys[3], flux_cond(3))  # over the cap: the least recently used (p1) goes
    assert not os.path.exists(cache.path_for(keys[1]))
    assert all(os.path.exists(cache.path_for(k)) for k in (keys[0], keys[2], keys[3]))
    assert cache.total_bytes() <= cache.max_bytes
    assert not CondCache(tmp_path, size // 2).put(keys[4], flux_cond(4))  # larger than the cap: not stored


@pytest.mark.parametrize("damage", ["garbage", "truncate", "other_key", "bad_entries"])
def test_corrupt_entry_is_ignored_then_rewritten(tmp_path, damage, caplog):
    cache = CondCache(tmp_path, 100 * MB)
    c = flux_cond()
    cache.put(key(), c)
    path = cache.path_for(key())
    if damage == "garbage":
        open(path, "wb").write(os.urandom(1000))
    elif damage == "truncate":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    elif damage == "other_key":  # a valid entry stored under the wrong name
        cache.put(key("other"), flux_cond(1))
        os.replace(cache.path_for(key("other")), path)
    else:
        from safetensors.torch import save_file
        save_file({"0.cond": torch.zeros(1)}, path, metadata={"klv_format": "1", "klv_key": key(), "klv_entries": "[{}]"})
    assert cache.get(key()) is None
    assert not os.path.exists(path) and "corrupt entry" in caplog.text
    assert cache.put(key(), c)
    assert_same(cache.get(key()), c)


def test_write_is_atomic(tmp_path, monkeypatch):
    cache = CondCache(tmp_path, 100 * MB)
    real_replace = os.replace

    def crash(src, dst):  # the process dies after writing the .partial, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(cond_cache.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.put(key(), flux_cond())
    assert os.listdir(tmp_path) == []  # neither an entry nor the temp file is left
    monkeypatch.setattr(cond_cache.os, "replace", real_replace)

    # a writer killed outright leaves its .partial: readers never see it, and a later sweep removes it when stale
    stale = tmp_path / (key() + ".safetensors.123.abcd.partial")
    stale.write_bytes(b"half")
    assert cache.get(key()) is None
    cache.put(key("b"), flux_cond(1))
    assert stale.exists()  # fresh: maybe a live writer
    os.utime(stale, (time.time() - 2 * cond_cache.STALE_PARTIAL_SECONDS,) * 2)
    cache.evict()
    assert not stale.exists()


def test_unserializable_conditioning_is_not_cached(tmp_path):
    cache = CondCache(tmp_path, 100 * MB)
    assert not cache.put(key(), [[torch.zeros(1, 2, 3), {"hooks": object()}]])
    assert os.listdir(tmp_path) == []
