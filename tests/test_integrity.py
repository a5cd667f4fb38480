"""sha256 sidecars (loaders/integrity.py): sha256sum's format both ways, the check in both loading paths, the
per-identity cache and the host's progress glue."""
import hashlib
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

from kontext_lowvram.loaders import ModelFileError, integrity, load_model_file
from kontext_lowvram.loaders.text_encoders import clip_l_tensor_shapes, read_text_encoder
from kontext_lowvram.loaders.writers import write_safetensors


@pytest.fixture(autouse=True)
def fresh_cache():
    integrity.clear_cache()
    yield
    integrity.clear_cache()


@pytest.fixture
def blob(tmp_path):
    p = tmp_path / "weights.bin"
    p.write_bytes(os.urandom(3 * 2**20 + 17))  # not a whole number of chunks
    return p


@pytest.fixture
def count_hashes(monkeypatch):
    calls = []
    real = integrity.sha256_file

    def counting(path, progress=None, chunk=None):
        calls.append(os.fspath(path))
        return real(path, progress, chunk)
    monkeypatch.setattr(integrity, "sha256_file", counting)
    return calls


def test_sidecar_is_sha256sums_format(blob):
    side = integrity.write_sidecar(blob)
    assert side == str(blob) + ".sha256"
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    assert open(side, "rb").read() == f"{digest}  weights.bin\n".encode()
    if shutil.which("sha256sum"):  # the tool itself accepts it
        r = subprocess.run(["sha256sum", "-c", os.path.basename(side)], cwd=blob.parent, capture_output=True, text=True)
        assert r.returncode == 0 and "weights.bin: OK" in r.stdout


@pytest.mark.skipif(not shutil.which("sha256sum"), reason="needs coreutils' sha256sum")
@pytest.mark.parametrize("binary", [False, True])
def test_reads_what_sha256sum_writes(blob, binary):
    out = subprocess.run(["sha256sum", *(["-b"] if binary else []), blob.name], cwd=blob.parent, capture_output=True,
                         check=True).stdout
    (blob.parent / (blob.name + ".sha256")).write_bytes(out)
    check = integrity.verify_sidecar(blob)
    assert check.digest == hashlib.sha256(blob.read_bytes()).hexdigest() and check.hashed


def test_other_common_sidecar_spellings(blob):
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    side = blob.parent / (blob.name + ".sha256")
    for text in (digest.upper() + "\n", f"SHA256 (weights.bin) = {digest}\n",  # bare (as a model page shows it), BSD
                 f"{'0' * 64}  other.bin\r\n{digest}  ./sub/weights.bin\r\n",  # a list: this file's line
                 f"{digest}  renamed-since.bin\n"):  # one entry: this file's, whatever its name says
        side.write_bytes(text.encode())
        assert integrity.read_sidecar(blob) == digest, text


def test_progress_reports_bytes_done_and_total(blob):
    seen = []
    integrity.sha256_file(blob, lambda done, total: seen.append((done, total)), chunk=2**20)
    size = blob.stat().st_size
    assert [d for d, _ in seen] == [2**20, 2 * 2**20, 3 * 2**20, size] and {t for _, t in seen} == {size}


def test_no_sidecar_is_skipped_without_reading(blob, count_hashes):
    assert integrity.verify_sidecar(blob) is None and count_hashes == []


def test_mismatch_names_file_both_hashes_and_fix(blob):
    integrity.write_sidecar(blob)
    good = hashlib.sha256(blob.read_bytes()).hexdigest()
    data = bytearray(blob.read_bytes())
    data[12345] ^= 1
    blob.write_bytes(bytes(data))
    bad = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(ModelFileError) as e:
        integrity.verify_sidecar(blob)
    msg = str(e.value)
    assert msg.startswith(str(blob)) and good in msg and bad in msg
    assert "download it again" in msg and "delete weights.bin.sha256" in msg


@pytest.mark.parametrize("text", ["", "\n\n", "not a hash  weights.bin\n", "abc123  weights.bin\n",
                                  "0" * 65 + "  weights.bin\n", f"{'0' * 64}  a.bin\n{'1' * 64}  b.bin\n"])
def test_malformed_sidecar_names_the_sidecar(blob, text):
    (blob.parent / (blob.name + ".sha256")).write_text(text)
    with pytest.raises(ModelFileError) as e:
        integrity.verify_sidecar(blob)
    assert str(e.value).startswith(str(blob) + ".sha256:") and "delete it" in str(e.value)


def test_digest_is_cached_per_file_identity(blob, count_hashes):
    integrity.write_sidecar(blob)
    assert count_hashes == [str(blob)]
    assert integrity.verify_sidecar(blob).hashed is False  # write_sidecar's digest: nothing read again
    assert integrity.verify_sidecar(blob).hashed is False and len(count_hashes) == 1
    st = blob.stat()
    os.utime(blob, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, new mtime: a new identity
    assert integrity.verify_sidecar(blob).hashed is True and len(count_hashes) == 2
    with open(blob, "ab") as f:  # a new size too; the stale sidecar no longer matches
        f.write(b"x")
    with pytest.raises(ModelFileError, match="expects"):
        integrity.verify_sidecar(blob)
    assert len(count_hashes) == 3
    with pytest.raises(ModelFileError, match="expects"):  # the known digest still fails without a re-read
        integrity.verify_sidecar(blob)
    assert len(count_hashes) == 3


def _write_clip_l(path):
    g = torch.Generator().manual_seed(0)
    cfg = {"hidden_size": 768, "intermediate_size": 64, "num_hidden_layers": 1, "vocab_size": 16,
           "max_position_embeddings": 8}
    write_safetensors(path, {k: torch.randn(s, generator=g).to(torch.bfloat16)
                             for k, s in clip_l_tensor_shapes(cfg).items()})
    return path


def _corrupt_sidecar(path):
    (path.parent / (path.name + ".sha256")).write_text("0" * 64 + f"  {path.name}\n")


def test_model_loading_path_verifies(tmp_path, tiny_sd, tiny_cfg, count_hashes):
    path = tmp_path / "flux.safetensors"
    write_safetensors(path, tiny_sd)
    integrity.write_sidecar(path)
    integrity.clear_cache()
    assert load_model_file(path)[1]["flux_config"] == tiny_cfg
    assert load_model_file(path)[1]["flux_config"] == tiny_cfg and count_hashes == [str(path)] * 2  # write + 1 load
    _corrupt_sidecar(path)
    with pytest.raises(ModelFileError, match=r"flux\.safetensors: its sha256 is [0-9a-f]{64}, but flux\.safetensors"
                                             r"\.sha256 expects 0{64}"):
        load_model_file(path)
    assert load_model_file(path, verify=False)[0].keys() == tiny_sd.keys()


def test_text_encoder_loading_path_verifies(tmp_path, count_hashes):
    path = _write_clip_l(tmp_path / "clip_l.safetensors")
    assert read_text_encoder(path)[1]["kind"] == "clip_l" and count_hashes == []  # no sidecar: not read
    integrity.write_sidecar(path)
    assert read_text_encoder(path)[1]["kind"] == "clip_l" and len(count_hashes) == 1
    _corrupt_sidecar(path)
    with pytest.raises(ModelFileError, match="clip_l.safetensors: its sha256 is"):
        read_text_encoder(path)


def test_host_glue_shows_progress_and_can_be_cancelled(blob, monkeypatch):
    """host/sidecar.py with stand-ins for comfy.utils.ProgressBar and the interrupt check."""
    from kontext_lowvram.host import sidecar
    updates, interrupt = [], [False]

    class ProgressBar:
        def __init__(self, total):
            assert total == 100

        def update_absolute(self, value, total):
            updates.append(value)

    def check_interrupt():
        if interrupt[0]:
            raise KeyboardInterrupt("cancelled")
    comfy = types.ModuleType("comfy")
    comfy.utils = types.SimpleNamespace(ProgressBar=ProgressBar)
    comfy.model_management = types.SimpleNamespace(throw_exception_if_processing_interrupted=check_interrupt)
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.utils", comfy.utils)
    monkeypatch.setitem(sys.modules, "comfy.model_management", comfy.model_management)
    monkeypatch.setattr(integrity, "CHUNK", 2**20)
    assert sidecar.verify(blob) is None and updates == []  # no sidecar: no bar
    integrity.write_sidecar(blob)
    integrity.clear_cache()
    assert sidecar.verify(blob).hashed and updates == [33, 66, 99, 100]
    integrity.clear_cache()
    interrupt[0] = True
    with pytest.raises(KeyboardInterrupt):
        sidecar.verify(blob)
    assert integrity._digests == {}  # a cancelled hash leaves nothing behind
