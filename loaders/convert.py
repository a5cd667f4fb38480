"""The converter: a FLUX.1 / FLUX.2 transformer or T5 encoder -> GGUF (Q8_0 ... Q2_K, legacy quants, BF16/F16), ComfyUI
comfy_quant scaled fp8 or bitsandbytes NF4, one tensor at a time.

Streaming: the GGUF header (every tensor's name, shape, type and offset) is written first from the shapes and the
type mix (convert_mix), then each tensor is read, quantized in row chunks and written through GGUFWriter's
tensor-info / write_tensor_data path; the safetensors output goes through stream_safetensors. Peak memory is a few
times the largest tensor whatever the model's size. The output is written to a temporary name in OUT's folder and
renamed onto OUT only once it is complete and verified, so an interrupted or failed run leaves nothing at OUT.

Verification (on by default) reads the written file back (gguf-py's GGUFReader and `gguf.quants.dequantize` for
GGUF; the safetensors library and this pack's fp8 / NF4 dequantizers for safetensors) and reports each tensor's
relative L2 error against the source. A `.sha256` sidecar is written next to OUT.
"""
from __future__ import annotations

import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field

import torch

from .convert_mix import TARGETS, T5_TYPES, Target, flux_tensor_type, t5_tensor_type, target as parse_target
from .convert_source import FLUX_KINDS, Source, SourceTensor, open_source, tensor_bytes
from .errors import ModelFileError, printable

PARTIAL = ".partial"
CHUNK_VALUES = 1 << 22  # quantize / dequantize at most this many values at a time (rows are independent)
T5_CONTEXT = 512  # T5-XXL's n_positions, which llama.cpp's converter writes as context_length
FAIL_REL_ERROR = 0.75  # a tensor this far off is a broken conversion, not quantization noise


class ConvertError(ValueError):
    """A conversion the user asked for that cannot be done as asked (type, output path, overwrite, disk space)."""


@dataclass
class PlanItem:
    src: SourceTensor
    name: str  # tensor name in the output (GGUF) / the weight's key (safetensors)
    out_type: str  # GGUF type name | "fp8_e4m3fn_scaled" | "nf4" | "keep"
    rule: str
    nbytes: int  # bytes in the output (exact for GGUF)


@dataclass
class Report:
    src: str
    dst: str
    target: str
    kind: str
    layout: str
    config: object
    items: list
    src_bytes: int
    out_bytes: int = 0
    convert_s: float = 0.0
    verify_s: float = 0.0
    errors: dict = field(default_factory=dict)  # name -> rel L2
    overall_error: float | None = None
    sidecar: str | None = None
    notes: list = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(i.src.numel for i in self.items)

    def type_counts(self) -> dict:
        counts = {}
        for i in self.items:
            counts[i.out_type] = counts.get(i.out_type, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    def worst(self, n=5):
        return sorted(self.errors.items(), key=lambda kv: -kv[1])[:n]

    def summary(self) -> str:
        mb = 2 ** 20
        types = ", ".join(f"{'as stored' if t == 'keep' else t} x{n}" for t, n in self.type_counts().items())
        lines = [
            f"{os.path.basename(self.src)} -> {os.path.basename(self.dst)} ({self.target})",
            f"source: {self.layout}, {self.kind_words()}",
            f"tensors: {len(self.items)} ({types})",
            f"size: {self.src_bytes / mb:,.1f} MB -> {self.out_bytes / mb:,.1f} MB "
            f"({self.out_bytes / max(self.src_bytes, 1):.2f}x)",
            f"converted in {self.convert_s:.1f} s ({self.params / 1e6 / max(self.convert_s, 1e-9):,.1f} Mparam/s, "
            f"{self.src_bytes / mb / max(self.convert_s, 1e-9):,.1f} MB/s)",
        ]
        if self.overall_error is not None:
            lines.append(f"verified in {self.verify_s:.1f} s: relative L2 error {self.overall_error:.3e} overall; "
                         "worst: " + ", ".join(f"{k} {v:.2e}" for k, v in self.worst()))
        else:
            lines.append("not verified (--no-verify)")
        if self.sidecar:
            lines.append(f"checksum: {os.path.basename(self.sidecar)}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def kind_words(self) -> str:
        c = self.config
        if self.kind in FLUX_KINDS:
            if self.kind == "flux2":
                from .flux2_layout import flux2_variant
                name = f"FLUX.2 {flux2_variant(c)}"
            else:
                name = "FLUX.1"
            return (f"{name} transformer, {c.num_params / 1e9:.2f} B params, hidden {c.hidden_size}, "
                    f"{c.depth} double + {c.depth_single_blocks} single blocks")
        return f"T5 encoder, d_model {c['d_model']}, {c['num_layers']} layers"


# ---- planning ----------------------------------------------------------------------------------------------------

def _gguf_nbytes(qtype: str, shape) -> int:
    import gguf
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    return math.prod(shape) // block * size


def _keep_dtype(st: SourceTensor) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "float64": torch.float64}.get(st.dtype,
                                                                                               torch.bfloat16)


def _safetensors_nbytes(out_type, st: SourceTensor) -> int:
    n = st.numel
    if out_type == "fp8_e4m3fn_scaled":
        return n + 4
    if out_type == "nf4":
        return (n + 1) // 2 + -(-n // 64) + 4 * -(-n // (64 * 256)) + 4 * (16 + 256)
    return n * torch.empty(0, dtype=_keep_dtype(st)).element_size()


def llamacpp_t5_names(n_layers):
    """HF T5 name -> llama.cpp name, by gguf-py's own tensor map (as llama.cpp's converter names them)."""
    import gguf
    m = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, n_layers)
    return lambda hf: m.get_name(hf, try_suffixes=(".weight", ".bias"))


def plan(source: Source, t: Target) -> list:
    """One PlanItem per output tensor, in output order: its name, type, the mix rule and its size."""
    from .text_encoders import is_linear_weight
    items = []
    if source.kind == "t5":
        if t.name not in T5_TYPES:
            raise ConvertError(f"{t.name} is not offered for T5 encoders (no ComfyUI loader reads an NF4 T5); "
                               f"choose one of: {', '.join(T5_TYPES)}")
        n_layers = source.config["num_layers"]
        to_llamacpp = llamacpp_t5_names(n_layers)
    for st in source.tensors:
        if source.kind in FLUX_KINDS:  # FLUX.1 and FLUX.2: one table (convert_mix)
            name = st.name
            out_type, rule = flux_tensor_type(name, st.shape, t)
        else:
            name = st.name
            if t.container == "gguf":
                name = to_llamacpp(st.name)
                if name is None:
                    raise ModelFileError(source.path, f"T5 tensor {st.name!r} has no llama.cpp name",
                                         "is this a T5 v1.1 encoder?")
            out_type, rule = t5_tensor_type(name, st.shape, t, n_layers, is_linear_weight(st.name))
        if t.container == "gguf" and len(st.shape) > 4:
            raise ModelFileError(source.path, f"tensor {st.name!r} has {len(st.shape)} dims, GGUF holds at most 4")
        nbytes = _gguf_nbytes(out_type, st.shape) if t.container == "gguf" else _safetensors_nbytes(out_type, st)
        items.append(PlanItem(st, name, out_type, rule, nbytes))
    return items


def _check_quantizable(items):
    """Every quantized type the plan uses can be made by this install (a clear error beats one mid-way)."""
    from ..optimizations import quantize
    for qtype in sorted({i.out_type for i in items} - {"F32", "F16", "keep"}):
        try:
            quantize(torch.zeros(1, 256), qtype)
        except Exception as e:  # UnsupportedQuantType, ImportError
            raise ConvertError(f"this install cannot quantize to {qtype} ({e})") from None


# ---- output path -------------------------------------------------------------------------------------------------

def default_output_name(src, to) -> str:
    """`<model>-<TYPE>.gguf` / `.safetensors` for a source file or diffusers folder / index."""
    t = parse_target(to)
    src = os.path.abspath(os.fspath(src))
    if src.endswith(".json") or os.path.isdir(src):
        folder = src if os.path.isdir(src) else os.path.dirname(src)
        if os.path.basename(folder) == "transformer":
            folder = os.path.dirname(folder)
        stem = os.path.basename(folder)
    else:
        stem = os.path.splitext(os.path.basename(src))[0]
    return f"{stem}-{t.name}{t.suffix}"


def check_output(src, dst, t: Target, force: bool):
    dst = os.path.abspath(os.fspath(dst))
    ext = os.path.splitext(dst)[1].lower()
    allowed = (".gguf",) if t.container == "gguf" else (".safetensors", ".sft")
    if ext not in allowed:
        raise ConvertError(f"{printable(dst)}: {t.name} is written as {t.container}; give an output ending in "
                           f"{' or '.join(allowed)}")
    folder = os.path.dirname(dst)
    if not os.path.isdir(folder):
        raise ConvertError(f"{printable(dst)}: the folder {printable(folder)} does not exist (create it first)")
    if not os.access(folder, os.W_OK):
        raise ConvertError(f"{printable(dst)}: the folder {printable(folder)} is not writable")
    if os.path.isdir(dst):
        raise ConvertError(f"{printable(dst)} is a folder; give the output file's name")
    if os.path.exists(dst):
        if os.path.exists(src) and os.path.samefile(src, dst):
            raise ConvertError(f"{printable(dst)} is the input file; give another output name")
        if not force:
            raise ConvertError(f"{printable(dst)} exists; pass --force (the node: overwrite) to replace it")
    return dst


def _commit(tmp, dst, force):
    """Move the finished temp file onto dst: atomically replacing it with force, else never over a file that
    appeared meanwhile (os.link fails on an existing name)."""
    if force:
        os.replace(tmp, dst)
        return
    try:
        os.link(tmp, dst)
    except FileExistsError:
        raise ConvertError(f"{printable(dst)} appeared while converting; pass --force to replace it") from None
    except OSError:  # a file system without hard links
        if os.path.exists(dst):
            raise ConvertError(f"{printable(dst)} appeared while converting; pass --force to replace it") from None
        os.replace(tmp, dst)
        return
    os.remove(tmp)


# ---- tensor encoders ---------------------------------------------------------------------------------------------

def _row_chunks(rows, cols):
    step = max(1, CHUNK_VALUES // max(cols, 1))
    for i in range(0, rows, step):
        yield i, min(rows, i + step)


def encode_gguf(t: torch.Tensor, qtype: str):
    """The bytes (numpy) of `t` stored as `qtype`, quantized a few rows at a time through optimizations.quantize."""
    import numpy as np

    from ..optimizations import quantize
    if qtype == "F32":
        return t.to(torch.float32).contiguous().numpy()
    if qtype == "F16":
        return t.to(torch.float16).contiguous().numpy()
    x = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, -1)
    rows, cols = x.shape
    row_bytes = _gguf_nbytes(qtype, (cols,))
    out = np.empty((rows, row_bytes), dtype=np.uint8)
    for i, j in _row_chunks(rows, cols):
        q = quantize(x[i:j].to(torch.float32), qtype)
        out[i:j] = q.raw.contiguous().view(torch.uint8).reshape(j - i, row_bytes).numpy()
    return out


def _encode_safetensors(t: torch.Tensor, item: PlanItem):
    """[(key, tensor)] the item writes: comfy_quant fp8 (weight + per-tensor weight_scale), bnb NF4, or as stored."""
    from ..optimizations import quantize
    from ..optimizations.quant import nf4, nf4_weight_from_parts
    if item.out_type == "keep":
        return [(item.name, t.to(_keep_dtype(item.src)))]
    layer = item.name[: -len(".weight")]
    if item.out_type == "fp8_e4m3fn_scaled":
        q = quantize(t, "fp8_e4m3fn_scaled")
        return [(item.name, q.raw), (layer + ".weight_scale", q.aux["scale"].to(torch.float32).reshape(()))]
    if item.out_type == "nf4":
        q = quantize(t.to(_keep_dtype(item.src)), "nf4")
        return list(nf4.to_bnb_state_dict(nf4_weight_from_parts(q.qweight), layer + ".").items())
    raise AssertionError(item.out_type)


# ---- writers -----------------------------------------------------------------------------------------------------

class _Progress:
    def __init__(self, callback, total, phase):
        self.callback, self.total, self.phase = callback, total, phase
        self.done = self.bytes = 0

    def step(self, nbytes):
        self.done += 1
        self.bytes += nbytes
        if self.callback:
            self.callback(self.done, self.total, self.bytes, self.phase)


def gguf_arch(kind) -> str:
    """general.architecture: "flux" for FLUX.1 and FLUX.2 alike (city96's convert.py: its ModelFlux matches both, and
    ComfyUI-GGUF / ComfyUI tell them apart by the tensor names), "t5encoder" for T5."""
    return "flux" if kind in FLUX_KINDS else "t5encoder"


def _write_gguf(tmp, source, items, t: Target, progress):
    import gguf
    arch = gguf_arch(source.kind)
    w = gguf.GGUFWriter(tmp, arch=arch)
    try:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_file_type(int(gguf.LlamaFileType[t.file_type]))
        if source.kind == "t5":
            c = source.config
            w.add_context_length(T5_CONTEXT)
            w.add_embedding_length(c["d_model"])
            w.add_feed_forward_length(c["d_ff"])
            w.add_block_count(c["num_layers"])
            w.add_head_count(c["num_heads"])
            w.add_key_length(c["d_kv"])
            w.add_value_length(c["d_kv"])
            w.add_layer_norm_rms_eps(1e-6)
            w.add_relative_attn_buckets_count(c["relative_attention_num_buckets"])
        for it in items:  # logical shapes, numpy order; the dtype argument is ignored when raw_dtype is given
            w.add_tensor_info(it.name, it.src.shape, torch.empty(0).numpy().dtype, it.nbytes,
                              raw_dtype=gguf.GGMLQuantizationType[it.out_type])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        p = _Progress(progress, len(items), "convert")
        for it in items:
            data = encode_gguf(source.read(it.src), it.out_type)
            if data.nbytes != it.nbytes:
                raise AssertionError(f"{it.name}: {data.nbytes} bytes encoded, {it.nbytes} planned")
            w.write_tensor_data(data)
            del data
            p.step(tensor_bytes(it.src))
        w.flush()
    finally:
        w.close()


def _write_safetensors(tmp, source, items, t: Target, progress):
    import json

    from .stream_safetensors import StreamingSafetensorsWriter, header_bound
    names = []
    for it in items:
        layer = it.name[: -len(".weight")]
        if it.out_type == "fp8_e4m3fn_scaled":
            names += [it.name, layer + ".weight_scale"]
        elif it.out_type == "nf4":
            names += [it.name + s for s in ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                                            ".quant_state.bitsandbytes__nf4")]
        else:
            names.append(it.name)
    metadata = {}
    layers = {it.name[: -len(".weight")]: {"format": "float8_e4m3fn"} for it in items
              if it.out_type == "fp8_e4m3fn_scaled"}
    if layers:  # ComfyUI's comfy_quant layout, which core (>= 0.4) loads natively
        metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
    w = StreamingSafetensorsWriter(tmp, header_bound(names, metadata))
    try:
        p = _Progress(progress, len(items), "convert")
        for it in items:
            for key, tensor in _encode_safetensors(source.read(it.src), it):
                w.write(key, tensor)
            p.step(tensor_bytes(it.src))
        w.close(metadata)
    finally:
        w.abort()


# ---- verification ------------------------------------------------------------------------------------------------

def _rel_parts(got: torch.Tensor, ref: torch.Tensor):
    """(squared L2 error, squared L2 norm of ref, whether the error is finite), a few rows at a time in float32
    (no full-size float copies), summed in double."""
    cols = int(ref.shape[-1]) if ref.dim() else 1
    g, r = got.reshape(-1, cols), ref.reshape(-1, cols)
    err2 = ref2 = 0.0
    for i, j in _row_chunks(r.shape[0], cols):
        rc = r[i:j].to(torch.float32).reshape(-1)
        d = g[i:j].to(torch.float32).reshape(-1) - rc
        err2 += float(torch.dot(d, d))
        ref2 += float(torch.dot(rc, rc))
    return err2, ref2, math.isfinite(err2)


def _gguf_values(raw, qtype, shape):
    """Values of a GGUF tensor (its stored bytes, uint8) as gguf-py dequantizes them, a few rows at a time."""
    import gguf
    import numpy as np
    cols = int(shape[-1])
    rows = raw.reshape(-1, _gguf_nbytes(qtype.name, (cols,)))
    out = torch.empty((rows.shape[0], cols), dtype=torch.float32)
    for i, j in _row_chunks(rows.shape[0], cols):
        out[i:j] = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(rows[i:j], qtype),
                                                         dtype=np.float32).reshape(j - i, cols))
    return out.reshape(shape)


def _verify_gguf(tmp, source, items, t, report, progress):
    import gguf

    from .convert_source import _GGUFFile
    f = _GGUFFile(tmp)  # through the pack's bounded header validation, then gguf-py's GGUFReader
    try:
        arch = f.field("general.architecture")
        want = gguf_arch(source.kind)
        ftype = f.field("general.file_type")
        qver = f.field("general.quantization_version")
        if arch != want or ftype is None or int(ftype) != int(gguf.LlamaFileType[t.file_type]) or qver is None:
            raise ModelFileError(tmp, f"metadata read back wrong (architecture {arch!r}, file_type {ftype}, "
                                 f"quantization_version {qver})")
        if list(f.entries) != [it.name for it in items]:
            raise ModelFileError(tmp, "tensor names read back differ from the plan")
        yield from _compare(items, source, lambda it: _gguf_read_back(f, it), progress, tmp)
    finally:
        f.close()


def _gguf_read_back(f, it):
    raw, qtype = f.raw(it.name)
    if qtype.name != it.out_type:
        raise ModelFileError(f.path, f"tensor {it.name!r} read back as {qtype.name}, planned {it.out_type}")
    return _gguf_values(raw, qtype, it.src.shape)


def _verify_safetensors(tmp, source, items, t, report, progress):
    from ..optimizations.quant import nf4
    from ..optimizations.quant.fp8 import dequantize_fp8
    from .convert_source import _SafetensorsFile
    f = _SafetensorsFile(tmp)  # the pack's header validation, then the safetensors library
    try:
        def read_back(it):
            if it.out_type == "fp8_e4m3fn_scaled":
                layer = it.name[: -len(".weight")]
                return dequantize_fp8(f.get(it.name), f.get(layer + ".weight_scale"), torch.float32)
            if it.out_type == "nf4":
                keys = [k for k in f.header if k == it.name or k.startswith(it.name + ".")]
                q = nf4.from_bnb_state_dict({k: f.get(k) for k in keys}, it.name)
                return nf4.dequantize_nf4(q, torch.float32)
            return f.get(it.name)
        yield from _compare(items, source, read_back, progress, tmp)
    finally:
        f.close()


def _compare(items, source, read_back, progress, path):
    p = _Progress(progress, len(items), "verify")
    for it in items:
        got = read_back(it)
        if tuple(got.shape) != tuple(it.src.shape):
            raise ModelFileError(path, f"tensor {it.name!r} read back as {tuple(got.shape)}, expected {it.src.shape}")
        err2, ref2, finite = _rel_parts(got, source.read(it.src))
        yield it, err2, ref2, finite
        p.step(tensor_bytes(it.src))


def _verify(tmp, source, items, t, report, progress):
    run = _verify_gguf if t.container == "gguf" else _verify_safetensors
    total_err = total_ref = 0.0
    bad = []
    for it, err2, ref2, finite in run(tmp, source, items, t, report, progress):
        rel = math.sqrt(err2 / ref2) if ref2 > 0 else (0.0 if err2 == 0 else math.inf)
        report.errors[it.name] = rel
        total_err += err2
        total_ref += ref2
        if not finite or rel > FAIL_REL_ERROR:
            bad.append(f"{it.name} ({it.out_type}: {'non-finite values' if not finite else f'rel. error {rel:.2f}'})")
    report.overall_error = math.sqrt(total_err / total_ref) if total_ref > 0 else 0.0
    if bad:
        raise ModelFileError(source.path, f"verification failed: {len(bad)} tensor(s) do not match the source, "
                             f"e.g. {', '.join(bad[:3])}", "nothing was written; please report this")


# ---- the sidecar (loaders/integrity.py: `<file>.sha256`, which `kontext-lowvram inspect` and the loaders check) ----

def _write_sidecar(path):
    from .integrity import write_sidecar
    return write_sidecar(path)


# ---- the one entry point -----------------------------------------------------------------------------------------

def convert(src, dst, to, force=False, verify=True, progress=None, sidecar=True) -> Report:
    """Convert the model at `src` to type `to` (convert_mix.TYPES) at `dst`; the Report of what was done.

    progress(done, total, source_bytes_done, phase): phase "convert", then "verify"; it may raise to cancel
    (ComfyUI's interrupt does), which leaves nothing behind. ModelFileError for inputs the converter cannot take,
    ConvertError for an output it must not write."""
    # plain tensors whatever mode the caller runs in: ComfyUI runs nodes under inference_mode, which the
    # quantizers' worker threads do not inherit (they could not write into inference tensors)
    with torch.inference_mode(False):
        return _convert(src, dst, to, force, verify, progress, sidecar)


def _convert(src, dst, to, force, verify, progress, sidecar) -> Report:
    t = parse_target(to) if not isinstance(to, Target) else to
    src = os.fspath(src)
    dst = os.fspath(dst)
    if not os.path.exists(src):
        raise ModelFileError(src, "no such file or folder", "check the path")
    dst = check_output(src, dst, t, force)
    with open_source(src) as source:
        items = plan(source, t)
        _check_quantizable(items)
        folder = os.path.dirname(dst)
        need = sum(i.nbytes for i in items) + (64 << 20)
        free = shutil.disk_usage(folder).free
        if free < need:
            raise ConvertError(f"{printable(dst)}: the output needs about {need / 2**30:.2f} GiB, {printable(folder)} "
                               f"has {free / 2**30:.2f} GiB free")
        report = Report(src, dst, t.name, source.kind, source.layout, source.config, items, source.nbytes,
                        notes=list(source.notes))
        tmp = f"{dst}.{os.getpid()}.{uuid.uuid4().hex[:8]}{PARTIAL}"
        try:
            t0 = time.perf_counter()
            (_write_gguf if t.container == "gguf" else _write_safetensors)(tmp, source, items, t, progress)
            report.convert_s = time.perf_counter() - t0
            report.out_bytes = os.path.getsize(tmp)
            if verify:
                t0 = time.perf_counter()
                _verify(tmp, source, items, t, report, progress)
                report.verify_s = time.perf_counter() - t0
            _commit(tmp, dst, force)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    if sidecar:
        try:
            report.sidecar = _write_sidecar(dst)
        except OSError as e:
            report.notes.append(f"no checksum sidecar written ({e})")
    return report


__all__ = ["convert", "plan", "ConvertError", "Report", "PlanItem", "default_output_name", "check_output",
           "TARGETS", "encode_gguf"]
