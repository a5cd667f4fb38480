"""FLUX.2 text encode (core CLIPTextEncode's conditioning) with the on-disk conditioning cache of conditioning.py:
a cached prompt never loads the LLM text encoder.

The key covers everything that decides the tensors: the file's identity (name, size, mtime), what the file is
(model type, pruned or not, its sizes where they differ from the standard model; from the header, remembered per
identity, so a hit reads no weights), the hidden-state layers FLUX.2 reads, a digest of core's tokenizer / chat
template / encoder-wrapper code, the CLIP type and the ComfyUI version. FLUX.1's keys (conditioning.py) are
untouched: they never share a key with these (different encoder settings).
"""
import logging

from ..optimizations.cond_cache import make_key
from . import report
from .conditioning import cached_conditioning, encoder_settings, well_formed_prompt

log = logging.getLogger("kontext_lowvram")


def llm_encoder_settings(paths):
    """The key's settings for the LLM CLIP of `paths` (one file); reads only the header, once per file identity."""
    from .clip_llm import file_facts, host_encoder_code
    facts = file_facts(paths[0])
    base = encoder_settings()
    return {"clip_type": "flux2", "comfyui": base["comfyui"], "encoder": facts["model_type"],
            "pruned": facts["pruned"], "layers": facts["layers"], "config": facts["overrides"],
            "host_code": host_encoder_code(facts["model_type"]), "node": "CLIPTextEncode"}


def encode(clip, text, cache, cache_max_mb):
    """CLIPTextEncode's conditioning of `text`: from the cache (capped at `cache_max_mb` MiB) when `clip` comes
    straight from the LLM loader and the entry is there, else encoded (and then stored)."""
    with report.phase("text encode") as rec:
        return _encode(clip, text, cache, cache_max_mb, rec)


def _encode(clip, text, cache, cache_max_mb, rec):
    text = well_formed_prompt(text, "text")
    cacheable = getattr(clip, "klv_cache_identity", None) is not None and getattr(clip, "klv_kind", None) == "flux2_llm"
    return cached_conditioning(
        rec, cache, cache_max_mb, cacheable,
        lambda: make_key(clip.klv_cache_identity, {"text": text}, llm_encoder_settings(clip.klv_paths)),
        lambda: clip.encode_from_tokens_scheduled(clip.tokenize(text)), "text encoder",
        "this CLIP is not straight from the FLUX.2 lazy loader")
