"""Whether this ComfyUI runs the diffusion model in a file. Its own model detection decides the architecture (we pass
it the state dict's logical shapes, exactly as core's loader does); the module it builds is then held to the file
(torch's size checks and ours in host/ops.py, and every one of our layers must have got its weights), so a file the
host cannot run — a FLUX.2 on a ComfyUI that predates FLUX.2, an unknown DiT — is a ModelFileError naming the file,
what the loaders saw in it and the ComfyUI it needs, instead of a model that computes garbage."""
import torch

from ..loaders import ModelFileError
from ..loaders.transformer import in_words

#: The ComfyUI releases that first ran a family (their release notes, as reported; v0.29 runs all of them).
NEEDS = {
    "FLUX.2": "FLUX.2 [dev] needs ComfyUI v0.3.72 or later, FLUX.2 [klein] v0.9.2 or later (v0.29 runs both)",
}
UPDATE = "update ComfyUI to a release that runs this model"
# What a host's build raises on a state dict it misreads (a wrong config, a missing key, a size mismatch); running out
# of memory (a RuntimeError too) is not the file's fault and passes through
BUILD_ERRORS = (RuntimeError, TypeError, ValueError, KeyError, AttributeError, IndexError)
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


def host_version() -> str:
    """The running ComfyUI's version ("0.29.0"), for messages only (compat.py probes features, never versions)."""
    try:
        import comfyui_version
        return "v" + comfyui_version.__version__
    except Exception:
        return "(version unknown)"


def detected_image_model(sd):
    """What the host's model detection makes of the state dict's keys and shapes: its image_model ("flux",
    "flux2", "chroma", ...), or None when it recognises nothing (or fails on the file)."""
    import comfy.model_detection
    try:
        config = comfy.model_detection.detect_unet_config(sd, "")
    except Exception:
        return None
    return (config or {}).get("image_model")


def unloaded_layers(model) -> list:
    """Our layers (host/ops.py) in the built model that the file gave no weight, or no bias the host built them with."""
    out = []
    for name, m in model.model.diffusion_model.named_modules():
        if getattr(type(m), "KLV_LINEAR", False):
            if m.weight is None:
                out.append(f"{name}.weight")
            elif m.klv_has_bias and m.bias is None:
                out.append(f"{name}.bias")
    return out


def cannot_run(path, info, why: str) -> ModelFileError:
    family = (info.get("transformer") or "").split(" [")[0]
    fix = NEEDS.get(family)
    what = in_words(info.get("transformer"))
    return ModelFileError(path, f"ComfyUI {host_version()} cannot run this file, {what}: {why}",
                          f"{UPDATE}: {fix}" if fix else
                          f"{UPDATE} (a newer one may know it), or load it with the loader made for it")


def _first_lines(e: BaseException, n: int = 3) -> str:
    text = " ".join(line.strip() for line in str(e).strip().splitlines()[:n] if line.strip())
    return f"{type(e).__name__}: {text[:400]}"


def build_checked(build, sd, path, info):
    """`build()` (host/model.build_model on `sd`), held to the file: ModelFileError (naming the file, what the
    loaders saw and the ComfyUI it needs) when the host recognises no architecture, fails to build what it
    detected, or builds a model whose layers the file does not fill."""
    seen = detected_image_model(sd)
    read_as = f"its model detection reads it as image_model {seen!r}" if seen else ""
    try:
        model = build()
    except ModelFileError:
        raise
    except OUT_OF_MEMORY:
        raise
    except BUILD_ERRORS as e:
        raise cannot_run(path, info, (read_as + ", then " if read_as else "") +
                         f"building that failed ({_first_lines(e)})") from e
    if model is None:
        raise cannot_run(path, info, "its model detection recognises no architecture in these tensors")
    missing = unloaded_layers(model)
    if missing:
        raise cannot_run(path, info, (read_as + ", but " if read_as else "") +
                         f"the model it built has {len(missing)} layer tensor(s) this file does not hold, e.g. "
                         f"{', '.join(missing[:3])}")
    return model
