"""Attention backends with one signature, and a per-model override object for ComfyUI.

Every backend is ``fn(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, *, scale=None)``
in ComfyUI's conventions:

- ``q``/``k``/``v`` are ``(B, L, heads * D)``, or ``(B, heads, L, D)`` with ``skip_reshape=True`` (FLUX passes
  the latter: ``optimized_attention(q, k, v, heads, skip_reshape=True, mask=...)``);
- the output is ``(B, Lq, heads * D)``, or ``(B, heads, Lq, D)`` with ``skip_output_reshape=True``;
- ``mask`` follows ``torch.nn.functional.scaled_dot_product_attention``: a boolean mask (True = attend) or an
  additive float mask, of shape ``(Lq, Lk)``, ``(B, Lq, Lk)`` or ``(B|1, heads|1, Lq|1, Lk)``;
- ``scale`` defaults to ``D ** -0.5``.

Backends: ``sdpa`` (torch), ``split`` (query-chunked attention whose score chunk never exceeds a byte budget;
plain torch, exact softmax per chunk), and the optional libraries ``flash_attn``, ``sage_attention``
(``sageattention``) and ``xformers``. The libraries are imported lazily and never required. The library backends
hand a call they cannot run (a mask, or a dtype the kernel lacks) to ``sdpa`` unchanged.

``select_backend`` probes a backend with a tiny call on the model's device / dtype / head dim; ``auto`` falls back
along ``AUTO_ORDER``. ``AttentionOverride`` is the callable ComfyUI's ``wrap_attn`` calls when it sits in
``transformer_options["optimized_attention_override"]`` of one model (no global flags, no monkeypatching).

No ComfyUI import here.
"""
from __future__ import annotations

import importlib
import logging
import math

import torch
import torch.nn.functional as F

log = logging.getLogger("kontext_lowvram.attention")

BACKENDS = ("auto", "sdpa", "flash_attn", "sage_attention", "xformers", "split")
#: what ``auto`` tries, best first; ``sdpa`` always works
AUTO_ORDER = ("sage_attention", "flash_attn", "xformers", "sdpa")
#: optional backend -> (import name, pip command)
PACKAGES = {
    "flash_attn": ("flash_attn", "pip install flash-attn --no-build-isolation"),
    "sage_attention": ("sageattention", "pip install sageattention"),
    "xformers": ("xformers", "pip install xformers"),
}
#: default byte budget of one score chunk of ``split`` (B*H*q_chunk*Lk elements in the accumulation dtype)
DEFAULT_SPLIT_BYTES = 256 * 1024 ** 2

_HALF = (torch.float16, torch.bfloat16)


class AttentionBackendUnavailable(RuntimeError):
    """An explicitly chosen backend cannot run here; the message names the package and the pip command."""


# --------------------------------------------------------------------------------------------------------------
# layout helpers
# --------------------------------------------------------------------------------------------------------------

def _bhld(t: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    """``(B, H, L, D)`` view of a q/k/v tensor."""
    if skip_reshape:
        return t
    b, n, hd = t.shape
    return t.view(b, n, heads, hd // heads).transpose(1, 2)


def _blhd(t: torch.Tensor, heads: int, skip_reshape: bool) -> torch.Tensor:
    """``(B, L, H, D)`` view of a q/k/v tensor (flash_attn / xformers layout)."""
    if skip_reshape:
        return t.transpose(1, 2)
    b, n, hd = t.shape
    return t.view(b, n, heads, hd // heads)


def _out_from_bhld(o: torch.Tensor, skip_output_reshape: bool) -> torch.Tensor:
    if skip_output_reshape:
        return o
    b, h, n, d = o.shape
    return o.transpose(1, 2).reshape(b, n, h * d)


def _out_from_blhd(o: torch.Tensor, skip_output_reshape: bool) -> torch.Tensor:
    if skip_output_reshape:
        return o.transpose(1, 2)
    b, n, h, d = o.shape
    return o.reshape(b, n, h * d)


def normalize_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """``(Lq, Lk)`` / ``(B, Lq, Lk)`` / 4-D mask -> 4-D ``(B|1, H|1, Lq|1, Lk)`` view, as ComfyUI does for SDPA."""
    if mask is None:
        return None
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    if mask.ndim != 4:
        raise ValueError(f"attention mask must have 2, 3 or 4 dims, got shape {tuple(mask.shape)}")
    return mask


# --------------------------------------------------------------------------------------------------------------
# reference and torch backends
# --------------------------------------------------------------------------------------------------------------

def attention_reference(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, *, scale=None):
    """Float64 math attention (the test reference): softmax(q k^T * scale + mask) v, output in float64."""
    q, k, v = (_bhld(t, heads, skip_reshape).double() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    m = normalize_mask(mask)
    if m is not None:
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m.double()
    return _out_from_bhld(torch.matmul(torch.softmax(s, dim=-1), v), skip_output_reshape)


def attention_sdpa(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, *, scale=None):
    """``torch.nn.functional.scaled_dot_product_attention`` (torch picks flash / efficient / cuDNN / math)."""
    q, k, v = (_bhld(t, heads, skip_reshape) for t in (q, k, v))
    m = normalize_mask(mask)
    if m is not None and m.dtype != torch.bool and m.dtype != q.dtype:
        m = m.to(q.dtype)
    extra = {} if scale is None else {"scale": scale}
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=0.0, is_causal=False, **extra)
    return _out_from_bhld(out, skip_output_reshape)


def split_accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """``split`` computes scores, softmax and P@V in float32 for half inputs (float32/float64 stay as they are)."""
    return torch.float32 if dtype in _HALF or not dtype.is_floating_point else dtype


def split_plan(batch: int, heads: int, len_q: int, len_k: int, itemsize: int,
               budget_bytes: int = DEFAULT_SPLIT_BYTES) -> tuple[int, int, int]:
    """Chunk sizes ``(batch_chunk, head_chunk, query_chunk)`` for ``split`` so that one score chunk,
    ``batch_chunk * head_chunk * query_chunk * len_k * itemsize`` bytes, stays within ``budget_bytes``.

    Query rows are chunked first (all batches and heads at once); only when a single query row over every batch
    and head exceeds the budget are batches, then heads, taken one chunk at a time. The floor is one row of one
    head (``len_k * itemsize`` bytes): a budget below that cannot be met and that single row is used.
    """
    row = max(1, len_k * itemsize)
    rows = max(1, int(budget_bytes) // row)          # (batch, head, query) rows per chunk
    bc = batch if rows >= batch * heads else 1
    hc = heads if rows >= bc * heads else rows
    qc = max(1, min(len_q, rows // (bc * hc)))
    return bc, min(hc, heads), qc


def _rows(t: torch.Tensor, dim: int, start: int, stop: int) -> slice:
    """The chunk's rows of a broadcastable mask dim (a size-1 dim is kept whole)."""
    return slice(None) if t.shape[dim] == 1 else slice(start, stop)


def attention_split(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, *, scale=None,
                    budget_bytes: int = DEFAULT_SPLIT_BYTES, stats: dict | None = None):
    """Query-chunked attention: the score matrix is built ``split_plan`` chunk by chunk, so the largest
    intermediate is one chunk of ``<= budget_bytes`` (plus a boolean copy of the mask chunk, 1 byte per score, when
    a boolean mask is given). Each query row's softmax only needs its own scores, so every chunk is exact: the
    result equals full attention up to float rounding.

    Fixed extra memory besides the chunk: the output, and for half inputs a float32 copy of k and v.
    ``stats`` (a dict), if given, receives ``plan``, ``chunks`` and ``max_score_bytes`` (the largest score chunk
    actually allocated).
    """
    q, k, v = (_bhld(t, heads, skip_reshape) for t in (q, k, v))
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    acc = split_accumulation_dtype(q.dtype)
    scale = D ** -0.5 if scale is None else scale
    bc, hc, qc = split_plan(B, H, Lq, Lk, torch.empty((), dtype=acc).element_size(), budget_bytes)
    kt = k.to(acc).transpose(-1, -2)               # (B, H, D, Lk): a view for float32 input
    va = v.to(acc)
    m = normalize_mask(mask)
    if m is not None and m.dtype != torch.bool:
        m = m.to(acc)
    # output written in place, in the layout the caller wants (no final copy)
    if skip_output_reshape:
        out = torch.empty((B, H, Lq, D), dtype=q.dtype, device=q.device)
        out_bhld = out
    else:
        out = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device)
        out_bhld = out.transpose(1, 2)
    max_bytes, chunks = 0, 0
    for b0 in range(0, B, bc):
        b1 = min(B, b0 + bc)
        for h0 in range(0, H, hc):
            h1 = min(H, h0 + hc)
            kt_c, v_c = kt[b0:b1, h0:h1], va[b0:b1, h0:h1]
            for q0 in range(0, Lq, qc):
                q1 = min(Lq, q0 + qc)
                qs = q[b0:b1, h0:h1, q0:q1].to(acc) * scale
                s = torch.matmul(qs, kt_c)         # the score chunk: (bc, hc, qc, Lk)
                del qs
                if m is not None:
                    mc = m[_rows(m, 0, b0, b1), _rows(m, 1, h0, h1), _rows(m, 2, q0, q1)]
                    if mc.dtype == torch.bool:
                        s.masked_fill_(mc.logical_not(), float("-inf"))
                    else:
                        s.add_(mc)
                # exact softmax over the full key range, in place
                s.sub_(s.amax(dim=-1, keepdim=True))
                s.exp_()
                s.div_(s.sum(dim=-1, keepdim=True))
                max_bytes = max(max_bytes, s.numel() * s.element_size())
                chunks += 1
                out_bhld[b0:b1, h0:h1, q0:q1] = torch.matmul(s, v_c)
                del s
    if stats is not None:
        stats.update(plan=(bc, hc, qc), chunks=chunks, max_score_bytes=max_bytes)
    return out if skip_output_reshape else out.view(B, Lq, H * D)


# --------------------------------------------------------------------------------------------------------------
# optional libraries
# --------------------------------------------------------------------------------------------------------------

_IMPORTS: dict[str, object] = {}


def import_backend_module(name: str):
    """Import the optional library of a backend (cached). Raises ``ImportError`` with the cause."""
    mod_name = PACKAGES[name][0]
    if mod_name not in _IMPORTS:
        try:
            if name == "xformers":
                _IMPORTS[mod_name] = importlib.import_module("xformers.ops")
            else:
                _IMPORTS[mod_name] = importlib.import_module(mod_name)
        except Exception as e:  # a broken build raises OSError / RuntimeError, not only ImportError
            _IMPORTS[mod_name] = e
    mod = _IMPORTS[mod_name]
    if isinstance(mod, Exception):
        raise ImportError(f"{type(mod).__name__}: {mod}") from mod
    return mod


def library_unsupported(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """Why the library kernel of ``name`` cannot take this device / dtype / head dim (None if it can)."""
    device = torch.device(device)
    if name == "flash_attn":
        if device.type != "cuda":
            return f"flash_attn runs on CUDA only (device is {device})"
        if dtype not in _HALF:
            return f"flash_attn needs float16/bfloat16 (model computes in {dtype})"
        if head_dim % 8 or head_dim > 256:
            return f"flash_attn needs a head dim that is a multiple of 8 and <= 256 (got {head_dim})"
    elif name == "sage_attention":
        if device.type != "cuda":
            return f"sageattention runs on CUDA only (device is {device})"
        if dtype not in _HALF:
            return f"sageattention needs float16/bfloat16 (model computes in {dtype})"
        if head_dim not in (64, 96, 128):
            return f"sageattention supports head dims 64, 96 and 128 (got {head_dim})"
    elif name == "xformers":
        if device.type != "cuda":
            return f"xformers memory-efficient attention runs on CUDA only (device is {device})"
    return None


def _library_fallback(name, q, mask, heads, skip_reshape) -> bool:
    head_dim = q.shape[-1] if skip_reshape else q.shape[-1] // heads
    return mask is not None or library_unsupported(name, q.device, q.dtype, head_dim) is not None


def attention_flash(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, *, scale=None):
    """flash-attn 2 ``flash_attn_func`` (CUDA, fp16/bf16, no mask); other calls go to ``attention_sdpa``."""
    if _library_fallback("flash_attn", q, mask, heads, skip_reshape):
        return attention_sdpa(q, k, v, heads, mask, skip_reshape, skip_output_reshape, scale=scale)
    fa = import_backend_module("flash_attn")
    q, k, v = (_blhd(t, heads, skip_reshape) for t in (q, k, v))
    out = fa.flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=scale, causal=False)
    return _out_from_blhd(out, skip_output_reshape)


def attention_sage(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, *, scale=None):
    """SageAttention ``sageattn`` (int8 QK^T, CUDA, fp16/bf16, no mask); other calls go to ``attention_sdpa``."""
    if _library_fallback("sage_attention", q, mask, heads, skip_reshape):
        return attention_sdpa(q, k, v, heads, mask, skip_reshape, skip_output_reshape, scale=scale)
    sa = import_backend_module("sage_attention")
    q, k, v = (_bhld(t, heads, skip_reshape) for t in (q, k, v))
    extra = {} if scale is None else {"sm_scale": scale}
    out = sa.sageattn(q, k, v, tensor_layout="HND", is_causal=False, **extra)
    return _out_from_bhld(out, skip_output_reshape)


def attention_xformers(q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, *, scale=None):
    """xformers ``memory_efficient_attention`` (CUDA, no mask); other calls go to ``attention_sdpa``."""
    if _library_fallback("xformers", q, mask, heads, skip_reshape):
        return attention_sdpa(q, k, v, heads, mask, skip_reshape, skip_output_reshape, scale=scale)
    xops = import_backend_module("xformers")
    q, k, v = (_blhd(t, heads, skip_reshape).contiguous() for t in (q, k, v))
    out = xops.memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=scale)
    return _out_from_blhd(out, skip_output_reshape)


FUNCTIONS = {
    "sdpa": attention_sdpa,
    "split": attention_split,
    "flash_attn": attention_flash,
    "sage_attention": attention_sage,
    "xformers": attention_xformers,
}

#: max |backend - float64 reference| accepted by the selection probe (outputs of randn q/k/v are O(0.1..1))
PROBE_TOL = {"sage_attention": 0.1, "flash_attn": 2e-2, "xformers": 2e-2, "sdpa": 2e-2, "split": 2e-2}


# --------------------------------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------------------------------

def _unavailable(name: str, reason: str) -> AttentionBackendUnavailable:
    if name in PACKAGES:
        pkg, pip = PACKAGES[name]
        hint = (f"The '{name}' backend needs the '{pkg}' package working on this device. Install it into ComfyUI's "
                f"Python environment with: {pip} — or pick 'auto' (falls back to what works) or 'sdpa'.")
    else:
        hint = "Pick 'auto' or another backend."
    return AttentionBackendUnavailable(f"Attention backend '{name}' is not usable here: {reason}. {hint}")


def probe(name: str, device, dtype: torch.dtype, head_dim: int = 128, heads: int = 2, length: int = 64) -> None:
    """Check that backend ``name`` imports and gives correct results on ``device`` / ``dtype`` / ``head_dim``
    with one tiny call. Raises ``AttentionBackendUnavailable`` (with the pip command) if not."""
    if name not in FUNCTIONS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if name in PACKAGES:
        try:
            import_backend_module(name)
        except ImportError as e:
            raise _unavailable(name, f"'{PACKAGES[name][0]}' is not installed or does not import ({e})") from None
        why = library_unsupported(name, device, dtype, head_dim)
        if why:
            raise _unavailable(name, why)
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(1, heads, length, head_dim, generator=g).to(device=device, dtype=dtype)
                   for _ in range(3))
        out = FUNCTIONS[name](q, k, v, heads, skip_reshape=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ref = attention_reference(q, k, v, heads, skip_reshape=True)
        got = out.detach().to("cpu", torch.float64)
        expected_shape = (1, length, heads * head_dim)
        if tuple(got.shape) != expected_shape:
            raise RuntimeError(f"output shape {tuple(got.shape)}, expected {expected_shape}")
        err = (got - ref.cpu()).abs().max().item()
    except AttentionBackendUnavailable:
        raise
    except Exception as e:
        raise _unavailable(name, f"a test call on {device} / {dtype} / head dim {head_dim} failed "
                                 f"({type(e).__name__}: {e})") from None
    if not math.isfinite(err) or err > PROBE_TOL[name]:
        raise _unavailable(name, f"a test call on {device} / {dtype} / head dim {head_dim} was wrong "
                                 f"(max error {err:.3g} > {PROBE_TOL[name]})")


def select_backend(name: str, device, dtype: torch.dtype, head_dim: int = 128) -> tuple[str, list[str]]:
    """Resolve ``name`` to a backend that works here: ``(backend, notes)``; ``notes`` say why ``auto`` skipped
    the ones before it. An explicit backend that fails its probe raises ``AttentionBackendUnavailable``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name != "auto":
        probe(name, device, dtype, head_dim)
        return name, []
    notes = []
    for cand in AUTO_ORDER:
        try:
            probe(cand, device, dtype, head_dim)
        except AttentionBackendUnavailable as e:
            notes.append(f"{cand}: {e}")
            continue
        log.info("Kontext LowVRAM attention: auto picked '%s' for %s / %s / head dim %d%s", cand,
                 torch.device(device), dtype, head_dim,
                 "" if not notes else " (skipped: " + "; ".join(n.split(". ")[0] for n in notes) + ")")
        return cand, notes
    raise AttentionBackendUnavailable("no attention backend works here: " + " | ".join(notes))  # sdpa failed too


# --------------------------------------------------------------------------------------------------------------
# the per-model override ComfyUI calls
# --------------------------------------------------------------------------------------------------------------

#: positional parameters of ComfyUI's attention functions (``attention_pytorch(q, k, v, heads, mask=None,
#: attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kwargs)``)
_POSITIONAL = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")
#: keyword arguments the backends honour or may safely ignore
_IGNORED = {"transformer_options", "_inside_attn_wrapper", "attn_precision", "low_precision_attention"}


class AttentionOverride:
    """The callable put at ``transformer_options["optimized_attention_override"]`` of one cloned model.

    ComfyUI's ``wrap_attn`` (``comfy/ldm/modules/attention.py``, v0.3.64 and v0.29) calls it as
    ``override(original_fn, *args, **kwargs)``. A call this pack's backends cannot represent (an unknown option
    such as ``enable_gqa=True``, or k/v with a different head count) goes to ``original_fn`` unchanged.

    Shared by the model's clones (``__deepcopy__`` returns itself): the backend and split budget are fixed when it is
    made; it counts the calls it ran (``calls``) and those it handed to ``original_fn`` (``delegated``), and logs the
    first call it runs.
    """

    def __init__(self, backend: str, split_budget_bytes: int = DEFAULT_SPLIT_BYTES):
        if backend not in FUNCTIONS:
            raise ValueError(f"unknown attention backend {backend!r}")
        self.backend = backend
        self.split_budget_bytes = int(split_budget_bytes)
        self._announced = False
        self.calls = 0
        self.delegated = 0

    def __deepcopy__(self, memo):
        return self

    def __repr__(self):
        extra = f", split_budget={self.split_budget_bytes / 2 ** 20:.0f} MiB" if self.backend == "split" else ""
        return f"AttentionOverride({self.backend!r}{extra})"

    def _bind(self, args, kwargs):
        if len(args) > len(_POSITIONAL):
            return None
        call = dict(zip(_POSITIONAL, args))
        for key, val in kwargs.items():
            if key in call:
                return None
            call[key] = val
        if not all(n in call for n in ("q", "k", "v", "heads")):
            return None
        scale = call.pop("scale", None)
        for key, val in call.items():
            if key in _POSITIONAL or key in _IGNORED:
                continue
            if val is None or val is False:  # an option left at its default
                continue
            return None
        q, k = call["q"], call["k"]
        if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)) or q.ndim != k.ndim:
            return None
        if call.get("skip_reshape") and q.ndim == 4 and (q.shape[1] != k.shape[1] or k.shape != call["v"].shape):
            return None  # grouped-query k/v
        return dict(q=q, k=k, v=call["v"], heads=call["heads"], mask=call.get("mask"),
                    skip_reshape=bool(call.get("skip_reshape", False)),
                    skip_output_reshape=bool(call.get("skip_output_reshape", False)), scale=scale,
                    low_precision=call.get("low_precision_attention", True))

    def __call__(self, original, *args, **kwargs):
        call = self._bind(args, kwargs)
        if call is None:
            self.delegated += 1
            return original(*args, **kwargs)
        self.calls += 1
        backend = self.backend
        if backend == "sage_attention" and call.pop("low_precision") is False:
            backend = "sdpa"  # the caller asked for full-precision attention
        call.pop("low_precision", None)
        if not self._announced:
            self._announced = True
            q = call["q"]
            log.info("Kontext LowVRAM attention: '%s' active on this model (first call: q %s %s on %s)",
                     self.backend, tuple(q.shape), q.dtype, q.device)
        if backend == "split":
            return attention_split(**call, budget_bytes=self.split_budget_bytes)
        return FUNCTIONS[backend](**call)


__all__ = [
    "AUTO_ORDER", "BACKENDS", "DEFAULT_SPLIT_BYTES", "FUNCTIONS", "PACKAGES", "AttentionBackendUnavailable",
    "AttentionOverride", "attention_flash", "attention_reference", "attention_sage", "attention_sdpa",
    "attention_split", "attention_xformers", "import_backend_module", "library_unsupported", "normalize_mask",
    "probe", "select_backend", "split_accumulation_dtype", "split_plan",
]
