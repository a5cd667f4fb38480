"""Denoising with our MODEL, measured and recovered from running out of memory: a per-model OUTER_SAMPLE wrapper
(comfy.patcher_extension, carried to every clone of the model), so any sampler node running it gets both."""
import logging

from ..optimizations import oom
from . import compat, report

log = logging.getLogger("kontext_lowvram")

WRAPPER_KEY = "kontext_lowvram_denoise"
ADVICE = ("Kontext LowVRAM: denoising ran out of memory twice, the second time after unloading every model and "
          "emptying the cache. Use a smaller model format (e.g. Q4_K instead of Q8_0), the workflow of the next lower "
          "VRAM tier, or a lower resolution; `kontext-lowvram plan --vram N` says which files fit a card with N GB")


def attach(model):
    """Give our ModelPatcher the denoise wrapper (clones copy it)."""
    import comfy.patcher_extension as pe
    model.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, outer_sample)


def _copy_conds(conds):
    """A copy of a guider's conditionings as its sample() makes one, so a retry starts from unprocessed ones."""
    return None if conds is None else {k: [c.copy() for c in v] for k, v in conds.items()}


def _undo_failed_attempt(guider):
    """What CFGGuider.outer_sample does after a successful run and skips when one fails: let go of the models
    and control networks it prepared, which the retry prepares again."""
    import comfy.sampler_helpers
    loaded = getattr(guider, "loaded_models", None)
    if loaded is not None:
        comfy.sampler_helpers.cleanup_models(guider.conds, loaded)
    for name in ("inner_model", "loaded_models"):
        guider.__dict__.pop(name, None)


def outer_sample(executor, *args, **kwargs):
    """The sampler's outer_sample as a "denoise" phase. After an out-of-memory error every model ComfyUI holds on
    the device is unloaded (the retry loads the ones it samples with again), the cache emptied and the sampling run
    once more; a second one raises oom.StillOutOfMemory saying what to change."""
    guider = executor.class_obj
    device = guider.model_patcher.load_device
    original = _copy_conds(getattr(guider, "conds", None))

    def attempt():
        if original is not None:
            guider.conds = _copy_conds(original)
        return executor(*args, **kwargs)

    def free():
        _undo_failed_attempt(guider)
        compat.free_vram(device)

    with report.phase("denoise", device) as rec:
        def on_retry(failure):
            log.warning("Kontext LowVRAM denoise: %s; unloaded the models held on %s, emptied the cache, retrying "
                        "once", failure, device)
            rec.recovered(f"OOM ({failure}): unloaded the models held on {device}, emptied the cache, retried once")
        return oom.retry_once(attempt, free=free, on_retry=on_retry, advice=ADVICE)
