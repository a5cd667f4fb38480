"""LowVRAMModelLoader: GGUF / FP8 / NF4 / bf16 FLUX diffusion models as an ordinary ComfyUI MODEL."""
from ..host import files, model
from ..loaders import CONVERSIONS

COMPUTE_DTYPES = ("default", "bf16", "fp16", "fp32")


class LowVRAMModelLoader:
    DISPLAY_NAME = "Load Diffusion Model (GGUF/FP8/NF4) · Kontext LowVRAM"
    SEARCH_ALIASES = ["gguf", "unet loader", "load diffusion model", "fp8", "nf4", "flux kontext", "flux2", "klein"]
    DESCRIPTION = ("Loads a FLUX-family diffusion model — FLUX.1 / Kontext, FLUX.2 [dev] / [klein], Chroma: whatever "
                   "this ComfyUI's own model detection runs — in any common format: GGUF (Q2_K…Q8_0, IQ4), "
                   "FP8 (plain, scaled, ComfyUI comfy_quant), bitsandbytes NF4 or bf16/fp16, detected from the file. "
                   "Quantized weights stay quantized in memory and are dequantized layer by layer on the GPU.")
    CATEGORY = "Kontext LowVRAM/loaders"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("An ordinary ComfyUI MODEL: works with KSampler, ReferenceLatent, LoRA loaders and the rest.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model_name": (files.model_files(), {"tooltip": "A .gguf / .safetensors / .sft file from "
                                                            "models/diffusion_models (or models/unet). The format is "
                                                            "detected from the file's contents."}),
            "compute_dtype": (list(COMPUTE_DTYPES), {"default": "default", "advanced": True, "tooltip":
                "Precision the weights are dequantized to for each matmul. 'default' lets ComfyUI pick for your GPU "
                "(bf16 on recent NVIDIA cards); fp16 is faster on older cards, fp32 only for debugging."}),
            "convert_on_load": (list(CONVERSIONS), {"default": "none", "tooltip":
                "Quantize a bf16/fp16/fp32 file while loading, so it fits in less VRAM: fp8_e4m3fn_scaled (~half "
                "size, near-lossless), q8_0 (~53%, near-lossless), nf4 (~28%, visible but small quality loss). "
                "Ignored for files that are already quantized."}),
        }, "optional": {
            "fp8_matmul": ("BOOLEAN", {"default": True, "advanced": True, "tooltip":
                "FP8 e4m3 weights multiply in fp8 on GPUs that support it (RTX 40xx/50xx, H100, L40…): ~1.4x faster "
                "than upcasting, with activations rounded to fp8 (a small extra error). Off: always upcast."}),
            "torch_compile": ("BOOLEAN", {"default": False, "advanced": True, "tooltip":
                "Compile the diffusion model with torch.compile (Inductor) at the first sampling step, like core's "
                "TorchCompileModel node (like it, the compiled model does without ComfyUI v0.29's dynamic VRAM). The "
                "first run takes a minute or more; later runs are faster. Needs a working Triton/C++ toolchain."}),
        }}

    def load(self, model_name, compute_dtype="default", convert_on_load="none", fp8_matmul=True, torch_compile=False):
        # compiled, it skips v0.29's dynamic VRAM, as core's TorchCompileModel does (clone(disable_dynamic=True))
        loaded = model.load_model(files.model_path(model_name), convert_on_load, bool(fp8_matmul), compute_dtype,
                                  disable_dynamic=bool(torch_compile))
        if torch_compile:
            model.compile_at_first_step(loaded)
        return (loaded,)
