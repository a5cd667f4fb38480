"""LowVRAMReport: a pass-through that shows, per phase of the prompt, the time, VRAM and RAM our nodes measured."""
from ..host import report


class AnyType(str):
    """A type every input and output matches: ComfyUI compares types with `!=` (v0.3.64 knows no "*" wildcard;
    v0.29 honours this override first), so a "*" that is never unequal connects to anything."""

    def __ne__(self, other):
        return False


ANY = AnyType("*")


class LowVRAMReport:
    DISPLAY_NAME = "VRAM Report (per phase) · Kontext LowVRAM"
    SEARCH_ALIASES = ["vram report", "memory report", "profiler"]
    DESCRIPTION = ("Passes its input through unchanged and shows, for the prompt that just ran, what each phase "
                   "took: model load, text encode, VAE encode, denoise and VAE decode — wall time, peak VRAM "
                   "allocated and reserved by torch, VRAM in use on the whole GPU (when NVML is reachable) and peak "
                   "process RAM — plus any out-of-memory recovery. Phases ComfyUI answered from its cache say "
                   "'cached (earlier run)'; phases done by core nodes are not measured. On a CPU-only machine it "
                   "reports time and RAM.")
    CATEGORY = "Kontext LowVRAM/utils"
    RETURN_TYPES = (ANY,)
    RETURN_NAMES = ("value",)
    OUTPUT_TOOLTIPS = ("The input, unchanged: wire it on to the node that would have taken it.",)
    OUTPUT_NODE = True  # runs and shows its report even with nothing connected after it
    FUNCTION = "show"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"value": (ANY, {"tooltip": "Anything (e.g. the decoded IMAGE): it is passed on unchanged. "
                                                    "Wire the report after the last phase you want measured."})},
            "hidden": {"prompt": "PROMPT"},
        }

    def show(self, value, prompt=None):
        return report.show(value, prompt)
