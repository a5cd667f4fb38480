"""What the converter reads: a FLUX.1 or FLUX.2 ([dev], [klein]) transformer (BFL single file, optionally
`model.diffusion_model.`-prefixed, or a diffusers folder of sharded safetensors with its index: FluxTransformer2DModel
or Flux2Transformer2DModel), or a T5 encoder (HF names; bf16 / fp16 / fp32, fp8 or scaled fp8). Unquantized GGUFs
(F32/F16/BF16, e.g. city96's BF16 conversions) are read too. Source.kind is "flux" (FLUX.1), "flux2" or "t5".

Shapes come from the headers only; `Source.read` returns one tensor at a time. safetensors' `safe_open`
memory-maps the whole file, and every page a read touches stays in the process's resident set until the mapping
goes, so reading a 24 GB model through one handle would peak at 24 GB of RSS however little is kept: the handle is
reopened every REOPEN_BYTES. GGUF tensors are read with plain file reads at the offsets GGUFReader gives.
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple

import torch

from .errors import REDOWNLOAD, ModelFileError, check_file, printable

REOPEN_BYTES = 32 << 20
INDEX_SUFFIX = ".safetensors.index.json"
MAX_INDEX_BYTES = 64 << 20

FP8_SCALE_KEYS = (".weight_scale", ".scale_weight")
DROPPED_SUFFIXES = (".input_scale", ".scale_input", ".comfy_quant")
SCALED_FP8_MARKER = "scaled_fp8"
COMFY_QUANT_FP8 = ("float8_e4m3fn", "float8_e5m2")

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
FLOAT_FIX = "convert from the original bf16 / fp16 release"
WHAT_IT_TAKES = ("the converter takes a FLUX.1 or FLUX.2 transformer (BFL single file or a diffusers folder) or a "
                 "T5-XXL encoder")
FLUX_KINDS = ("flux", "flux2")  # Source.kind of a FLUX.1 / FLUX.2 transformer


class SourceTensor(NamedTuple):
    name: str  # BFL (FLUX.1 / FLUX.2) or HF (T5) name
    shape: tuple
    dtype: str  # as stored: "bfloat16", "float8_e4m3fn", ...
    parts: tuple  # ((file index, key in that file), ...): concatenated along dim 0
    transform: str | None = None  # diffusers_keys.SWAP_SCALE_SHIFT
    scales: tuple = ()  # per part: the fp8 scale's key in the same file, or None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    @property
    def is_fp8(self) -> bool:
        return self.dtype.startswith("float8")


_ITEM_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


def tensor_bytes(t: SourceTensor) -> int:
    return t.numel * _ITEM_BYTES.get(t.dtype.split("/")[0], 1)


class _SafetensorsFile:
    """One .safetensors file read tensor by tensor through the safetensors library (reopened every REOPEN_BYTES)."""

    def __init__(self, path):
        from .safetensors_header import read_header
        self.path = path
        self.header, self.metadata = read_header(path)
        self._handle, self._read = None, 0

    def get(self, key) -> torch.Tensor:
        from safetensors import safe_open
        info = self.header[key]
        if self._handle is None or self._read > REOPEN_BYTES:
            self.close()
            self._handle = safe_open(self.path, framework="pt", device="cpu")
            self._handle.__enter__()
        try:
            t = self._handle.get_tensor(key)
        except Exception as e:
            raise ModelFileError(self.path, f"could not read tensor {key!r} ({type(e).__name__}: {e})",
                                 REDOWNLOAD) from None
        self._read += info["data_offsets"][1] - info["data_offsets"][0]
        return t

    def close(self):
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
            self._handle = None
            self._read = 0


class _GGUFFile:
    """A GGUF read tensor by tensor: gguf-py's GGUFReader parses the header (after the pack's bounded validation);
    each tensor's bytes are then read from the offset GGUFReader gives with a plain file read, so no page of the
    reader's memory map is ever touched by the data (and none stays resident)."""

    def __init__(self, path):
        from .gguf_loader import _orig_shape, open_reader
        self.path = path
        self._reader = open_reader(path)
        self.entries = {}
        for t in self._reader.tensors:
            stored = tuple(int(v) for v in reversed(t.shape))
            self.entries[t.name] = (t, t.tensor_type.name, tuple(_orig_shape(self._reader, t.name, path) or stored),
                                    int(t.n_bytes))
        self.arch = self.field("general.architecture")

    def raw(self, key):
        """(the tensor's stored bytes as a uint8 array, its GGMLQuantizationType)."""
        import numpy as np
        t, _qtype, _shape, nbytes = self.entries[key]
        data = np.fromfile(self.path, dtype=np.uint8, count=nbytes, offset=int(t.data_offset))
        if data.size != nbytes:
            raise ModelFileError(self.path, f"tensor {key!r} ends past the end of the file", REDOWNLOAD)
        return data, t.tensor_type

    def get(self, key) -> torch.Tensor:
        """An unquantized (F32 / F16 / BF16) tensor's values in its logical shape."""
        import numpy as np
        _t, qtype, shape, _nbytes = self.entries[key]
        data, _ = self.raw(key)
        dtype = {"F32": np.float32, "F16": np.float16}.get(qtype)
        t = torch.from_numpy(data.view(dtype) if dtype is not None else data)
        if qtype == "BF16":
            t = t.view(torch.bfloat16)
        return t.reshape(shape)

    def field(self, name):
        """A scalar or string metadata value (None when absent)."""
        f = self._reader.fields.get(name)
        return None if f is None else f.contents()

    def close(self):
        pass


class Source:
    """The tensors of one model (FLUX.1 / FLUX.2 transformer or T5 encoder) in converter order, readable one at a
    time. `config`: a FluxConfig / Flux2Config, or the T5 config dict."""

    def __init__(self, path, files, kind, layout, tensors, config, notes=()):
        self.path, self.files, self.kind, self.layout = path, files, kind, layout
        self.tensors, self.config, self.notes = tensors, config, list(notes)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors as stored (fp8 scales not counted)."""
        return sum(tensor_bytes(t) for t in self.tensors)

    def dtype_counts(self) -> str:
        counts = {}
        for t in self.tensors:
            counts[t.dtype] = counts.get(t.dtype, 0) + 1
        return ", ".join(f"{d} x{n}" for d, n in sorted(counts.items(), key=lambda kv: -kv[1]))

    def read(self, st: SourceTensor) -> torch.Tensor:
        """The tensor's values: its stored dtype for float tensors, float32 for fp8 (scale applied)."""
        from ..optimizations.quant.fp8 import dequantize_fp8
        from .diffusers_keys import SWAP_SCALE_SHIFT, swap_scale_shift
        parts = []
        for j, (fi, key) in enumerate(st.parts):
            f = self.files[fi]
            t = f.get(key)
            scale_key = st.scales[j] if st.scales else None
            if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                t = dequantize_fp8(t, f.get(scale_key).float().reshape(()) if scale_key else None, torch.float32)
            parts.append(t)
        t = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        if tuple(t.shape) != tuple(st.shape):
            raise ModelFileError(self.path, f"tensor {st.name!r} read as {tuple(t.shape)}, its header says {st.shape}",
                                 REDOWNLOAD)
        if st.transform == SWAP_SCALE_SHIFT:
            t = swap_scale_shift(t)
        return t

    def close(self):
        for f in self.files:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- finding the files -----------------------------------------------------------------------------------------

def _index_shards(index_path):
    """{key: shard path} from a diffusers/transformers `*.safetensors.index.json`."""
    if os.path.getsize(index_path) > MAX_INDEX_BYTES:
        raise ModelFileError(index_path, "is too large to be a safetensors index", REDOWNLOAD)
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                      for k, v in weight_map.items()):
            raise TypeError("weight_map is not an object of file names")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ModelFileError(index_path, f"is not a valid safetensors index ({type(e).__name__}: {e})",
                             REDOWNLOAD) from None
    folder = os.path.dirname(os.path.abspath(index_path))
    shards = {}
    for key, shard in weight_map.items():
        if os.path.basename(shard) != shard:
            raise ModelFileError(index_path, f"names shard {shard!r} outside its folder", REDOWNLOAD)
        shards[key] = os.path.join(folder, shard)
    return shards


def _files_of(path):
    """(list of safetensors paths, index path or None, layout words) for a file, an index or a folder."""
    if os.path.isdir(path):
        indexes = sorted(f for f in os.listdir(path) if f.endswith(INDEX_SUFFIX))
        if indexes:
            return _files_of(os.path.join(path, indexes[0]))
        if os.path.isdir(os.path.join(path, "transformer")):  # a diffusers pipeline folder
            return _files_of(os.path.join(path, "transformer"))
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith((".safetensors", ".sft")))
        if not files:
            raise ModelFileError(path, "is a folder with no .safetensors files and no *.safetensors.index.json",
                                 "give the model file, or the diffusers folder holding the transformer's shards")
        return files, None, f"folder of {len(files)} safetensors file(s)"
    if path.endswith(".json"):
        shards = _index_shards(path)
        files = sorted(set(shards.values()))
        for f in files:
            if not os.path.isfile(f):
                raise ModelFileError(path, f"lists shard {os.path.basename(f)!r}, which is not in its folder",
                                     "download every shard of the model")
        return files, path, f"sharded safetensors ({len(files)} shards)"
    return [path], None, "single file"


# ---- what the tensors are ---------------------------------------------------------------------------------------

def _describe(names) -> str:
    """What a set of tensor names looks like, for the refusal."""
    from .text_encoders import CLIP_L_MARK, OPEN_CLIP_MARK
    keys = set(names)
    if any("distilled_guidance_layer." in k for k in keys):
        return "a Chroma transformer (not FLUX.1 or FLUX.2)"
    if any(k.endswith(CLIP_L_MARK) or k.endswith(OPEN_CLIP_MARK) for k in keys):
        return "a CLIP text encoder (CLIP-L is 0.25 GB and is used as it is; only T5-XXL is worth converting)"
    if any(k.endswith(("decoder.conv_in.weight", "encoder.conv_in.weight")) for k in keys):
        return "a VAE (it is small and runs unquantized; use it as it is)"
    if any("lora_" in k or ".lora." in k or k.endswith(".alpha") for k in keys):
        return "a LoRA (LoRAs are applied to a model, not converted)"
    if any(k.startswith(("model.layers.", "layers.")) for k in keys):
        return "an LLM (not a FLUX transformer or T5 encoder)"
    if any(k.startswith(("input_blocks.", "down_blocks.", "model.diffusion_model.input_blocks.")) for k in keys):
        return "a Stable Diffusion UNet (not FLUX.1)"
    first = ", ".join(sorted(keys)[:4])
    return f"not a model this converter knows (first tensors: {printable(first)}{', ...' if len(keys) > 4 else ''})"


def _refuse(path, what):
    raise ModelFileError(path, f"is {what}", WHAT_IT_TAKES)


def _scan_safetensors(path, files):
    """{name: (file index, dtype, shape)} of the weights, fp8 scales folded: ({...}, {name: scale key})."""
    entries, scales, comfy_layers = {}, {}, {}
    for fi, f in enumerate(files):
        header = f.header
        if any(k.endswith(".quant_state.bitsandbytes__nf4") or k.endswith("__fp4") for k in header):
            raise ModelFileError(f.path, "is a bitsandbytes 4-bit checkpoint (already quantized)", FLOAT_FIX)
        if "_quantization_metadata" in f.metadata:
            try:
                comfy_layers.update(json.loads(f.metadata["_quantization_metadata"])["layers"])
            except (ValueError, KeyError, TypeError) as e:
                raise ModelFileError(f.path, f"corrupt _quantization_metadata ({e})", REDOWNLOAD) from None
        for k, info in header.items():
            if k == SCALED_FP8_MARKER or k.endswith("." + SCALED_FP8_MARKER) or k.endswith(DROPPED_SUFFIXES):
                if k.endswith(".comfy_quant"):
                    try:
                        comfy_layers[k[: -len(".comfy_quant")]] = json.loads(bytes(f.get(k).tolist()).decode())
                    except (ValueError, UnicodeDecodeError) as e:
                        raise ModelFileError(f.path, f"corrupt comfy_quant entry {k!r} ({e})", REDOWNLOAD) from None
                continue
            if k.endswith(FP8_SCALE_KEYS):
                continue
            if k in entries:
                raise ModelFileError(f.path, f"tensor {k!r} is also in {os.path.basename(files[entries[k][0]].path)}",
                                     REDOWNLOAD)
            dtype = info["dtype"]
            if dtype not in ST_DTYPES:
                raise ModelFileError(f.path, f"tensor {k!r} is stored as {dtype}, not a float type", FLOAT_FIX)
            entries[k] = (fi, dtype, tuple(info["shape"]))
            if dtype.startswith("F8"):
                layer = k[: -len(".weight")] if k.endswith(".weight") else k
                for sk in FP8_SCALE_KEYS:
                    if layer + sk in header:
                        scales[k] = layer + sk
                        break
    for layer, conf in comfy_layers.items():
        if not isinstance(conf, dict) or conf.get("format") not in COMFY_QUANT_FP8:
            fmt = conf.get("format") if isinstance(conf, dict) else conf
            raise ModelFileError(path, f"layer {layer!r} is ComfyUI quant format {fmt!r} (already quantized)",
                                 FLOAT_FIX)
    for k, (fi, dtype, shape) in entries.items():
        if dtype.startswith("F8") and k in scales:
            sinfo = files[fi].header[scales[k]]
            n = 1
            for d in sinfo["shape"]:
                n *= d
            if n != 1:
                raise ModelFileError(files[fi].path, f"layer {k!r} has a {n}-element fp8 scale",
                                     "only per-tensor fp8 scales can be converted: " + FLOAT_FIX)
    return entries, scales


_DT_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
             "F8_E5M2": "float8_e5m2"}


def _flux_config(path, shapes):
    """(kind, config) of a FLUX transformer's BFL names -> shapes: FLUX.2 where its shared modulation is there
    (the key ComfyUI tells FLUX.2 by), else FLUX.1; ModelFileError when the layout is not complete."""
    from .flux2_layout import FLUX2_MARK, detect_flux2_config
    from .flux_layout import detect_flux_config
    if FLUX2_MARK in shapes:
        try:
            return "flux2", detect_flux2_config(shapes)
        except ValueError as e:
            raise ModelFileError(path, f"is not a complete FLUX.2 transformer ({e})", REDOWNLOAD) from None
    try:
        return "flux", detect_flux_config(shapes)
    except ValueError as e:
        raise ModelFileError(path, f"is not a complete FLUX.1 transformer ({e})", REDOWNLOAD) from None


def _layout_order(kind, config):
    """The BFL names of a complete transformer of `config`, in ComfyUI's order."""
    from .flux2_layout import flux2_tensor_shapes
    from .flux_layout import flux_tensor_shapes
    return list(flux2_tensor_shapes(config) if kind == "flux2" else flux_tensor_shapes(config))


def _family(kind):
    return "FLUX.2" if kind == "flux2" else "FLUX.1"


def _plain(entries, scales, names_map=None):
    """SourceTensors of 1:1 entries, in file order (names_map: output name -> key in the file)."""
    out = []
    for name, key in (names_map or {k: k for k in entries}).items():
        fi, dtype, shape = entries[key]
        out.append(SourceTensor(name, shape, _DT_NAMES.get(dtype, dtype.lower()), ((fi, key),), None,
                                (scales.get(key),)))
    return out


def _t5_from(path, names, shapes, layout, notes):
    """(output order as {HF name: key}, config) for a T5 encoder's names (prefix stripped, decoder dropped)."""
    from .text_encoders import T5_MARK, t5_config
    prefix = ""
    for k in names:
        if k.endswith(T5_MARK):
            prefix = k[: -len(T5_MARK)]
            break
    keyed = {k[len(prefix):]: k for k in names if k.startswith(prefix)}
    dropped = [k for k in keyed if k.startswith(("decoder.", "lm_head."))]
    if dropped:
        notes.append(f"decoder / LM head ({len(dropped)} tensors) left out: FLUX uses the encoder only")
    for k in dropped:
        del keyed[k]
    if "encoder.embed_tokens.weight" in keyed:
        if "shared.weight" in keyed:
            del keyed["encoder.embed_tokens.weight"]  # the tied copy of shared.weight
        else:
            keyed["shared.weight"] = keyed.pop("encoder.embed_tokens.weight")
    meta = {k: torch.empty(shapes[v], device="meta") for k, v in keyed.items()}
    config = t5_config(meta, path)
    return keyed, config


def open_source(path) -> Source:
    """The model at `path` (file, diffusers folder or its index json), checked; ModelFileError naming the file and
    what it is when the converter cannot take it."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelFileError(path, "no such file or folder", "check the path")
    if not os.path.isdir(path) and not path.endswith(".json"):
        check_file(path)
        from .detect import detect_container
        if detect_container(path) == "gguf":
            return _open_gguf(path)
    paths, index, layout = _files_of(path)
    files = [_SafetensorsFile(p) for p in paths]
    try:
        return _classify(path, files, index, layout)
    except BaseException:
        for f in files:
            f.close()
        raise


def _classify(path, files, index, layout):
    from . import diffusers_keys as dk
    from .flux_layout import TRANSFORMER_PREFIXES
    from .text_encoders import T5_MARK
    entries, scales = _scan_safetensors(path, files)
    if index is not None:
        listed = set(_index_shards(index))
        missing = sorted(listed - {k for f in files for k in f.header})
        if missing:
            raise ModelFileError(index, f"lists {len(missing)} tensor(s) its shards do not hold, e.g. {missing[:3]}",
                                 REDOWNLOAD)
    if not entries:
        raise ModelFileError(path, "holds no tensors", REDOWNLOAD)
    names = list(entries)
    shapes = {k: v[2] for k, v in entries.items()}
    fp8 = sum(v[1].startswith("F8") for v in entries.values())
    notes = [f"{fp8} fp8 tensors dequantized first (the output carries their rounding too)"] if fp8 else []

    if dk.is_diffusers_flux(names):
        layout_tables = dk.diffusers_layout(names)
        recipes, unused = dk.bfl_recipes(names, layout_tables)
        if unused:
            raise ModelFileError(path, f"is a diffusers {layout_tables.family} transformer with {len(unused)} "
                                 f"tensor(s) this converter cannot map to BFL names, e.g. {unused[:3]}",
                                 "is it a plain FLUX.1 / FLUX.2 transformer (not a ControlNet or an adapter)? If so, "
                                 "convert from BFL's single-file release instead (" + WHAT_IT_TAKES + ")")
        bfl_shapes = {b: dk.recipe_shape(r, shapes) for b, r in recipes.items()}
        kind, config = _flux_config(path, bfl_shapes)
        tensors = []
        for name in _layout_order(kind, config):
            r = recipes[name]
            dt = {entries[p][1] for p in r.parts}
            tensors.append(SourceTensor(name, bfl_shapes[name], "/".join(sorted(_DT_NAMES.get(d, d) for d in dt)),
                                        tuple((entries[p][0], p) for p in r.parts), r.transform,
                                        tuple(scales.get(p) for p in r.parts)))
        return Source(path, files, kind, f"diffusers {_family(kind)} transformer, {layout}", tensors, config, notes)

    if any("distilled_guidance_layer." in k for k in names):
        _refuse(path, _describe(names))
    prefixed = [p for p in TRANSFORMER_PREFIXES if any(k.startswith(p) for k in names)]
    flux_names = {k[len(prefixed[0]):]: k for k in names if k.startswith(prefixed[0])} if prefixed else \
        {k: k for k in names}
    if any(k.startswith(("double_blocks.", "single_blocks.")) for k in flux_names):
        kind, config = _flux_config(path, {n: shapes[k] for n, k in flux_names.items()})
        if prefixed:
            notes.append(f"prefix {prefixed[0]!r} removed ({len(names) - len(flux_names)} other tensors left out)")
        return Source(path, files, kind, f"{_family(kind)} transformer (BFL names), {layout}",
                      _plain(entries, scales, flux_names), config, notes)
    if any(k.endswith(T5_MARK) for k in names):
        keyed, config = _t5_from(path, names, shapes, layout, notes)
        return Source(path, files, "t5", f"T5 encoder (HF names), {layout}", _plain(entries, scales, keyed),
                      config, notes)
    _refuse(path, _describe(names))


def _open_gguf(path):
    from .text_encoders import llamacpp_t5_name
    f = _GGUFFile(path)
    try:
        quantized = sorted({q for _, q, _, _ in f.entries.values() if q not in ("F32", "F16", "BF16")})
        if quantized:
            raise ModelFileError(path, f"is a GGUF already quantized ({', '.join(quantized)})",
                                 "requantizing adds a second rounding: " + FLOAT_FIX)
        dtypes = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
        names = list(f.entries)
        if f.arch in ("t5", "t5encoder"):
            gated = any(".ffn_gate." in k for k in names)
            keyed = {}
            for k in names:
                try:
                    hf = llamacpp_t5_name(k, gated)
                except KeyError:
                    raise ModelFileError(path, f"unknown llama.cpp T5 tensor {k!r}", WHAT_IT_TAKES) from None
                if hf is not None:
                    keyed[hf] = k
            shapes = {k: e[2] for k, e in f.entries.items()}
            keyed2, config = _t5_from(path, list(keyed), {hf: shapes[k] for hf, k in keyed.items()}, "GGUF", [])
            tensors = [SourceTensor(hf, f.entries[keyed[hf]][2], dtypes[f.entries[keyed[hf]][1]],
                                    ((0, keyed[hf]),)) for hf in keyed2]
            return Source(path, [f], "t5", "T5 encoder, unquantized GGUF", tensors, config)
        if f.arch not in (None, "flux"):
            _refuse(path, f"a GGUF of architecture {f.arch!r}")
        shapes = {k: e[2] for k, e in f.entries.items()}
        if not any(k.startswith(("double_blocks.", "single_blocks.")) for k in names):
            _refuse(path, _describe(names))
        kind, config = _flux_config(path, shapes)
        tensors = [SourceTensor(k, e[2], dtypes[e[1]], ((0, k),)) for k, e in f.entries.items()]
        return Source(path, [f], kind, f"{_family(kind)} transformer, unquantized GGUF", tensors, config)
    except BaseException:
        f.close()
        raise
