"""LowVRAMConvert: convert a FLUX.1 / FLUX.2 transformer or T5 encoder to GGUF / scaled fp8 / NF4 from inside
ComfyUI."""
from ..host import convert as host_convert
from ..loaders.convert_mix import TARGETS, TYPES

TYPE_TOOLTIP = ("The output type. GGUF: " + "; ".join(f"{t.name} {t.what}" for t in TARGETS.values()
                                                      if t.container == "gguf") +
                ". Safetensors: fp8_e4m3fn_scaled (ComfyUI comfy_quant, core loads it natively), nf4 (bitsandbytes "
                "layout, FLUX only). Which tensors get which type: README, 'Converter'.")


class LowVRAMConvert:
    DISPLAY_NAME = "Convert Model (GGUF/FP8/NF4) · Kontext LowVRAM"
    SEARCH_ALIASES = ["convert", "quantize", "gguf converter", "make gguf"]
    DESCRIPTION = ("Converts a FLUX.1 / Kontext or FLUX.2 [dev] / [klein] diffusion model (BFL single file, or a "
                   "diffusers folder's *.safetensors.index.json) or a T5-XXL text encoder to a GGUF (Q8_0 ... Q2_K "
                   "in the published _M/_S mixes, legacy quants, BF16/F16), ComfyUI scaled fp8 or NF4. Tensor by "
                   "tensor, so RAM stays a few times the largest tensor; the file appears only when complete, is "
                   "checked against the source and gets a .sha256 next to it. Runs on the CPU; a 12 B model takes "
                   "minutes to hours by type, FLUX.2 [dev] (32 B) about 3x that (see the summary's Mparam/s).")
    CATEGORY = "Kontext LowVRAM/utils"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("summary",)
    OUTPUT_TOOLTIPS = ("What was written: tensors per type, size, speed and the error against the source "
                       "(also shown on the node).",)
    OUTPUT_NODE = True  # runs with nothing connected after it
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "source": (host_convert.source_files(), {"tooltip":
                "The model to convert: a file from models/diffusion_models or models/text_encoders (bf16 / fp16 / "
                "fp32 / fp8 safetensors, or an unquantized GGUF), or a diffusers transformer's "
                "*.safetensors.index.json. The output is written next to it."}),
            "target_type": (list(TYPES), {"default": "Q4_K_M", "tooltip": TYPE_TOOLTIP}),
            "output_name": ("STRING", {"default": "", "tooltip":
                "File name of the output (no folder; .gguf / .safetensors is added if missing). Empty: "
                "<model>-<TYPE>.gguf next to the source."}),
            "overwrite": ("BOOLEAN", {"default": False, "tooltip":
                "Replace an existing file of that name. Off: an existing file stops the conversion before it "
                "starts. Either way the old file stays until the new one is complete."}),
        }, "optional": {
            "verify": ("BOOLEAN", {"default": True, "advanced": True, "tooltip":
                "Read the written file back and compare every tensor with the source (relative L2 error in the "
                "summary); a broken tensor stops the conversion and nothing is written. Off: faster."}),
        }}

    @classmethod
    def IS_CHANGED(cls, source, target_type, output_name, overwrite=False, verify=True):
        return host_convert.fingerprint(source, target_type, output_name, overwrite, verify)

    def convert(self, source, target_type, output_name, overwrite=False, verify=True):
        summary = host_convert.run(source, target_type, output_name, bool(overwrite), bool(verify))
        return {"ui": {"text": [summary]}, "result": (summary,)}
