"""The converter's target types and the one table that says which tensor gets which type.

FLUX (BFL names; FLUX.1 and FLUX.2 alike) follows the published FLUX GGUFs: city96's convert.py (tools/convert.py
in city96/ComfyUI-GGUF) writes both as architecture "flux" (its ModelFlux matches
`double_blocks.0.img_attn.proj.weight`, which FLUX.2 has too) and keeps 1-D and small tensors in F32; his llama.cpp
patch (tools/lcpp.patch, `img_tensor_get_type` and the "rules for image models" of LLM_ARCH_FLUX) keeps the
input/output projections unquantized (`txt_in.`, `img_in.`, `time_in.`, `vector_in.`, `guidance_in.`,
`final_layer.` anywhere in the name) and raises some block tensors in the _M mixes. Of the patch's rules only the
fused-qkv one matches a BFL name (`*_attn.qkv.weight`, double blocks, in both families); its to_v, ffn_down and
`.ff.net.2` rules name diffusers / other models' tensors (FLUX.2's `img_mlp.0` / `img_mlp.2`, `linear1/2` and the
shared `*_modulation.lin` match none of them), so FLUX _S files are the pure base type and FLUX.2's shared
modulations get it too. Rows that are not whole K-quant (256) or legacy (32) blocks fall back to F16, as the patch
does.

T5 (llama.cpp names, arch t5encoder) follows llama.cpp's own LLM rules (`llama_tensor_get_type`) for the tensors a
T5 encoder has: the token embedding is treated as the output tensor (an encoder has no `output.weight`), attn_v and
ffn_down get more bits in the _M mixes on the layers `use_more_bits` picks, the relative attention bias is never
quantized.

The safetensors targets quantize the FLUX block linears (FLUX.2: with its three shared modulation layers, as the
pack's loaders' on-load conversion does, loaders/keys.py) / T5 linears and leave every other tensor as the source
stores it (an fp8 source's are dequantized to bf16).
"""
from __future__ import annotations

from dataclasses import dataclass

from .flux2_layout import SHARED_MODULATIONS

SMALL_TENSOR = 1024  # city96's QUANTIZATION_THRESHOLD: tensors of at most this many values stay F32
QK_K = 256  # K-quant super-block
QK_LEGACY = 32  # Q8_0 / Q5_x / Q4_x block
K_QUANTS = ("Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")


@dataclass(frozen=True)
class Target:
    name: str  # what the user types: "Q4_K_M", "fp8_e4m3fn_scaled", ...
    container: str  # "gguf" | "safetensors"
    base: str  # the type most quantized tensors get ("Q4_K"), or the safetensors format
    file_type: str | None  # gguf.LlamaFileType member written as general.file_type
    what: str  # one line for --help and the node's tooltip

    @property
    def suffix(self) -> str:
        return ".gguf" if self.container == "gguf" else ".safetensors"


def _g(name, base, what, ftype=None):
    return Target(name, "gguf", base, ftype or f"MOSTLY_{name}", what)


TARGETS = {t.name: t for t in (
    _g("Q8_0", "Q8_0", "8.5 bits/weight, near-lossless (~0.5 % error)"),
    _g("Q6_K", "Q6_K", "6.6 bits/weight, near-lossless"),
    _g("Q5_K_M", "Q5_K", "5.5 bits/weight, double-block qkv in Q6_K"),
    _g("Q5_K_S", "Q5_K", "5.5 bits/weight"),
    _g("Q4_K_M", "Q4_K", "4.5 bits/weight, double-block qkv in Q5_K (the 8-12 GB card file)"),
    _g("Q4_K_S", "Q4_K", "4.5 bits/weight"),
    _g("Q3_K_M", "Q3_K", "3.4 bits/weight, double-block qkv in Q4_K"),
    _g("Q3_K_S", "Q3_K", "3.4 bits/weight"),
    _g("Q2_K", "Q2_K", "2.6 bits/weight, visibly lossy"),
    _g("Q5_1", "Q5_1", "6 bits/weight (legacy)"),
    _g("Q5_0", "Q5_0", "5.5 bits/weight (legacy)"),
    _g("Q4_1", "Q4_1", "5 bits/weight (legacy)"),
    _g("Q4_0", "Q4_0", "4.5 bits/weight (legacy)"),
    _g("BF16", "BF16", "unquantized bf16 GGUF (the input llama-quantize takes)"),
    _g("F16", "F16", "unquantized fp16 GGUF"),
    Target("fp8_e4m3fn_scaled", "safetensors", "fp8_e4m3fn_scaled", None,
           "fp8 e4m3 with a per-tensor scale, ComfyUI comfy_quant layout (core loads it natively)"),
    Target("nf4", "safetensors", "nf4", None, "bitsandbytes NF4 layout (4.5 bits/weight)"),
)}
TYPES = tuple(TARGETS)
GGUF_TYPES = tuple(n for n, t in TARGETS.items() if t.container == "gguf")
T5_TYPES = tuple(n for n in TYPES if n != "nf4")  # an NF4 T5 loads in no ComfyUI loader


def target(name: str) -> Target:
    """The Target for `name` (case-insensitive); ValueError listing every type."""
    for n, t in TARGETS.items():
        if n.lower() == str(name).strip().lower():
            return t
    raise ValueError(f"unknown type {name!r}; choose one of: {', '.join(TYPES)}")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _fits(qtype: str, shape) -> bool:
    """Whether rows of `shape` are whole blocks of `qtype`."""
    if qtype in ("F32", "F16", "BF16"):
        return True
    return int(shape[-1]) % (QK_K if qtype in K_QUANTS else QK_LEGACY) == 0


# ---- FLUX ------------------------------------------------------------------------------------------------------

# lcpp.patch: `quantize &= name.find(...) == npos` for LLM_ARCH_FLUX (FLUX.1 and FLUX.2 names); city96 writes them F16
FLUX_UNQUANTIZED = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")
# lcpp.patch, "Rules for fused qkv attention": the one rule whose patterns match BFL names
FLUX_RAISED = {"Q3_K_M": "Q4_K", "Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K"}
# FLUX.2's shared modulations (double_stream_modulation_img/txt.lin, single_stream_modulation.lin) are block-sized
# linears outside the blocks: quantized like them (GGUF: no lcpp rule names them, so the base type)
FLUX_BLOCKS = ("double_blocks.", "single_blocks.") + SHARED_MODULATIONS


def _is_fused_qkv(key: str) -> bool:
    return key.endswith("attn.qkv.weight")  # lcpp.patch matches "attn.qkv.weight" anywhere in the name


def flux_tensor_type(key: str, shape, t: Target) -> tuple[str, str]:
    """(type, rule) for a FLUX tensor in BFL naming. type: a GGUF type name, the safetensors format, or "keep"
    (safetensors targets: as the source stores it)."""
    shape = tuple(shape)
    block_linear = key.startswith(FLUX_BLOCKS) and key.endswith(".weight") and len(shape) == 2
    if t.container == "safetensors":
        if block_linear and _numel(shape) > SMALL_TENSOR:
            return t.base, "block linear"
        return "keep", "not a block linear: kept as stored"
    if len(shape) <= 1 or _numel(shape) <= SMALL_TENSOR:
        return "F32", "1-D or <= 1024 values: F32"
    if t.base in ("F16", "BF16"):
        return t.base, "unquantized file"
    if key.startswith(FLUX_UNQUANTIZED):
        return "F16", "input/output projection: F16 (city96)"
    qtype, rule = t.base, "block tensor"
    if key.startswith(SHARED_MODULATIONS):
        rule = "FLUX.2 shared modulation: block tensor"
    if _is_fused_qkv(key) and t.name in FLUX_RAISED:
        qtype, rule = FLUX_RAISED[t.name], f"fused qkv raised in {t.name} (lcpp.patch)"
    if not _fits(qtype, shape):
        return "F16", f"rows of {shape[-1]} are not whole {qtype} blocks: F16 (lcpp.patch)"
    return qtype, rule


# ---- T5 (llama.cpp names) --------------------------------------------------------------------------------------

def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers that get more bits in the _M mixes."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _t5_block(name: str):
    parts = name.split(".")
    return int(parts[2]) if name.startswith("enc.blk.") and len(parts) > 3 and parts[2].isdigit() else None


def _t5_raised(name: str, t: Target, n_layers: int):
    """llama_tensor_get_type's rules for the tensors a T5 encoder has (attn_v, ffn_down, the token embedding as
    the output tensor); None when no rule applies."""
    f, i = t.name, _t5_block(name)
    if name == "token_embd.weight":  # no output.weight in an encoder: the embedding is the output tensor
        return None if f == "Q8_0" else "Q6_K"
    if i is None:
        return None
    if ".attn_v." in name:
        if f == "Q2_K":
            return "Q3_K"  # n_gqa() == 1 < 4
        if f == "Q3_K_M":
            return "Q5_K" if i < 2 else "Q4_K"
        if f in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n_layers):
            return "Q6_K"
        if f == "Q4_K_S" and i < 4:
            return "Q5_K"
    if ".ffn_down." in name:
        if f == "Q2_K":
            return "Q3_K"
        if f == "Q3_K_M":
            return "Q5_K" if i < n_layers // 16 else "Q4_K"
        if f in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n_layers):
            return "Q6_K"
        if f == "Q4_K_S" and i < n_layers // 8:
            return "Q5_K"
    return None


def t5_tensor_type(name: str, shape, t: Target, n_layers: int, linear: bool) -> tuple[str, str]:
    """(type, rule) for a T5 encoder tensor: `name` in llama.cpp naming for GGUF targets, `linear` whether
    ComfyUI builds it as a Linear (the safetensors targets quantize only those)."""
    shape = tuple(shape)
    if t.container == "safetensors":
        if linear and len(shape) == 2 and _numel(shape) > SMALL_TENSOR:
            return t.base, "linear"
        return "keep", "not a linear: kept as stored"
    if len(shape) <= 1 or _numel(shape) <= SMALL_TENSOR:
        return "F32", "1-D or <= 1024 values: F32"
    if t.base in ("F16", "BF16"):
        return t.base, "unquantized file"
    if ".attn_rel_b." in name:
        return "F16", "relative attention bias: never quantized (llama.cpp)"
    qtype, rule = t.base, "linear"
    raised = _t5_raised(name, t, n_layers)
    if raised is not None:
        qtype, rule = raised, ("token embedding as output tensor (llama.cpp)" if name == "token_embd.weight"
                               else f"raised in {t.name} (llama.cpp)")
    if not _fits(qtype, shape):
        if name == "token_embd.weight":
            return "Q8_0", "token embedding rows not whole K blocks: Q8_0 (llama.cpp)"
        return "F16", f"rows of {shape[-1]} are not whole {qtype} blocks: F16"
    return qtype, rule


# ---- the table as README shows it (tests/test_convert_mix.py holds README to it) --------------------------------

MIX_COLUMNS = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q3_K_S", "Q2_K",
               "Q5_1 / Q5_0 / Q4_1 / Q4_0", "BF16 / F16", "fp8_e4m3fn_scaled / nf4")


def mix_table_markdown() -> str:
    """The FLUX type mix as a markdown table, computed from flux_tensor_type on FLUX.1's own shapes (FLUX.2 [dev]'s
    for its shared modulations)."""
    h, h2 = 3072, 6144
    rows = [
        ("1-D (biases, norm scales) and tensors of <= 1024 values", "double_blocks.0.img_attn.proj.bias", (h,)),
        ("img_in, txt_in, time_in, vector_in, guidance_in, final_layer", "txt_in.weight", (h, 4096)),
        ("double_blocks.*.{img,txt}_attn.qkv.weight", "double_blocks.0.img_attn.qkv.weight", (3 * h, h)),
        ("every other block weight (proj, mlp, mod, linear1/2, modulation)", "single_blocks.0.linear1.weight",
         (7 * h, h)),
        ("FLUX.2 double_stream_modulation_{img,txt}.lin, single_stream_modulation.lin",
         "double_stream_modulation_img.lin.weight", (6 * h2, h2)),
    ]

    def cell(col, key, shape):
        names = col.split(" / ")
        types = []
        for n in names:
            ty = flux_tensor_type(key, shape, TARGETS[n])[0]
            types.append("as stored" if ty == "keep" else ty)
        uniq = list(dict.fromkeys(types))
        return " / ".join(uniq) if len(uniq) > 1 else uniq[0]

    lines = ["| tensor | " + " | ".join(MIX_COLUMNS) + " |", "|---" * (len(MIX_COLUMNS) + 1) + "|"]
    for label, key, shape in rows:
        lines.append(f"| {label} | " + " | ".join(cell(c, key, shape) for c in MIX_COLUMNS) + " |")
    return "\n".join(lines)
