"""The conditioning-cache key of FLUX.2's LLM text encoders (host/conditioning_llm.py), without ComfyUI: it holds
what the file is (model type, pruned, sizes, layers read), read from the header once per file identity, so a
cached prompt reads no weights; and it never equals a FLUX.1 key."""
import os

import pytest
import torch
from safetensors.torch import save_file

from fixtures.llm_text_encoders import TINY_QWEN3_4B, random_llm_state_dict
from kontext_lowvram.host import conditioning_llm
from kontext_lowvram.loaders.text_encoders_llm import TEKKEN
from kontext_lowvram.optimizations.cond_cache import file_identity, make_key

MISTRAL_TINY = {"vocab_size": 64, "intermediate_size": 32, "num_attention_heads": 1, "num_key_value_heads": 1}


def _mistral(path, layers):
    sd = random_llm_state_dict("mistral3_24b", {**MISTRAL_TINY, "num_hidden_layers": layers}, seed=layers,
                               pruned=layers == 30)
    save_file({**sd, TEKKEN: torch.zeros(4, dtype=torch.uint8)}, path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("llm")
    save_file(random_llm_state_dict("qwen3_4b", TINY_QWEN3_4B, seed=1), d / "qwen.safetensors")
    _mistral(d / "mistral_pruned.safetensors", 30)
    _mistral(d / "mistral_full.safetensors", 40)
    return d


def key(path, text="a fox"):
    p = os.fspath(path)
    return make_key([file_identity(p)], {"text": text}, conditioning_llm.llm_encoder_settings([p]))


def test_settings_name_what_the_file_is(files):
    s = conditioning_llm.llm_encoder_settings([os.fspath(files / "qwen.safetensors")])
    assert s["clip_type"] == "flux2" and s["encoder"] == "qwen3_4b" and s["pruned"] is False
    assert s["layers"] == [9, 18, 27] and s["config"] == TINY_QWEN3_4B
    m = conditioning_llm.llm_encoder_settings([os.fspath(files / "mistral_pruned.safetensors")])
    assert m["encoder"] == "mistral3_24b" and m["pruned"] is True and m["layers"] == [10, 20, 30]
    f = conditioning_llm.llm_encoder_settings([os.fspath(files / "mistral_full.safetensors")])
    assert f["pruned"] is False and f["config"] == MISTRAL_TINY


def test_keys_differ_by_file_prompt_and_variant(files):
    keys = {key(files / "qwen.safetensors"), key(files / "qwen.safetensors", "a crow"),
            key(files / "mistral_pruned.safetensors"), key(files / "mistral_full.safetensors")}
    assert len(keys) == 4
    assert key(files / "qwen.safetensors") == key(files / "qwen.safetensors")  # stable


def test_facts_are_remembered_per_identity_so_a_lookup_reads_no_weights(files, tmp_path):
    p = tmp_path / "q.safetensors"
    p.write_bytes((files / "qwen.safetensors").read_bytes())
    k1 = key(p)
    st = p.stat()
    p.write_bytes(os.urandom(st.st_size))  # same size and mtime: same identity, unreadable content
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert key(p) == k1
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: a new identity, the header is read again
    with pytest.raises(Exception):
        key(p)


def test_never_a_flux1_key(files):
    p = os.fspath(files / "qwen.safetensors")
    from kontext_lowvram.host.conditioning import encoder_settings
    flux1 = make_key([file_identity(p)], {"clip_l": "a fox", "t5xxl": "a fox"}, encoder_settings())
    assert flux1 != key(p)
