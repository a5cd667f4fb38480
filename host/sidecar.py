"""sha256 sidecar checks inside ComfyUI: the hash of a big file shows on the node's progress bar and can be
cancelled. The check itself is loaders/integrity.py (once per file identity, so a re-run reads nothing)."""
from ..loaders.integrity import verify_sidecar


def verify(path):
    """Check `path` against `<path>.sha256` where there is one (ModelFileError on a mismatch) -> its SidecarCheck,
    or None without a sidecar."""
    import comfy.model_management
    import comfy.utils

    bar = []
    last = [-1]

    def progress(done, total):
        comfy.model_management.throw_exception_if_processing_interrupted()
        pct = int(100 * done / max(total, 1))
        if pct != last[0]:  # one update per percent, not one per chunk
            if not bar:
                bar.append(comfy.utils.ProgressBar(100))
            last[0] = pct
            bar[0].update_absolute(pct, 100)

    return verify_sidecar(path, progress)
