"""FLUX.2's LLM text encoders in, ComfyUI-named state dicts out: Mistral-3 Small 24B ([dev], full or pruned to the
30 layers FLUX.2 reads) and Qwen3-4B / Qwen3-8B ([klein]). Nothing here imports ComfyUI.

Files: safetensors with the HF names ComfyUI reads (``model.layers.N.self_attn.q_proj.weight``, ``model.embed_tokens``,
optionally under a prefix such as ``text_encoders.qwen3_4b.transformer.``) in bf16/fp16/fp32, fp8, scaled fp8 or
``comfy_quant`` fp8; or GGUF with llama.cpp's names as published (unsloth's / city96's Qwen3 and Mistral GGUFs:
``blk.N.attn_q.weight``, ``token_embd.weight``; gguf-py's TensorNameMap for the arch). llama.cpp's converter permutes
the rows of q/k for its rotary layout in ``llama``-arch files (Mistral); they are permuted back here, as ComfyUI-GGUF
does. Linear weights may stay ``QTensor`` (the pack's ops run them); embeddings and norms are dequantized.

Which model a file is, is decided the way ComfyUI v0.29 decides it (comfy/sd.py detect_te_model): the width of
``model.layers.0.post_attention_layernorm`` and whether the layers have ``q_norm`` (Qwen3); a Mistral-3 24B without
layer 39 is the pruned FLUX.2 variant. The sizes are then read from the shapes, and anything that differs from the
model's standard config becomes ComfyUI's ``<model>_model_config`` model option (the host's config override), as
``t5_config_overrides`` does for T5.
"""
import os
import re

import torch

from .detect import detect_container
from .errors import REDOWNLOAD, ModelFileError

#: ComfyUI's configs (comfy/text_encoders/llama.py: Qwen3_4BConfig, Qwen3_8BConfig, Mistral3Small24BConfig), the
#: fields a file's shapes decide. head_dim is 128 in all three (a class constant there, not overridable).
LLM_CONFIGS = {
    "qwen3_4b": {"vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
                 "num_attention_heads": 32, "num_key_value_heads": 8},
    "qwen3_8b": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                 "num_attention_heads": 32, "num_key_value_heads": 8},
    "mistral3_24b": {"vocab_size": 131072, "hidden_size": 5120, "intermediate_size": 32768, "num_hidden_layers": 40,
                     "num_attention_heads": 32, "num_key_value_heads": 8},
}
HEAD_DIM = 128
#: The hidden states FLUX.2 reads (comfy/text_encoders/flux.py: Qwen3_4BModel / Mistral3_24BModel ``layer``).
LLM_LAYERS = {"qwen3_4b": (9, 18, 27), "qwen3_8b": (9, 18, 27), "mistral3_24b": (10, 20, 30)}
PRUNED_LAYERS = 30  # flux2_te(pruned=True): num_layers 30, no final norm
FAMILY = {"qwen3_4b": "klein", "qwen3_8b": "klein", "mistral3_24b": "dev"}
DISPLAY = {"qwen3_4b": "Qwen3-4B (FLUX.2 [klein] 4B)", "qwen3_8b": "Qwen3-8B (FLUX.2 [klein] 9B)",
           "mistral3_24b": "Mistral-3 Small 24B (FLUX.2 [dev])"}

MARK = "model.layers.0.post_attention_layernorm.weight"
Q_NORM = "model.layers.0.self_attn.q_norm.weight"
TEKKEN = "tekken_model"  # ComfyUI keeps the Mistral tokenizer (tekken.json bytes) in the file as a uint8 tensor

_LINEAR_WEIGHT = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")

WRONG_FILE_FIX = ("FLUX.2 needs its own text encoder from models/text_encoders: [dev] mistral_3_small_flux2 "
                  "(bf16 / fp8), [klein] qwen_3_4b / qwen_3_8b (safetensors or a Qwen3 GGUF)")

# llama.cpp names (gguf-py MODEL_TENSOR names for llama / qwen3 / mistral3) -> ComfyUI (HF) names
_GGUF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
_GGUF_BLOCK_PARTS = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GGUF_UNUSED = ("rope_freqs.weight",)  # llama3-style rope factors: ComfyUI's configs carry their own rope
#: GGUF architectures of these encoders: Qwen3 files say qwen3, Mistral-3 files llama (older converters) or mistral3
GGUF_LLM_ARCHS = {"qwen3": ("qwen3_4b", "qwen3_8b"), "llama": ("mistral3_24b",), "mistral3": ("mistral3_24b",)}
#: archs whose q/k rows llama.cpp's converter permuted (LlamaModel.permute); qwen3 files are stored as in HF
GGUF_PERMUTED_ARCHS = {"llama", "mistral3"}


def llamacpp_llm_name(name: str):
    """ComfyUI (HF) name of a llama.cpp LLM tensor; None for tensors the encoder does not use; KeyError if unknown."""
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    if name in _GGUF_UNUSED:
        return None
    m = _GGUF_BLOCK.match(name)
    if m and m.group(2) in _GGUF_BLOCK_PARTS:
        return f"model.layers.{m.group(1)}.{_GGUF_BLOCK_PARTS[m.group(2)]}.{m.group(3)}"
    raise KeyError(name)


def is_llm_linear_weight(key: str) -> bool:
    return bool(_LINEAR_WEIGHT.match(key))


def llm_tensor_shapes(model_type: str, cfg=None, pruned: bool = False) -> dict:
    """ComfyUI (HF) names and shapes of one of these encoders (the standard size, or ``cfg``'s overrides)."""
    c = {**LLM_CONFIGS[model_type], **(cfg or {})}
    d, ff, q, kv = c["hidden_size"], c["intermediate_size"], c["num_attention_heads"] * HEAD_DIM, \
        c["num_key_value_heads"] * HEAD_DIM
    layers = PRUNED_LAYERS if pruned and not cfg else c["num_hidden_layers"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], d)}
    if not pruned:
        shapes["model.norm.weight"] = (d,)
    for i in range(layers):
        b = f"model.layers.{i}."
        shapes.update({b + "input_layernorm.weight": (d,), b + "post_attention_layernorm.weight": (d,),
                       b + "self_attn.q_proj.weight": (q, d), b + "self_attn.k_proj.weight": (kv, d),
                       b + "self_attn.v_proj.weight": (kv, d), b + "self_attn.o_proj.weight": (d, q),
                       b + "mlp.gate_proj.weight": (ff, d), b + "mlp.up_proj.weight": (ff, d),
                       b + "mlp.down_proj.weight": (d, ff)})
        if model_type.startswith("qwen3"):
            shapes.update({b + "self_attn.q_norm.weight": (HEAD_DIM,), b + "self_attn.k_norm.weight": (HEAD_DIM,)})
    return shapes


def strip_llm_prefix(names):
    """The prefix before ``model.layers.0.post_attention_layernorm.weight`` ('' when none), e.g. a checkpoint's
    ``text_encoders.qwen3_4b.transformer.``."""
    for k in names:
        if k.endswith(MARK):
            return k[: -len(MARK)]
    return ""


def _other_kind(names) -> str:
    keys = set(names)
    if any(k.startswith(("double_blocks.", "single_blocks.", "double_stream_modulation")) for k in keys):
        return "a FLUX diffusion model, not a text encoder (it goes to 'Load Diffusion Model')"
    if any(k.startswith(("encoder.block.", "shared.")) or ".SelfAttention." in k for k in keys) or \
            any(k.startswith("enc.blk.") for k in keys):
        return "a T5 encoder (FLUX.1's), not FLUX.2's LLM encoder (load it with 'Load Text Encoders')"
    if any(k.startswith("text_model.") for k in keys):
        return "a CLIP text encoder (FLUX.1's CLIP-L?), not FLUX.2's LLM encoder"
    if any("decoder.conv_in" in k or "encoder.conv_in" in k for k in keys):
        return "a VAE, not a text encoder"
    if any(k.startswith("model.language_model.") for k in keys):
        return "a multimodal LLM (Qwen3-VL / Qwen3.5 layout), which this loader does not read"
    return "not one of FLUX.2's text encoders (no model.layers.* tensors)"


def describe_llm(shapes: dict, path=None) -> dict:
    """What an LLM text encoder is, from its tensor names and shapes alone (ComfyUI names, prefix stripped):
    {model_type, pruned, config (the file's sizes), overrides (vs ComfyUI's config), layers (hidden states
    FLUX.2 reads), num_layers}. ModelFileError naming the file for anything FLUX.2 cannot use."""
    if MARK not in shapes:
        raise ModelFileError(path, f"is {_other_kind(shapes)}", WRONG_FILE_FIX)
    if "model.layers.0.self_attn.k_proj.bias" in shapes:
        raise ModelFileError(path, "is a Qwen2.5 LLM (attention biases), not FLUX.2's Qwen3 / Mistral-3 encoder",
                             WRONG_FILE_FIX)
    width = tuple(shapes[MARK])
    if len(width) != 1:
        raise ModelFileError(path, f"tensor {MARK!r} has shape {width}: unexpected rank", REDOWNLOAD)
    width = int(width[0])
    qwen = Q_NORM in shapes
    if qwen:
        model_type = {2560: "qwen3_4b", 4096: "qwen3_8b"}.get(width)
        if model_type is None:
            raise ModelFileError(path, f"is a {width}-wide Qwen3 (FLUX.2 [klein] uses Qwen3-4B, 2560 wide, or "
                                       "Qwen3-8B, 4096 wide)", WRONG_FILE_FIX)
    else:
        if width != 5120:
            other = {3072: "Ministral-3 3B", 4096: "a Llama-3-8B-sized LLM"}.get(width, f"a {width}-wide LLM")
            raise ModelFileError(path, f"is {other}, not FLUX.2's Mistral-3 Small 24B (5120 wide)", WRONG_FILE_FIX)
        model_type = "mistral3_24b"
    layer_ids = sorted({int(m.group(1)) for k in shapes for m in [_LAYER.match(k)] if m})
    n = len(layer_ids)
    if layer_ids != list(range(n)):
        missing = sorted(set(range(layer_ids[-1] + 1)) - set(layer_ids))
        raise ModelFileError(path, f"has no tensors for layer(s) {missing[:8]}", REDOWNLOAD)
    pruned = model_type == "mistral3_24b" and "model.layers.39.post_attention_layernorm.weight" not in shapes
    try:
        vocab = int(shapes["model.embed_tokens.weight"][0])
        q_rows = int(shapes["model.layers.0.self_attn.q_proj.weight"][0])
        kv_rows = int(shapes["model.layers.0.self_attn.k_proj.weight"][0])
        ff = int(shapes["model.layers.0.mlp.gate_proj.weight"][0])
    except (KeyError, IndexError) as e:
        raise ModelFileError(path, f"is an incomplete LLM encoder (no usable {e.args[0]!r})", REDOWNLOAD) from None
    if q_rows % HEAD_DIM or kv_rows % HEAD_DIM or not q_rows or not kv_rows:
        raise ModelFileError(path, f"has attention projections of {q_rows} / {kv_rows} rows, not whole "
                                   f"{HEAD_DIM}-wide heads", WRONG_FILE_FIX)
    config = {"vocab_size": vocab, "hidden_size": width, "intermediate_size": ff,
              "num_hidden_layers": PRUNED_LAYERS if pruned else n, "num_attention_heads": q_rows // HEAD_DIM,
              "num_key_value_heads": kv_rows // HEAD_DIM}
    used = LLM_LAYERS[model_type]
    need = PRUNED_LAYERS if pruned else max(used) + 1
    if n < need:
        raise ModelFileError(path, f"has {n} layers; FLUX.2 reads the hidden states of layers {list(used)} of "
                                   f"{DISPLAY[model_type]}", REDOWNLOAD)
    expected = llm_tensor_shapes(model_type, config, pruned=pruned)
    for k, want in expected.items():
        if k in shapes and tuple(shapes[k]) != tuple(want):
            raise ModelFileError(path, f"tensor {k!r} has shape {tuple(shapes[k])}, this encoder needs {tuple(want)}",
                                 REDOWNLOAD)
    for k in expected:
        if k not in shapes and k != "model.norm.weight":
            raise ModelFileError(path, f"is an incomplete {DISPLAY[model_type]} (no {k!r})", REDOWNLOAD)
    overrides = {k: v for k, v in config.items() if LLM_CONFIGS[model_type][k] != v}
    if pruned:
        overrides.pop("num_hidden_layers", None)  # ComfyUI's pruned variant sets 30 itself
    return {"model_type": model_type, "pruned": pruned, "config": config, "overrides": overrides,
            "layers": list(used), "num_layers": n, "family": FAMILY[model_type]}


def llm_config_overrides(desc: dict) -> dict:
    """ComfyUI ``model_options`` for a described file: ``{"<model>_model_config": {...}}`` where its sizes differ."""
    return {f"{desc['model_type']}_model_config": dict(desc["overrides"])} if desc["overrides"] else {}


# ---- reading ----

def _gguf_int(reader, name):
    field = reader.fields.get(name)
    if field is None:
        return None
    try:
        return int(field.parts[field.data[0]][0])
    except Exception:
        return None


def _unpermute(t, heads):
    """Undo llama.cpp's LlamaModel.permute on the rows of a q/k weight (QTensor rows move as whole block rows)."""
    from ..optimizations import QTensor
    rows = t.shape[0]
    if heads < 1 or rows % (2 * heads):
        raise ValueError(f"{rows} rows are not {heads} heads of rotary pairs")

    def perm(x):
        return x.reshape(heads, rows // heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape).contiguous()
    if isinstance(t, QTensor):
        raw = t.raw
        flat = raw.reshape(rows, -1)
        return QTensor(perm(flat).reshape(raw.shape), qformat=t.qformat, shape=t.shape, meta=t.meta, aux=t.aux)
    return perm(t)


def _gguf_header_shapes(path):
    """(arch, {file name: logical shape}, reader) of a GGUF, tensor data untouched."""
    from .gguf_loader import _field_str, _orig_shape, open_reader
    reader = open_reader(path)
    arch = _field_str(reader, "general.architecture")
    shapes = {}
    for t in reader.tensors:
        shapes[t.name] = tuple(_orig_shape(reader, t.name, path) or tuple(int(v) for v in reversed(t.shape)))
    return arch, shapes, reader


def _gguf_names(shapes, arch, path):
    if arch not in GGUF_LLM_ARCHS:
        raise ModelFileError(path, f"is a GGUF of architecture {arch!r}, not FLUX.2's Qwen3 / Mistral-3 encoder",
                             WRONG_FILE_FIX + (" (diffusion models go to 'Load Diffusion Model')" if arch in ("flux", "flux2") else ""))
    names = {}
    for k in shapes:
        try:
            hf = llamacpp_llm_name(k)
        except KeyError:
            raise ModelFileError(path, f"unknown llama.cpp {arch} tensor {k!r}", "is this a Qwen3 / Mistral-3 "
                                 "GGUF? " + WRONG_FILE_FIX) from None
        if hf is not None:
            names[k] = hf
    return names


def _tekken_for_gguf(path):
    """A Mistral GGUF carries llama.cpp's vocabulary, not the tekken tokenizer ComfyUI builds FLUX.2's from: it is
    read from ``<file stem>.tekken.json`` or ``tekken.json`` beside the file."""
    stem = os.path.splitext(path)[0]
    for cand in (stem + ".tekken.json", os.path.join(os.path.dirname(path), "tekken.json")):
        if os.path.isfile(cand):
            with open(cand, "rb") as f:
                data = f.read()
            return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    raise ModelFileError(path, "is a Mistral-3 GGUF without the tekken tokenizer FLUX.2's encoder needs",
                         f"put Mistral's tekken.json (from the mistralai/Mistral-Small-3.1-24B repository) next to it "
                         f"as {os.path.basename(stem)}.tekken.json, or use the safetensors mistral_3_small_flux2 file")


def probe_llm_text_encoder(path) -> dict:
    """describe_llm of a file from its header alone (no tensor data read), plus container and file size."""
    path = os.fspath(path)
    container = detect_container(path)
    if container == "gguf":
        arch, shapes, _ = _gguf_header_shapes(path)
        names = _gguf_names(shapes, arch, path)
        hf_shapes = {names[k]: v for k, v in shapes.items() if k in names}
    else:
        from .safetensors_header import read_header
        header, _ = read_header(path)
        prefix = strip_llm_prefix(header)
        hf_shapes = {k[len(prefix):]: tuple(v["shape"]) for k, v in header.items()
                     if k.startswith(prefix) and isinstance(v, dict) and "shape" in v}
        arch = None
    desc = describe_llm(hf_shapes, path)
    desc.update(container=container, file_bytes=os.path.getsize(path))
    if arch:
        desc["architecture"] = arch
    return desc


def read_llm_text_encoder(path, keep_quantized: bool = True, verify: bool = True, float_dtype=None):
    """-> (state dict in ComfyUI naming, info) for a Qwen3 / Mistral-3 text encoder file in any supported format.

    info: describe_llm's entries plus container, format, tensor_types (GGUF), quantized_tensors (kept as
    QTensor), file, file_bytes. Other quantized tensors (embeddings, norms) become ``float_dtype`` (default: the
    dtype of the file's plain norms, which ComfyUI builds the model in; bf16 when they are quantized too).
    """
    from ..optimizations import QTensor, dequantize
    path = os.fspath(path)
    container = detect_container(path)
    if verify:
        from .integrity import verify_sidecar
        verify_sidecar(path)
    if container == "gguf":
        from .gguf_loader import read_tensors
        arch, shapes, reader = _gguf_header_shapes(path)
        names = _gguf_names(shapes, arch, path)
        raw_sd, counts = read_tensors(reader, path)
        sd = {names[k]: v for k, v in raw_sd.items() if k in names}
        info = {"container": "gguf", "architecture": arch, "tensor_types": counts}
        desc = describe_llm({k: tuple(v.shape) for k, v in sd.items()}, path)
        if arch in GGUF_PERMUTED_ARCHS:
            heads = _gguf_int(reader, f"{arch}.attention.head_count") or desc["config"]["num_attention_heads"]
            kv = _gguf_int(reader, f"{arch}.attention.head_count_kv") or desc["config"]["num_key_value_heads"]
            for k in list(sd):
                try:
                    if k.endswith("self_attn.q_proj.weight"):
                        sd[k] = _unpermute(sd[k], heads)
                    elif k.endswith("self_attn.k_proj.weight"):
                        sd[k] = _unpermute(sd[k], kv)
                except ValueError as e:
                    raise ModelFileError(path, f"tensor {k!r}: {e} (head counts {heads} / {kv} in the metadata)",
                                         REDOWNLOAD) from None
        if desc["model_type"] == "mistral3_24b":
            sd[TEKKEN] = _tekken_for_gguf(path)
        sd.pop("lm_head.weight", None)  # FLUX.2 reads hidden states, never the logits
    else:
        from .safetensors_loader import read_safetensors
        full, info = read_safetensors(path)
        prefix = strip_llm_prefix(full)
        sd = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
        if TEKKEN in full and TEKKEN not in sd:
            sd[TEKKEN] = full[TEKKEN]
        sd.pop("lm_head.weight", None)
        desc = describe_llm({k: tuple(v.shape) for k, v in sd.items() if k != TEKKEN}, path)
        if desc["model_type"] == "mistral3_24b" and TEKKEN not in sd:
            raise ModelFileError(path, "has no 'tekken_model' tokenizer tensor, which ComfyUI's FLUX.2 Mistral "
                                 "encoder reads from the file", "use ComfyUI's mistral_3_small_flux2 file, which "
                                 "carries it")
    norm = sd.get("model.layers.0.input_layernorm.weight")
    if float_dtype is None:  # the dtype ComfyUI builds the model in (llama_detect: the norms' dtype)
        float_dtype = norm.dtype if norm is not None and not isinstance(norm, QTensor) and \
            norm.dtype.is_floating_point else torch.bfloat16
    out, kept = {}, 0
    for k, v in sd.items():
        if isinstance(v, QTensor):
            if keep_quantized and is_llm_linear_weight(k):
                kept += 1
            else:
                v = dequantize(v, float_dtype)
        out[k] = v
    info.update(desc)
    info.update(kind="llm", file=path, file_bytes=os.path.getsize(path), quantized_tensors=kept)
    return out, info
