"""LowVRAMAttention inside a real ComfyUI: per-model attention backends through
``transformer_options["optimized_attention_override"]`` (called by ``wrap_attn`` in comfy/ldm/modules/attention.py,
present in v0.3.64 and v0.29).

One prompt runs the Kontext edit graph four times on the same loaded model — plain, and through
LowVRAMAttention(sdpa / split / auto) — and compares the sampled latents (relative L2, 2 euler steps, CPU fp32):
  sdpa  ≤ 1e-4  (the same torch SDPA call core makes: measured 0 on both versions)
  split ≤ 1e-4  (float32 chunked softmax, 1 MiB chunks: measured 3e-7 (v0.29), 4e-7 (v0.3.64))
  auto  ≤ 1e-4  (on a CPU server auto resolves to sdpa)
The plain branch, and a plain run after the node was used, must be bit-identical to a plain run made before any
attention node existed: the override lives on the node's clone only.
"""
import pytest
import torch

import comfy_harness as H
from kontext_lowvram.optimizations.attention import BACKENDS

SEED = 7
BOUND = {"sdpa": 1e-4, "split": 1e-4, "auto": 1e-4}
BRANCHES = tuple(BOUND)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def attention_node(backend, split_chunk_mb=1, model=("model", 0)):
    return H.node("LowVRAMAttention", model=list(model), backend=backend, split_chunk_mb=split_chunk_mb)


def with_attention_branches(graph, backends):
    """Add, per backend, LowVRAMAttention(model) -> KSampler (same inputs as the plain one) -> SaveLatent."""
    for b in backends:
        graph[f"attn_{b}"] = attention_node(b)
        sampler = {"class_type": "KSampler", "inputs": dict(graph["sampler"]["inputs"], model=[f"attn_{b}", 0])}
        graph[f"sampler_{b}"] = sampler
        graph[f"save_latent_{b}"] = H.node("SaveLatent", samples=[f"sampler_{b}", 0], filename_prefix=f"attn_{b}/latent")
    return graph


@pytest.fixture(scope="module")
def latents(comfy, flux_model):
    loader = H.unet_loader_node(flux_model.name)
    out = {"before": comfy.saved_latent(comfy.run(
        H.kontext_edit_graph(loader, seed=SEED, prefix="attn_before", nonce=11), timeout=900))}
    graph = with_attention_branches(H.kontext_edit_graph(loader, seed=SEED, prefix="attn_mixed", nonce=12),
                                    BRANCHES)
    res = comfy.run(graph, timeout=1800)
    out["plain"] = comfy.saved_latent(res)
    for b in BRANCHES:
        out[b] = comfy.saved_latent(res, f"save_latent_{b}")
    out["log_after_mixed"] = comfy.log_text()
    out["after"] = comfy.saved_latent(comfy.run(
        H.kontext_edit_graph(loader, seed=SEED, prefix="attn_after", nonce=13), timeout=900))
    assert "sampler" not in comfy.last_cached_nodes  # the plain sampler really ran again
    return out


def test_object_info_lists_node(comfy):
    info = comfy.object_info("LowVRAMAttention")["LowVRAMAttention"]
    assert info["category"] == "Kontext LowVRAM/optimizations"
    assert info["output"] == ["MODEL"] and info["description"]
    req = info["input"]["required"]
    assert req["model"][0] == "MODEL"
    backend = req["backend"]
    choices = backend[0] if isinstance(backend[0], list) else backend[1].get("options")
    assert choices == list(BACKENDS)
    assert backend[1]["default"] == "auto" and backend[1]["tooltip"]
    assert req["split_chunk_mb"][0] == "INT" and req["split_chunk_mb"][1]["tooltip"]


@pytest.mark.parametrize("backend", BRANCHES)
def test_backend_matches_plain_graph(latents, backend):
    lat, plain = latents[backend], latents["plain"]
    assert lat.shape == plain.shape and torch.isfinite(lat).all()
    err = rel(lat, plain)
    print(f"\n{backend}: rel-L2 vs plain = {err:.3g}")
    assert err <= BOUND[backend]
    # the override really ran on this model (logged once at its first call); auto says what it picked
    resolved = "sdpa" if backend == "auto" else backend
    assert f"'{resolved}' active on this model" in latents["log_after_mixed"]
    if backend == "auto":
        assert "auto picked 'sdpa'" in latents["log_after_mixed"]


def test_override_is_per_model(latents):
    """The loader's model is shared by all branches; only the node's clones carry the override."""
    assert torch.equal(latents["plain"], latents["before"])
    assert torch.equal(latents["after"], latents["before"])


def test_unavailable_backend_fails_prompt_server_survives(comfy, flux_model):
    graph = H.kontext_edit_graph(H.unet_loader_node(flux_model.name), seed=SEED, prefix="attn_flash", nonce=14)
    graph["attn"] = attention_node("flash_attn")
    graph["sampler"]["inputs"]["model"] = ["attn", 0]
    with pytest.raises(H.ComfyError) as e:
        comfy.run(graph, timeout=900)
    msg = str(e.value)
    assert "AttentionBackendUnavailable" in msg and "pip install flash-attn --no-build-isolation" in msg
    assert comfy.proc is not None and comfy.proc.poll() is None
    assert "LowVRAMAttention" in comfy.object_info("LowVRAMAttention")
