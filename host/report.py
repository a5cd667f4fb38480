"""The per-phase report inside ComfyUI: which prompt and node a phase belongs to, the process's one recorder, and
the report node's text (optimizations/phase_report.py measures and words it)."""
import contextlib
import logging

from ..optimizations import phase_report

log = logging.getLogger("kontext_lowvram")

# the process's records: ComfyUI runs one prompt at a time, and each record names its prompt and node
RECORDER = phase_report.Recorder()

# our node classes that run a phase themselves
DOERS = {
    "model load": {"LowVRAMModelLoader"},
    "text encode": {"LowVRAMTextEncode"},
    "VAE encode": {"LowVRAMTiledVAEEncode"},
    "VAE decode": {"LowVRAMTiledVAEDecode"},
}
# our node classes that make a core node's phase ours: a sampler denoising with our model (its OUTER_SAMPLE wrapper)
USERS = {"denoise": {"LowVRAMModelLoader"}}


def executing():
    """(prompt id, node id) of the node ComfyUI is running now; (None, None) outside an execution or outside ComfyUI
    (the host functions' unit tests), where a phase belongs to no prompt."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None, None
    ctx = get_executing_context()
    return (ctx.prompt_id, ctx.node_id) if ctx is not None else (None, None)


def compute_device():
    """ComfyUI's compute device; the CPU outside ComfyUI."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return "cpu"
    return mm.get_torch_device()


@contextlib.contextmanager
def phase(name, device=None):
    """Record phase `name` of the running prompt and node, computing on `device` (default: ComfyUI's device). A
    failed phase logs what it measured, what it still held after included: the prompt has no report to show."""
    run, node = executing()
    rec = None
    try:
        with RECORDER.phase(name, run=run, node=node,
                            device=device if device is not None else compute_device()) as rec:
            yield rec
    except BaseException:
        if rec is not None:
            log.warning("Kontext LowVRAM %s failed: %s", name, phase_report.measured_text(rec))
        raise


def show(value, prompt):
    """The report node's result: `value` passed through, and the report of the running prompt (`prompt`, its
    API-format graph) shown on the node and logged in one line."""
    run, _node = executing()
    rows = phase_report.report_rows(RECORDER, run, prompt or {}, DOERS, USERS)
    text = phase_report.report_text(rows, phase_report.class_names(prompt or {}), run)
    log.info("Kontext LowVRAM report: %s", phase_report.summary_line(rows))
    return {"ui": {"text": [text]}, "result": (value,)}
