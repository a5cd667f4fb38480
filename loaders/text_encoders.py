"""FLUX text encoders (CLIP-L, T5-XXL) in, ComfyUI-named state dicts out. Nothing here imports ComfyUI.

Reads safetensors (bf16/fp16/fp32, fp8, scaled fp8, comfy_quant fp8, NF4) and GGUF, where T5 may use either the
llama.cpp names of city96's T5 GGUF files (`enc.blk.0.attn_q.weight`, `token_embd.weight`, ...) or the HF/ComfyUI
names (`encoder.block.0.layer.0.SelfAttention.q.weight`, `shared.weight`). Linear weights may stay `QTensor`s, which
the pack's quantized ops run; every other quantized tensor (embeddings, norms, the relative attention bias) is
dequantized, because ComfyUI builds those layers as ordinary float modules.
"""
import re

import torch

from .detect import detect_container
from .errors import REDOWNLOAD, ModelFileError

KINDS = ("clip_l", "t5")
CLIP_L_MARK = "text_model.encoder.layers.0.mlp.fc1.weight"
OPEN_CLIP_MARK = "transformer.resblocks.0.ln_1.weight"  # open_clip layout: ComfyUI converts it on load
T5_MARK = "encoder.block.0.layer.0.SelfAttention.q.weight"
T5_REL_BIAS = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"

# ComfyUI's comfy/text_encoders/t5_config_xxl.json, the encoder FLUX was trained with.
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "vocab_size": 32128,
          "relative_attention_num_buckets": 32}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "vocab_size": 49408,
          "max_position_embeddings": 77}

# llama.cpp T5 tensor names (gguf-py's MODEL_TENSOR.ENC_*) -> the HF module path inside a T5 block.
LLAMACPP_T5_PARTS = {
    "attn_q": "layer.0.SelfAttention.q",
    "attn_k": "layer.0.SelfAttention.k",
    "attn_v": "layer.0.SelfAttention.v",
    "attn_o": "layer.0.SelfAttention.o",
    "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",
    "attn_norm": "layer.0.layer_norm",
    "ffn_gate": "layer.1.DenseReluDense.wi_0",
    "ffn_up": "layer.1.DenseReluDense.wi_1",  # "wi" in a non-gated (v1.0) T5: see llamacpp_t5_name
    "ffn_down": "layer.1.DenseReluDense.wo",
    "ffn_norm": "layer.1.layer_norm",
}
_LLAMACPP_BLOCK = re.compile(r"^enc\.blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
GGUF_TEXT_ARCHS = {"t5", "t5encoder", "clip", None}

# The weights ComfyUI builds as Linear layers: only these may stay quantized (our ops run them).
_LINEAR_WEIGHT = re.compile(
    r"^(encoder\.block\.\d+\.layer\.\d\.(SelfAttention\.[qkvo]|DenseReluDense\.(wi_0|wi_1|wi|wo))"
    r"|text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"
    r"|text_projection)\.weight$")

_PREFIX_MARKS = (CLIP_L_MARK, OPEN_CLIP_MARK, T5_MARK)


def llamacpp_t5_name(name: str, gated: bool = True):
    """HF/ComfyUI name of a llama.cpp T5 tensor; None for tensors the encoder does not use (decoder, LM head)."""
    if name == "token_embd.weight":
        return "shared.weight"
    if name == "enc.output_norm.weight":
        return "encoder.final_layer_norm.weight"
    m = _LLAMACPP_BLOCK.match(name)
    if m and m.group(2) in LLAMACPP_T5_PARTS:
        part = LLAMACPP_T5_PARTS[m.group(2)]
        if m.group(2) == "ffn_up" and not gated:
            part = "layer.1.DenseReluDense.wi"
        return f"encoder.block.{m.group(1)}.{part}.{m.group(3)}"
    if name.startswith(("dec.", "output.", "output_norm.")):
        return None
    raise KeyError(name)


def _read_gguf(path):
    """Every tensor of a text-encoder GGUF (QTensor for quantized blocks) with the file's names, its arch and its
    tensor types (type name -> count)."""
    from .gguf_loader import _field_str, open_reader, read_tensors

    reader = open_reader(path)
    arch = _field_str(reader, "general.architecture")
    if arch not in GGUF_TEXT_ARCHS:
        raise ModelFileError(path, f"is a GGUF of architecture {arch!r}, not a CLIP-L / T5 text encoder",
                             _WRONG_FILE_FIX + (" (diffusion models go to 'Load Diffusion Model')" if arch == "flux" else ""))
    sd, counts = read_tensors(reader, path)
    return sd, arch, counts


def _from_llamacpp_names(sd, path):
    if not any(k.startswith("enc.blk.") for k in sd):
        return sd
    gated = any(".ffn_gate." in k for k in sd)
    out = {}
    for k, v in sd.items():
        try:
            name = llamacpp_t5_name(k, gated)
        except KeyError:
            raise ModelFileError(path, f"unknown llama.cpp T5 tensor {k!r}", "is this a T5 encoder GGUF? " + _WRONG_FILE_FIX) from None
        if name is not None:
            out[name] = v
    return out


def _strip_prefix(sd):
    """Remove a shared prefix such as `text_encoders.t5xxl.transformer.` (keys outside it are not the encoder's)."""
    for mark in _PREFIX_MARKS:
        for k in sd:
            if k.endswith(mark):
                prefix = k[: -len(mark)]
                if not prefix:
                    return sd
                return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


_WRONG_FILE_FIX = "pick FLUX's text encoders from models/text_encoders: clip_l.safetensors and a T5-XXL file (t5xxl_fp16 / fp8 / GGUF)"


def _what_else(sd) -> str:
    keys = set(sd)
    if any(k.startswith(("double_blocks.", "single_blocks.")) or ".double_blocks." in k for k in keys):
        return "a FLUX transformer (diffusion model), not a text encoder"
    if any("decoder.conv_in" in k or "encoder.conv_in" in k for k in keys):
        return "a VAE, not a text encoder"
    if any("lora_" in k or ".lora." in k for k in keys):
        return "a LoRA, not a text encoder"
    if any(k.startswith("model.layers.") for k in keys):
        return "an LLM text encoder (not CLIP-L / T5)"
    return "neither a CLIP-L nor a T5 text encoder (no known tensor names)"


def t5_config(sd, path=None) -> dict:
    """The T5 encoder's hyper-parameters, read from the weight shapes; ModelFileError if it is not a gated T5."""
    try:
        vocab, d_model = sd["shared.weight"].shape
        buckets, heads = sd[T5_REL_BIAS].shape
        inner = sd[T5_MARK].shape[0]
        gate = sd.get("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")
        final_norm = sd["encoder.final_layer_norm.weight"]
    except KeyError as e:
        raise ModelFileError(path, f"is an incomplete T5 encoder (no {e.args[0]!r})", REDOWNLOAD) from None
    except ValueError:
        raise ModelFileError(path, "has T5 tensors of unexpected rank", REDOWNLOAD) from None
    if gate is None:
        raise ModelFileError(path, "is a T5 v1.0 encoder (no gated feed-forward)", "FLUX uses T5 v1.1 XXL: " + _WRONG_FILE_FIX)
    if len(sd[T5_MARK].shape) != 2 or len(gate.shape) != 2 or len(final_norm.shape) != 1 or min(heads, inner, d_model) < 1:
        raise ModelFileError(path, "has T5 tensors of unexpected rank or zero size", REDOWNLOAD)
    layers = len({k.split(".")[2] for k in sd if k.startswith("encoder.block.")})
    if vocab != T5_XXL["vocab_size"]:
        raise ModelFileError(path, f"is a T5 with a {vocab}-token vocabulary (UMT5/mT5?), FLUX's T5 tokenizer has {T5_XXL['vocab_size']}",
                             _WRONG_FILE_FIX)
    if final_norm.shape[0] != d_model or inner % heads:
        raise ModelFileError(path, "has inconsistent T5 tensor shapes", REDOWNLOAD)
    config = {"d_model": int(d_model), "d_ff": int(gate.shape[0]), "d_kv": int(inner // heads), "num_heads": int(heads),
              "num_layers": layers, "vocab_size": int(vocab), "relative_attention_num_buckets": int(buckets)}
    _check_shapes(sd, t5_tensor_shapes(config), path)
    return config


def _check_shapes(sd, expected, path):
    """Every tensor the layout knows has its shape (rank included), so a damaged file fails here, naming the file
    and the tensor, instead of inside ComfyUI's state-dict load at the first prompt. Keys the layout does not
    know (tied copies, position ids) are left to ComfyUI."""
    for k, want in expected.items():
        if k in sd and tuple(sd[k].shape) != tuple(want):
            raise ModelFileError(path, f"tensor {k!r} has shape {tuple(sd[k].shape)}, this encoder needs {tuple(want)}",
                                 REDOWNLOAD)


def _clip_l_check(sd, path):
    """CLIP-L is 768 wide; CLIP-G (1280, SDXL) and CLIP-H (1024, SD2) are the usual wrong picks."""
    mark = sd[OPEN_CLIP_MARK] if OPEN_CLIP_MARK in sd else sd[CLIP_L_MARK]
    if len(mark.shape) != (1 if OPEN_CLIP_MARK in sd else 2):
        raise ModelFileError(path, f"CLIP tensor has shape {tuple(mark.shape)}: unexpected rank", REDOWNLOAD)
    width = mark.shape[0] if OPEN_CLIP_MARK in sd else mark.shape[1]
    if width != CLIP_L["hidden_size"]:
        kind = {1280: "CLIP-G (SDXL)", 1024: "CLIP-H (SD2)"}.get(width, f"a {width}-wide CLIP")
        raise ModelFileError(path, f"is {kind}, not CLIP-L (768 wide)", _WRONG_FILE_FIX)
    if OPEN_CLIP_MARK in sd:
        return  # ComfyUI converts the open_clip layout itself
    try:
        config = {"intermediate_size": int(mark.shape[0]), "num_hidden_layers": 0,
                  "vocab_size": int(sd["text_model.embeddings.token_embedding.weight"].shape[0]),
                  "max_position_embeddings": int(sd["text_model.embeddings.position_embedding.weight"].shape[0])}
    except (KeyError, IndexError) as e:
        raise ModelFileError(path, f"is an incomplete or damaged CLIP-L encoder ({type(e).__name__}: {e})", REDOWNLOAD) from None
    config["num_hidden_layers"] = len({k.split(".")[3] for k in sd if k.startswith("text_model.encoder.layers.")})
    _check_shapes(sd, clip_l_tensor_shapes(config), path)


def detect_kind(sd, path=None) -> str:
    """'clip_l' or 't5' (validated), else ModelFileError naming what the file seems to be."""
    if CLIP_L_MARK in sd or OPEN_CLIP_MARK in sd:
        _clip_l_check(sd, path)
        return "clip_l"
    if T5_MARK in sd:
        t5_config(sd, path)
        return "t5"
    raise ModelFileError(path, f"is {_what_else(sd)}", _WRONG_FILE_FIX)


def is_linear_weight(key: str) -> bool:
    return bool(_LINEAR_WEIGHT.match(key))


def float_entries(sd, keep_quantized: bool = True, dtype=torch.float32):
    """Dequantize the QTensors ComfyUI cannot take as they are: all of them, or (keep_quantized) all but Linear
    weights. Returns (state dict, number of QTensors kept)."""
    from ..optimizations import QTensor, dequantize
    out, kept = {}, 0
    for k, v in sd.items():
        if isinstance(v, QTensor):
            if keep_quantized and is_linear_weight(k):
                kept += 1
            else:
                v = dequantize(v, dtype)
        out[k] = v
    return out, kept


def read_text_encoder(path, keep_quantized: bool = True, verify: bool = True):
    """-> (state dict in ComfyUI naming, info) for a CLIP-L or T5 file in any supported format.

    info: kind ('clip_l' | 't5'), container, format, quantized_tensors (kept as QTensor), t5_config (T5 only).
    `verify`: a `<file>.sha256` sidecar, where there is one, must match first (integrity.py: once per file identity).
    """
    import os
    path = os.fspath(path)
    container = detect_container(path)
    if verify:
        from .integrity import verify_sidecar
        verify_sidecar(path)
    if container == "gguf":
        sd, arch, counts = _read_gguf(path)
        info = {"container": "gguf", "architecture": arch or "unknown", "tensor_types": counts}
        sd = _from_llamacpp_names(sd, path)
    else:
        from .safetensors_loader import read_safetensors
        sd, info = read_safetensors(path)
    sd = _strip_prefix(sd)
    if CLIP_L_MARK in sd and T5_MARK in sd:
        raise ModelFileError(path, "holds both CLIP-L and T5", "load a checkpoint that bundles its text encoders with "
                             "ComfyUI's checkpoint loader, or pick the separate clip_l / t5xxl files")
    kind = detect_kind(sd, path)
    sd, kept = float_entries(sd, keep_quantized)
    info.update(kind=kind, file=path, file_bytes=os.path.getsize(path), quantized_tensors=kept)
    if kind == "t5":
        info["t5_config"] = t5_config(sd, path)
    return sd, info


def t5_config_overrides(config: dict) -> dict:
    """The entries of a T5 config that differ from T5-XXL (ComfyUI's `t5xxl_model_config` model option)."""
    return {k: v for k, v in config.items() if T5_XXL.get(k) != v}


GPU_HEADROOM = 1 << 30  # activations, tokenizer and allocator slack next to the weights


def pick_device_policy(policy: str, gpu_bytes_available, encoder_bytes: int) -> str:
    """'gpu_then_release' or 'cpu' for a device policy. `gpu_bytes_available` is None without a GPU, else the VRAM
    the encoder could use (free + what the host may unload)."""
    if policy not in ("auto", "gpu_then_release", "cpu"):
        raise ValueError(f"unknown device policy {policy!r}")
    if gpu_bytes_available is None or policy == "cpu":
        return "cpu"
    if policy == "gpu_then_release":
        return policy
    return "gpu_then_release" if gpu_bytes_available >= encoder_bytes * 1.1 + GPU_HEADROOM else "cpu"


def pair_by_kind(infos, paths):
    """Check that the files are one CLIP-L and one T5 (in any order); ModelFileError naming the odd one out."""
    kinds = [i["kind"] for i in infos]
    if sorted(kinds) != sorted(KINDS):
        dup = paths[1] if len(paths) > 1 else paths[0]
        raise ModelFileError(dup, f"both text encoder inputs are {kinds[0]} files",
                             "FLUX needs one CLIP-L file and one T5-XXL file")
    return kinds


# ---- the layouts files are checked against (tests/fixtures fill them with random values) ----

def t5_tensor_shapes(cfg=None) -> dict:
    """HF/ComfyUI names and shapes of a gated T5 encoder (T5-XXL by default)."""
    c = {**T5_XXL, **(cfg or {})}
    d, inner, ff = c["d_model"], c["d_kv"] * c["num_heads"], c["d_ff"]
    shapes = {"shared.weight": (c["vocab_size"], d), "encoder.final_layer_norm.weight": (d,),
              T5_REL_BIAS: (c["relative_attention_num_buckets"], c["num_heads"])}
    for i in range(c["num_layers"]):
        b = f"encoder.block.{i}.layer."
        shapes.update({b + "0.SelfAttention.q.weight": (inner, d), b + "0.SelfAttention.k.weight": (inner, d),
                       b + "0.SelfAttention.v.weight": (inner, d), b + "0.SelfAttention.o.weight": (d, inner),
                       b + "0.layer_norm.weight": (d,), b + "1.DenseReluDense.wi_0.weight": (ff, d),
                       b + "1.DenseReluDense.wi_1.weight": (ff, d), b + "1.DenseReluDense.wo.weight": (d, ff),
                       b + "1.layer_norm.weight": (d,)})
    return shapes


def clip_l_tensor_shapes(cfg=None) -> dict:
    """HF/ComfyUI names and shapes of a CLIP text model (CLIP-L by default)."""
    c = {**CLIP_L, **(cfg or {})}
    d, ff = c["hidden_size"], c["intermediate_size"]
    shapes = {"text_model.embeddings.token_embedding.weight": (c["vocab_size"], d),
              "text_model.embeddings.position_embedding.weight": (c["max_position_embeddings"], d),
              "text_model.final_layer_norm.weight": (d,), "text_model.final_layer_norm.bias": (d,),
              "text_projection.weight": (d, d)}
    for i in range(c["num_hidden_layers"]):
        b = f"text_model.encoder.layers.{i}."
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes.update({f"{b}self_attn.{p}.weight": (d, d), f"{b}self_attn.{p}.bias": (d,)})
        for n in ("layer_norm1", "layer_norm2"):
            shapes.update({f"{b}{n}.weight": (d,), f"{b}{n}.bias": (d,)})
        shapes.update({b + "mlp.fc1.weight": (ff, d), b + "mlp.fc1.bias": (ff,), b + "mlp.fc2.weight": (d, ff),
                       b + "mlp.fc2.bias": (d,)})
    return shapes
