"""FLUX text encode (CLIPTextEncodeFlux's conditioning) with the on-disk conditioning cache under ComfyUI's user
folder: a cached prompt never loads the text encoders."""
import logging
import os
import re

from ..loaders.errors import printable
from ..optimizations.cond_cache import CondCache, make_key
from . import files, report

log = logging.getLogger("kontext_lowvram")

CACHE_SUBDIR = os.path.join("kontext_lowvram", "cond_cache")


def cache_directory():
    return os.path.join(files.user_directory(), CACHE_SUBDIR)


def cache_location_text():
    """Where the cache is, for tooltips (also outside ComfyUI, where the declarations are tested)."""
    try:
        return cache_directory()
    except Exception:  # outside ComfyUI (tests of the declarations)
        return os.path.join("ComfyUI", "user", CACHE_SUBDIR)


def encoder_settings():
    """What besides weights and prompts decides the tensors: ComfyUI's tokenizers and encoder code version."""
    try:
        from comfyui_version import __version__ as comfy_version
    except ImportError:
        comfy_version = "unknown"
    return {"clip_type": "flux", "comfyui": comfy_version}


def _with_guidance(conditioning, guidance):
    return [[c, {**d, "guidance": guidance}] for c, d in conditioning]


_SURROGATE = re.compile("[\ud800-\udfff]")


def well_formed_prompt(text, field):
    """`text` with lone surrogates (half of a UTF-16 pair, e.g. from a JSON "\\ud83d" whose other half was cut off)
    replaced by U+FFFD. ComfyUI's tokenizers (HF `tokenizers`) fail on them with a bare "TextEncodeInput must be
    Union[...]" TypeError, also in core's CLIPTextEncodeFlux. The half character stands for no text, so the prompt is
    encoded with the replacement character every UTF-8 decoder shows, and the log names the field."""
    if not isinstance(text, str) or not _SURROGATE.search(text):
        return text
    # through UTF-16: a complete pair stored as two code points becomes its character, a lone half U+FFFD
    fixed = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    lone = fixed.count("\ufffd") - text.count("\ufffd")
    if lone:
        log.warning("Kontext LowVRAM text encode: the %s prompt holds %d invalid character(s) (lone UTF-16 "
                    "surrogates); encoded with U+FFFD in their place", field, lone)
    return fixed


def _cache_failed(what, e):
    log.warning("Kontext LowVRAM conditioning cache: skipped, %s failed (%s: %s)", what, type(e).__name__,
                printable(str(e)))


def encode(clip, clip_l, t5xxl, guidance, cache, cache_max_mb):
    """CLIPTextEncodeFlux's conditioning of the two prompts: from the cache (capped at `cache_max_mb` MiB) when
    `clip` comes straight from the lazy loader and the entry is there, else encoded (and then stored); recorded as
    the "text encode" phase, a cache hit as such."""
    with report.phase("text encode") as rec:
        return _encode(clip, clip_l, t5xxl, guidance, cache, cache_max_mb, rec)


def _encode(clip, clip_l, t5xxl, guidance, cache, cache_max_mb, rec):
    clip_l, t5xxl = well_formed_prompt(clip_l, "clip_l"), well_formed_prompt(t5xxl, "t5xxl")

    def encoded():  # stored without the guidance: changing it does not re-encode
        tokens = clip.tokenize(clip_l)
        tokens["t5xxl"] = clip.tokenize(t5xxl)["t5xxl"]
        cond = clip.encode_from_tokens_scheduled(tokens, add_dict={"guidance": guidance})
        return [[c, {k: v for k, v in d.items() if k != "guidance"}] for c, d in cond]
    cond = cached_conditioning(
        rec, cache, cache_max_mb, getattr(clip, "klv_cache_identity", None) is not None,
        lambda: make_key(clip.klv_cache_identity, {"clip_l": clip_l, "t5xxl": t5xxl}, encoder_settings()),
        encoded, "text encoders", "this CLIP is not straight from the lazy loader")
    return _with_guidance(cond, guidance)


def cached_conditioning(rec, cache, cache_max_mb, cacheable, key_of, encoded, encoders, why_not):
    """The conditioning from the cache when `cache` is on, `cacheable` and the entry of `key_of()` is there; else
    `encoded()`, then stored. Each outcome is a note on the report phase `rec` and a log line."""
    store = key = None
    if cache and cacheable:
        # CondCache handles file-system trouble itself; this guard is the promise that the cache, an
        # optimization, never fails a prompt whatever else goes wrong in it
        try:
            store = CondCache(cache_directory(), int(cache_max_mb) * 2 ** 20)
            key = key_of()
            hit = store.get(key)
        except Exception as e:
            _cache_failed("lookup", e)
            store = hit = None
            rec.note("conditioning cache unusable: encoded")
        if hit is not None:
            log.info("Kontext LowVRAM conditioning cache: hit %s", key[:16])
            rec.note(f"conditioning cache hit: the {encoders} were not run")
            return hit
        if store is not None:
            log.info("Kontext LowVRAM conditioning cache: miss %s", key[:16])
            rec.note("conditioning cache miss: encoded")
    elif cache:
        log.info("Kontext LowVRAM conditioning cache: not used (%s)", why_not)
        rec.note("encoded (this CLIP is not cacheable)")
    else:
        rec.note("encoded (cache off)")
    cond = encoded()
    if store is not None:
        try:
            store.put(key, cond)
        except Exception as e:
            _cache_failed("store", e)
    return cond
