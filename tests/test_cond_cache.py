"""The on-disk conditioning cache: exact roundtrip, keys, LRU cap, corrupt and half-written files."""
import errno
import os
import shutil
import subprocess
import sys
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


# ---- the cache never fails a prompt -------------------------------------------------------------------------------

def warnings_of(caplog):
    return [r for r in caplog.records if r.levelno >= 30]


def test_keys_of_ordinary_prompts_are_unchanged():
    """Pinned from the code before the surrogate fix: existing caches stay valid."""
    assert key() == "a663f6b00a97f933e33eecb0fdaf341551d31d4b28be215978ccf9d57e423c87"
    enc = [{"name": "clip_l.safetensors", "bytes": 246144152, "mtime_ns": 1700000000000000000},
           {"name": "t5xxl_fp8_e4m3fn.safetensors", "bytes": 4893934904, "mtime_ns": 1700000000000000001}]
    prompts = {"clip_l": "Ein Fuchs 🦊 im Schnee — «hiver»", "t5xxl": "שלום \u200f mixed"}
    assert make_key(enc, prompts, {"clip_type": "flux", "comfyui": "0.3.64"}) == \
        "a539445d2a5b9a4b19639d013b106dc0b30fd8757f3dedcad8fc67d33b474280"


ODD = ["\ud800", "a\udce9", "\ud83d\ude00", "😀", "\x00", "a\x00b", "\u200f\u202eRTL", "🦊" * 300, ""]


def test_odd_prompts_and_file_names_get_their_own_keys_and_roundtrip(tmp_path):
    bad_name = os.fsdecode(b"t5_\xff\xfe.gguf")  # non-UTF-8 bytes come back as surrogate escapes
    keys = [key(p) for p in ODD] + [key(encoder=[{"name": bad_name, "bytes": 1, "mtime_ns": 2}])]
    assert len(set(keys)) == len(keys) and all(len(k) == 64 for k in keys)
    cache = CondCache(tmp_path, 100 * MB)
    for i, k in enumerate(keys):
        assert cache.put(k, flux_cond(i, tokens=4))
    for i, k in enumerate(keys):
        assert_same(cache.get(k), flux_cond(i, tokens=4))


def file_in_the_way(tmp_path):
    f = tmp_path / "file"
    f.write_bytes(b"not a folder")
    return f


@pytest.mark.parametrize("where", ["dir_is_a_file", "parent_is_a_file", "nul_in_path", "name_too_long"])
def test_unusable_directory_is_skipped_with_one_line(tmp_path, where, caplog):
    d = {"dir_is_a_file": lambda: file_in_the_way(tmp_path),
         "parent_is_a_file": lambda: file_in_the_way(tmp_path) / "cond_cache",
         "nul_in_path": lambda: tmp_path / "a\x00b",
         "name_too_long": lambda: tmp_path / ("x" * 300)}[where]()
    cache = CondCache(d, 100 * MB)
    assert cache.get(key()) is None
    assert cache.put(key(), flux_cond(tokens=4)) is False
    assert cache.entries() == [] and cache.total_bytes() == 0 and cache.evict() == []
    (w,) = warnings_of(caplog)
    assert "not stored" in w.getMessage() and "Traceback" not in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ([] if where in ("nul_in_path", "name_too_long") else ["file"])


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody can write to. Root ignores permission bits, so for root it is made immutable (chattr +i)."""
    d = tmp_path / "ro"
    d.mkdir()
    CondCache(d, 100 * MB).put(key("old"), flux_cond(tokens=4))  # one entry written before
    os.chmod(d, 0o555)
    immutable = os.access(d, os.W_OK)
    if immutable and (not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(d)]).returncode):
        os.chmod(d, 0o755)
        pytest.skip("running as root without chattr: no way to make a folder read-only")
    yield d
    if immutable:
        subprocess.run(["chattr", "-i", str(d)], check=True)
    os.chmod(d, 0o755)


def test_read_only_directory_still_serves_hits(read_only_dir, caplog):
    cache = CondCache(read_only_dir, 100 * MB)
    assert_same(cache.get(key("old")), flux_cond(tokens=4))  # the hit's mtime refresh fails quietly
    assert cache.get(key()) is None and not cache.put(key(), flux_cond(1, tokens=4))
    (w,) = warnings_of(caplog)
    assert "not stored" in w.getMessage()
    assert sorted(os.listdir(read_only_dir)) == [key("old") + ".safetensors"]


@pytest.mark.parametrize("error", ["oserror", "safetensors_error"])
def test_full_disk_is_skipped_with_one_line(tmp_path, monkeypatch, caplog, error):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(tensors, tmp, metadata=None):  # as the real writers fail when the disk fills mid-write
        open(tmp, "wb").write(b"half")
        if error == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    cache = CondCache(tmp_path, 100 * MB)
    assert cache.put(key(), flux_cond(tokens=4)) is False
    (w,) = warnings_of(caplog)
    assert "not stored" in w.getMessage() and "No space left" in w.getMessage()
    assert os.listdir(tmp_path) == []  # the half-written temp file is gone
    assert cache.get(key()) is None


def test_unreadable_entry_is_a_miss(tmp_path, caplog):
    cache = CondCache(tmp_path, 100 * MB)
    os.mkdir(cache.path_for(key()))  # something that open() refuses where the entry should be
    assert cache.get(key()) is None  # a miss; the put that follows says why nothing is cached
    assert not cache.put(key(), flux_cond(tokens=4))  # a folder cannot be replaced by a file
    (w,) = warnings_of(caplog)
    assert "not stored" in w.getMessage() and "IsADirectoryError" in w.getMessage()


@pytest.mark.parametrize("damage", ["empty", "huge_header", "header_not_json", "no_metadata", "other_format",
                                    "entries_not_a_list", "values_not_a_dict", "missing_tensor"])
def test_entry_that_is_not_what_we_wrote_is_ignored_and_rewritten(tmp_path, damage, caplog):
    from safetensors.torch import save_file
    cache = CondCache(tmp_path, 100 * MB)
    path, c = cache.path_for(key()), flux_cond(tokens=4)
    good = {"klv_format": "1", "klv_key": key(),
            "klv_entries": '[{"tensors": ["pooled_output", "attention_mask"], "values": {"note": "x"}}]'}
    tensors = cond_cache.pack(c)[0]
    if damage == "empty":
        open(path, "wb").close()
    elif damage == "huge_header":  # a length that would make a naive reader allocate petabytes
        open(path, "wb").write((1 << 60).to_bytes(8, "little") + b"{}")
    elif damage == "header_not_json":
        open(path, "wb").write((8).to_bytes(8, "little") + b"\xff\xfe{]....")
    elif damage == "no_metadata":
        save_file(tensors, path)
    elif damage == "missing_tensor":
        save_file({k: v for k, v in tensors.items() if k != "0.attention_mask"}, path, metadata=good)
    else:
        meta = dict(good)
        if damage == "other_format":
            meta["klv_format"] = "2"
        elif damage == "entries_not_a_list":
            meta["klv_entries"] = '{"tensors": [], "values": {}}'
        else:
            meta["klv_entries"] = '[{"tensors": ["pooled_output", "attention_mask"], "values": [["note", "x"]]}]'
        save_file(tensors, path, metadata=meta)
    assert cache.get(key()) is None
    (w,) = warnings_of(caplog)
    assert "corrupt entry" in w.getMessage() and not os.path.exists(path)
    assert cache.put(key(), c)
    assert_same(cache.get(key()), c)


def test_entry_larger_than_the_cap_is_not_read(tmp_path, caplog):
    CondCache(tmp_path, 100 * MB).put(key(), flux_cond())  # ~4.2 MB, stored under a larger cap
    small = CondCache(tmp_path, MB // 4)
    assert small.get(key()) is None and os.path.exists(small.path_for(key()))  # a miss, not "corrupt"
    assert not warnings_of(caplog)


# ---- consistent reads under concurrent writers ----------------------------------------------------------------------

WRITER = r"""
import os, sys, time, torch
from kontext_lowvram.optimizations.cond_cache import CondCache
folder, key, value, n = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
cond = [[torch.full((1, 256, 1024), value), {"pooled_output": torch.full((1, 768), value), "writer": value}]]
cache = CondCache(folder, 1 << 30)
open(os.path.join(folder, f"ready{value}"), "w").close()
while not os.path.exists(os.path.join(folder, "go")):
    time.sleep(0.001)
for _ in range(n):
    assert cache.put(key, cond)
"""


def test_reads_are_consistent_under_concurrent_writers_of_one_key(tmp_path, caplog):
    """Two processes keep replacing one entry with different conditionings while this one reads it: every read is
    one writer's tensors with that writer's metadata, or a miss; never a mix, never an exception or 'corrupt'."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(cache_dir), key(), v, "60"]) for v in ("1", "2")]
    try:
        while not all((cache_dir / f"ready{v}").exists() for v in (1.0, 2.0)):
            assert all(w.poll() is None for w in writers), "a writer died while starting"
            time.sleep(0.01)
        cache = CondCache(cache_dir, 1 << 30)
        (cache_dir / "go").touch()
        seen = {1.0: 0, 2.0: 0, None: 0}
        while any(w.poll() is None for w in writers):
            got = cache.get(key())
            if got is None:
                seen[None] += 1
                continue
            (cond, d), = got
            v = d["writer"]
            assert torch.equal(cond, torch.full((1, 256, 1024), v)), "tensors of one writer, metadata of the other"
            assert torch.equal(d["pooled_output"], torch.full((1, 768), v))
            seen[v] += 1
    finally:
        for w in writers:
            w.wait(60)
    assert [w.returncode for w in writers] == [0, 0]
    assert seen[1.0] and seen[2.0], seen  # the reads really interleaved with both writers
    assert not warnings_of(caplog)


# ---- stale temporaries ----------------------------------------------------------------------------------------------

HANGING_WRITER = r"""
import os, sys, time, torch
from kontext_lowvram.optimizations.cond_cache import CondCache
def hang(src, dst):  # the .partial is complete; the process is killed before renaming it into place
    open(sys.argv[3], "w").close()
    time.sleep(600)
os.replace = hang
CondCache(sys.argv[1], 1 << 30).put(sys.argv[2], [[torch.ones(1, 4, 8), {"pooled_output": torch.ones(1, 8)}]])
"""


def test_killed_writers_temporaries_are_ignored_then_cleared_on_the_next_start(tmp_path, monkeypatch):
    signal = tmp_path / "in_rename"
    d = tmp_path / "cache"
    writer = subprocess.Popen([sys.executable, "-c", HANGING_WRITER, str(d), key(), str(signal)])
    try:
        for _ in range(6000):
            if signal.exists() or writer.poll() is not None:
                break
            time.sleep(0.01)
        assert signal.exists(), "the writer never reached the rename"
        (ours,) = [n for n in os.listdir(d) if n.endswith(".partial")]
        assert ours.startswith(key() + ".safetensors.") and f".{writer.pid}." in ours
        # a live writer's temporary survives a new process's start sweep and eviction
        monkeypatch.setattr(cond_cache, "_swept", set())
        cache = CondCache(d, 100 * MB)
        assert cache.put(key("other"), flux_cond(1, tokens=4))
        assert (d / ours).exists()
    finally:
        writer.kill()
        writer.wait(60)
    stale_st, fresh_st = d / ".tmpAb12Cd", d / ".tmpEf34Gh"  # safetensors' own temporaries (save_file >= 0.8)
    for p in (stale_st, fresh_st):
        p.write_bytes(b"half")
    old = time.time() - 2 * cond_cache.STALE_PARTIAL_SECONDS
    # never read, never counted as entries
    assert CondCache(d, 100 * MB).get(key()) is None
    assert [os.path.basename(p) for _, _, p in CondCache(d, 100 * MB).entries()] == [key("other") + ".safetensors"]
    os.utime(d / ours, (old, old))
    os.utime(stale_st, (old, old))
    monkeypatch.setattr(cond_cache, "_swept", set())  # the next start of ComfyUI
    CondCache(d, 100 * MB)
    assert sorted(os.listdir(d)) == sorted([key("other") + ".safetensors", fresh_st.name])


# ---- the node: LowVRAMTextEncode never fails a prompt because of the cache ------------------------------------------

class FakeClip:
    """The parts of a lazy CLIP the node uses. Like ComfyUI's HF tokenizers, tokenize() refuses lone surrogates."""
    def __init__(self, name="t5.gguf"):
        self.klv_cache_identity = [{"name": name, "bytes": 1, "mtime_ns": 2}]
        self.tokenized = []

    def tokenize(self, text):
        if any("\ud800" <= ch <= "\udfff" for ch in text):
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")
        self.tokenized.append(text)
        return {"l": text, "t5xxl": text}

    def encode_from_tokens_scheduled(self, tokens, add_dict):
        g = torch.Generator().manual_seed(len(tokens["l"]) * 1000 + len(tokens["t5xxl"]))
        return [[torch.randn(1, 4, 8, generator=g), {"pooled_output": torch.randn(1, 8, generator=g), **add_dict}]]


@pytest.fixture
def node(tmp_path, monkeypatch):
    from kontext_lowvram.host import conditioning
    from kontext_lowvram.nodes import text_encoder
    monkeypatch.setattr(conditioning, "cache_directory", lambda: str(tmp_path / "cond_cache"))
    return text_encoder.LowVRAMTextEncode()


def test_node_hit_after_miss(node, tmp_path, caplog):
    caplog.set_level("INFO")
    (a,) = node.encode(FakeClip(), "a fox", "a fox in snow", 2.5)
    clip = FakeClip()  # a new handle on the same files
    (b,) = node.encode(clip, "a fox", "a fox in snow", 3.5)
    assert clip.tokenized == [] and "cache: hit" in caplog.text and b[0][1]["guidance"] == 3.5
    assert torch.equal(a[0][0], b[0][0])


def test_node_records_each_encode_as_a_phase_and_a_hit_as_such(node, monkeypatch):
    """The per-phase report's "text encode" rows: a miss, a hit (no encoder run), and an encode with the cache off."""
    from kontext_lowvram.host import report
    from kontext_lowvram.optimizations.phase_report import Recorder
    monkeypatch.setattr(report, "RECORDER", Recorder())
    node.encode(FakeClip(), "a fox", "a fox in snow", 2.5)
    node.encode(FakeClip(), "a fox", "a fox in snow", 3.5)
    node.encode(FakeClip(), "a fox", "a fox in snow", 2.5, cache=False)
    assert [(r.phase, r.notes, r.error) for r in report.RECORDER.records] == [
        ("text encode", ["conditioning cache miss: encoded"], None),
        ("text encode", ["conditioning cache hit: the text encoders were not run"], None),
        ("text encode", ["encoded (cache off)"], None)]


@pytest.mark.parametrize("where", ["dir_is_a_file", "parent_is_a_file"])
def test_node_encodes_when_the_cache_folder_is_unusable(node, tmp_path, monkeypatch, caplog, where):
    from kontext_lowvram.host import conditioning
    f = file_in_the_way(tmp_path)
    monkeypatch.setattr(conditioning, "cache_directory", lambda: str(f if where == "dir_is_a_file" else f / "c"))
    clip = FakeClip()
    (cond,) = node.encode(clip, "a fox", "a fox in snow", 2.5)
    assert clip.tokenized == ["a fox", "a fox in snow"] and cond[0][1]["guidance"] == 2.5
    (w,) = warnings_of(caplog)
    assert "not stored" in w.getMessage() and "Traceback" not in caplog.text


@pytest.mark.parametrize("step", ["get", "put", "init"])
def test_node_encodes_whatever_the_cache_raises(node, monkeypatch, caplog, step):
    def boom(*a, **k):
        raise RuntimeError("unexpected")
    monkeypatch.setattr(cond_cache.CondCache, {"init": "__init__"}.get(step, step), boom)
    (cond,) = node.encode(FakeClip(), "a fox", "a fox in snow", 2.5)
    assert cond[0][0].shape == (1, 4, 8)
    (w,) = warnings_of(caplog)
    assert "skipped" in w.getMessage() and "RuntimeError: unexpected" in w.getMessage()


def test_node_replaces_lone_surrogates_and_names_the_field(node, caplog):
    clip = FakeClip(os.fsdecode(b"t5_\xff.gguf"))  # a non-UTF-8 file name, as os.fsdecode surfaces it
    (a,) = node.encode(clip, "a fox \ud800", "a fox in snow \ud83d\ude00", 2.5)  # a lone half; a split pair
    assert clip.tokenized == ["a fox \ufffd", "a fox in snow \U0001F600"]
    (w,) = warnings_of(caplog)
    assert "clip_l prompt" in w.getMessage() and "1 invalid character" in w.getMessage()
    caplog.clear()
    caplog.set_level("INFO")
    clip = FakeClip(os.fsdecode(b"t5_\xff.gguf"))
    (b,) = node.encode(clip, "a fox \ufffd", "a fox in snow \U0001F600", 2.5)  # the same text: the same entry
    assert clip.tokenized == [] and "cache: hit" in caplog.text and torch.equal(a[0][0], b[0][0])


def test_node_odd_but_valid_prompts_are_cached_unchanged(node, caplog):
    for i, p in enumerate(ODD[3:]):
        clip = FakeClip()
        node.encode(clip, p, p + "!", 2.5)
        assert clip.tokenized == [p, p + "!"], i
        node.encode(clip, p, p + "!", 2.5)
        assert clip.tokenized == [p, p + "!"], i  # second time from the cache
    assert not warnings_of(caplog)
