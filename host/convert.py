"""The converter node inside ComfyUI: its source list (diffusion_models and text_encoders), where the output goes,
ComfyUI's progress bar and interrupt. The conversion itself is loaders/convert.py."""
import os
import re

from ..loaders.convert import default_output_name
from ..loaders.convert_mix import target
from . import files

# combo entries are "<category>/<file name as ComfyUI lists it>", so the two folders never clash
CATEGORIES = {
    "diffusion_models": (files.MODEL_FOLDERS, "models/diffusion_models (or models/unet)"),
    "text_encoders": (files.TEXT_ENCODER_FOLDERS, "models/text_encoders (or models/clip)"),
}
SOURCE_EXTENSIONS = (".safetensors", ".sft", ".gguf", ".safetensors.index.json")  # the index: a diffusers folder


SHARD = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")  # diffusers / transformers shard names


def source_files():
    """The combo entries: every model file of both folders; a sharded model once, as its index."""
    out = []
    for category, (folders, _where) in CATEGORIES.items():
        names = files.list_files(folders, SOURCE_EXTENSIONS)
        indexed = {os.path.dirname(n) for n in names if n.endswith(".index.json")}
        out += [f"{category}/{n}" for n in names if not (SHARD.search(n) and os.path.dirname(n) in indexed)]
    return out


def _split(name):
    category, _, rest = str(name).partition("/")
    if category not in CATEGORIES or not rest:
        raise ValueError(f"{name!r}: pick a file from the list (diffusion_models/... or text_encoders/...)")
    return category, rest


def source_path(name):
    category, rest = _split(name)
    folders, where = CATEGORIES[category]
    return files.find_file(folders, rest, where)


def output_path(src_path, output_name, target_type):
    """Where the node writes: next to the source (a diffusers index: next to its model folder), named
    `output_name` with the type's extension added if missing, or `<model>-<TYPE>.<ext>` when empty."""
    t = target(target_type)
    name = (output_name or "").strip() or default_output_name(src_path, t.name)
    if os.path.basename(name) != name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"output_name {name!r} must be a file name, not a path (the file goes next to the source)")
    if not name.lower().endswith((".gguf",) if t.container == "gguf" else (".safetensors", ".sft")):
        name += t.suffix
    folder = os.path.dirname(os.path.abspath(src_path))
    if src_path.endswith(".json"):
        folder = os.path.dirname(folder)
        if os.path.basename(os.path.dirname(src_path)) == "transformer":
            folder = os.path.dirname(folder)
    return os.path.join(folder, name)


def fingerprint(source, target_type, output_name, overwrite=False, verify=True):
    """Changes when the source or the would-be output changes on disk, so a re-queued prompt runs again after
    the output was deleted (ComfyUI otherwise answers it from its cache)."""
    try:
        src = source_path(source)
        dst = output_path(src, output_name, target_type)
    except (ValueError, FileNotFoundError) as e:
        return str(e)
    stat = lambda p: (os.stat(p).st_mtime_ns, os.stat(p).st_size) if os.path.exists(p) else None  # noqa: E731
    return repr((stat(src), stat(dst), target_type, overwrite, verify))


def run(source, target_type, output_name, overwrite=False, verify=True):
    """Convert through loaders.convert with ComfyUI's progress bar (tensors done / total, per phase) and interrupt
    (which stops the conversion and leaves nothing behind) -> the summary text."""
    import comfy.model_management
    import comfy.utils

    from ..loaders.convert import convert
    src = source_path(source)
    dst = output_path(src, output_name, target_type)
    bar = {"phase": None, "pbar": None}

    def progress(done, total, nbytes, phase):
        comfy.model_management.throw_exception_if_processing_interrupted()
        if phase != bar["phase"]:
            bar["phase"], bar["pbar"] = phase, comfy.utils.ProgressBar(total)
        bar["pbar"].update_absolute(done, total)

    report = convert(src, dst, target_type, force=bool(overwrite), verify=bool(verify), progress=progress)
    return report.summary() + f"\nwritten to {dst} (press 'r' in the UI to see it in the loaders' lists)"
