"""Which files and settings fit a card: `kontext-lowvram plan` and the tier workflows ask this one function.

Plain Python over memory_model's numbers. The rule: the best diffusion-model format (FORMATS is ordered by weight
error) down to Q4_K_M whose denoise peak, weights resident, fits the usable VRAM; if none does, the weights stream
from RAM (ComfyUI v0.29's dynamic VRAM, `--lowvram` before it) as Q4_K_M, the fewest bytes per step that still
look like the model, or smaller formats where even that does not fit. Text encoders run on the GPU and leave it when their peak fits next to
nothing else (the diffusion model is not loaded yet), else on the CPU; the cache makes a repeated prompt free.
"""
import math
from dataclasses import dataclass, field

from . import memory_model as mm

MODELS = mm.MODEL_KEYS  # FLUX.1 Kontext [dev] (measured), FLUX.2 [dev] / [klein] 4B / 9B (estimates: memory_model)
DESKTOP_RESERVE_GIB = 0.7  # what a display, a browser and the compositor hold on the card (estimate)
DRIVER_RESERVE_GIB = 0.3  # the driver's own share on a headless card (estimate)
STREAMING_FORMAT = "Q4_K_M"  # streamed weights cross PCIe every step: fewest bytes that keep the edit faithful


@dataclass(frozen=True)
class Request:
    vram_gib: float
    ram_gib: float | None = None  # None: not checked
    width: int = 1024
    height: int = 1024
    references: int = 1
    steps: int = 20
    model: str = "kontext"
    desktop: bool = True  # the card also drives a display

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; known: {', '.join(MODELS)}")
        if self.vram_gib <= 0 or (self.ram_gib is not None and self.ram_gib <= 0):
            raise ValueError("VRAM and RAM must be positive numbers of GB")
        if self.width < 64 or self.height < 64 or self.references < 0 or self.steps < 1:
            raise ValueError("resolution must be at least 64x64, references >= 0 and steps >= 1")


@dataclass(frozen=True)
class Phase:
    name: str
    vram_gib: float
    ram_gib: float
    note: str = ""


@dataclass
class Plan:
    request: Request
    fits: bool
    model_format: mm.ModelFormat | None
    weights: str  # "resident" | "streamed"
    text_encoder: mm.TextEncoderFormat
    text_encoder_device: str  # LowVRAMTextEncoderLoader's device policy
    attention: str
    vae_budget_mb: int  # LowVRAMTiledVAEDecode's vram_budget_mb (0: as much as is free)
    phases: list = field(default_factory=list)
    launch_options: list = field(default_factory=list)  # (option, why)
    assumptions: list = field(default_factory=list)
    problems: list = field(default_factory=list)


def usable_vram(req: Request) -> float:
    return req.vram_gib - (DESKTOP_RESERVE_GIB if req.desktop else DRIVER_RESERVE_GIB)


def _pick_model(usable: float, n_tokens: int, ram_room: float | None, spec: mm.ModelSpec = None):
    """Resident down to STREAMING_FORMAT; below it a streamed STREAMING_FORMAT beats a resident smaller one (a
    10 GB card would otherwise get a worse model than an 8 GB one). Then streamed, smaller formats. Either way the
    file must fit `ram_room` (RAM besides ComfyUI and the smallest text encoders), where that is known."""
    spec = spec or mm.model_spec()
    formats, cfg = spec.formats, spec.cfg
    floor = [f.name for f in formats].index(STREAMING_FORMAT)
    in_ram = [f for f in formats if ram_room is None or mm.weight_gib(f, cfg=cfg) <= ram_room]
    for fmt in in_ram:
        if formats.index(fmt) <= floor and mm.denoise_gib(fmt, n_tokens, cfg) <= usable:
            return fmt, "resident"
    for fmt in in_ram:
        if formats.index(fmt) >= floor and mm.streaming_denoise_gib(fmt, n_tokens, cfg) <= usable:
            return fmt, "streamed"
    return None, "streamed"


def _pick_text_encoder(usable: float, ram_room: float | None, spec: mm.ModelSpec = None):
    """fp8 T5 first (fp16 buys nothing FLUX can see), smaller GGUF ones where VRAM or RAM is short; on the GPU
    when its encode peak fits the card, else on the CPU. FLUX.2: its encoder's files, best first."""
    spec = spec or mm.model_spec()
    candidates = spec.text_encoders
    fitting = [e for e in candidates if ram_room is None or e.t5_gib + spec.extra_encoder_gib <= ram_room] \
        or candidates[-1:]
    for enc in fitting:
        if mm.text_encode_gib(enc, spec.extra_encoder_gib) <= usable:
            return enc, "gpu_then_release"
    return fitting[-1], "cpu"


def plan(req: Request) -> Plan:
    spec = mm.model_spec(req.model)
    cfg = spec.cfg
    usable = usable_vram(req)
    n_tokens = mm.tokens(req.width, req.height, req.references)
    base = mm.PROCESS_RAM_GIB
    smallest_encoders = spec.text_encoders[-1].t5_gib + spec.extra_encoder_gib
    ram_room = None if req.ram_gib is None else req.ram_gib - base - smallest_encoders
    fmt, weights = _pick_model(usable, n_tokens, ram_room, spec)
    model_gib = mm.weight_gib(fmt, cfg=cfg) if fmt else mm.weight_gib(_smallest_format(spec), cfg=cfg)
    enc, te_device = _pick_text_encoder(usable, None if req.ram_gib is None else req.ram_gib - base - model_gib, spec)
    vae_untiled = mm.vae_decode_gib(req.width, req.height)
    vae_budget = 0 if vae_untiled <= usable else int(max(usable * 0.5, mm.TILED_VAE_MIN_GIB) * 1024)
    p = Plan(req, fmt is not None, fmt, weights, enc, te_device, "auto", vae_budget)

    encoders_gib = enc.t5_gib + spec.extra_encoder_gib
    denoise = (mm.denoise_gib(fmt, n_tokens, cfg) if weights == "resident"
               else mm.streaming_denoise_gib(fmt, n_tokens, cfg)) if fmt else usable
    vae = mm.vae_decode_gib(req.width, req.height, vae_budget / 1024 if vae_budget else None)
    cached = ("0 on a cached prompt (Text Encode FLUX" + ("" if spec.key == "kontext" else ".2") + " (cached)): the "
              "encoders are not even read")
    p.phases = [
        Phase("load", mm.weight_gib(fmt, cfg=cfg) if fmt and weights == "resident" else 0.0, base + model_gib,
              "weights read once; GGUF files are memory-mapped, so they count as page cache"),
        Phase("text encode", mm.text_encode_gib(enc, spec.extra_encoder_gib) if te_device != "cpu" else 0.0,
              base + model_gib + encoders_gib, cached),
        Phase("denoise", denoise, base + model_gib, f"{n_tokens} tokens a step, weights {weights}"),
        Phase("VAE decode", vae, base + model_gib,
              "seam-free tiled decode" + (f" held to {vae_budget} MB" if vae_budget else ", one tile when it fits")),
    ]
    p.launch_options = _launch_options(req, weights)
    p.assumptions = [
        f"{req.width}x{req.height}, {req.references} reference image(s), batch 1: {n_tokens} tokens a step",
        "fixed runtime shares measured on an H100 (BENCHMARKS.md, 2026-11-23); a consumer card's CUDA context is "
        "smaller, so these peaks err on the safe side",
        "attention by a memory-lean kernel (sdpa / flash / sage): no token x token score matrix",
        f"{DESKTOP_RESERVE_GIB if req.desktop else DRIVER_RESERVE_GIB} GB of the card kept for "
        + ("the desktop" if req.desktop else "the driver"),
    ] + list(spec.notes)
    if not fmt and _pick_model(usable, n_tokens, None, spec)[0] is None:  # else RAM alone rules every format out
        need = min(mm.streaming_denoise_gib(f, n_tokens, cfg) for f in spec.formats) + req.vram_gib - usable
        what = "Kontext" if spec.key == "kontext" else spec.title
        p.problems.append(f"{req.vram_gib:g} GB of VRAM is too little for a {req.width}x{req.height} {what} edit: "
                          f"it needs at least {_round_up(need)} GB with the weights streamed from RAM (a smaller "
                          "resolution needs less)")
    need_ram = max(ph.ram_gib for ph in p.phases)
    if req.ram_gib is not None and (need_ram > req.ram_gib or not p.problems and not fmt):
        p.fits = False
        p.problems.append(f"{req.ram_gib:g} GB of RAM is too little: this setup peaks at {need_ram:.1f} GB "
                          f"(ComfyUI {base:g} + the diffusion model {model_gib:.1f} + the text encoders "
                          f"{encoders_gib:.1f}); {_round_up(_smallest_ram(req))} GB of RAM would do")
    return p


def _round_up(gib: float) -> float:
    """A 'this would do' figure: rounded up to 0.1 GB, so the rounding never says too little."""
    return math.ceil(gib * 10) / 10


def _smallest_format(spec: mm.ModelSpec) -> mm.ModelFormat:
    return next(f for f in spec.formats if f.name == "Q2_K")


def _smallest_ram(req: Request) -> float:
    """RAM for the smallest setup: Q2_K streamed, the Q4_K_M T5 (the encoders leave RAM after the prompt); FLUX.2:
    its smallest encoder file."""
    spec = mm.model_spec(req.model)
    return (mm.PROCESS_RAM_GIB + mm.weight_gib(_smallest_format(spec), cfg=spec.cfg) + spec.text_encoders[-1].t5_gib
            + spec.extra_encoder_gib)


def _launch_options(req: Request, weights: str):
    out = []
    if req.desktop:
        out.append((f"--reserve-vram {DESKTOP_RESERVE_GIB}",
                    "the card also drives the desktop, whose VRAM ComfyUI cannot see; without it the first step can "
                    "run out of memory"))
    if weights == "streamed":
        out.append(("--lowvram (only on ComfyUI before v0.29)",
                    "the weights do not fit the card and must stream from RAM; v0.29's dynamic VRAM does this by "
                    "itself, so leave it off there"))
    if req.vram_gib <= 8:
        out.append(("--preview-method none", "sampling previews load a second small decoder; at 8 GB every "
                                             "hundred MB counts"))
    return out


def format_plan(p: Plan) -> str:
    """The plan in plain words and numbers, as `kontext-lowvram plan` prints it."""
    r = p.request
    spec = mm.model_spec(r.model)
    lines = [f"Kontext LowVRAM plan: {spec.title} on {r.vram_gib:g} GB VRAM"
             + (f" / {r.ram_gib:g} GB RAM" if r.ram_gib else "") + f", {r.width}x{r.height}, "
             f"{r.references} reference(s), {r.steps} steps", ""]
    if p.model_format:
        f = p.model_format
        err = f"{f.error * 100:.1f} % weight error" if f.error else ("exact" if f.error == 0 else "error not measured")
        lines += [f"Diffusion model: {f.name} ({err}) — {f.file} in models/diffusion_models, "
                  f"loaded with 'Load Diffusion Model (GGUF/FP8/NF4)'; {mm.weight_gib(f, cfg=spec.cfg):.1f} GB, "
                  f"weights {p.weights}"]
    if spec.key == "kontext":
        lines += [f"Text encoders:   {mm.CLIP_L_FILE} + {p.text_encoder.file} in models/text_encoders, "
                  f"device policy '{p.text_encoder_device}', encode with 'Text Encode FLUX (cached)'"]
    else:
        lines += [f"Text encoder:    {p.text_encoder.file} in models/text_encoders ({p.text_encoder.t5_gib:.1f} GB, "
                  "an estimate), loaded with 'Load FLUX.2 Text Encoder (lazy, GGUF/FP8)', device policy "
                  f"'{p.text_encoder_device}', encode with 'Text Encode FLUX.2 (cached)'"]
    lines += [
              f"Attention:       '{p.attention}' (Attention Backend node: sage, then flash, then sdpa)",
              "VAE decode:      'Tiled VAE Decode (seam-free)', tile_size 0, "
              f"vram_budget_mb {p.vae_budget_mb}" + (" (as much as is free)" if not p.vae_budget_mb else ""), "",
              f"{'phase':<12} {'VRAM GB':>8} {'RAM GB':>8}  note"]
    for ph in p.phases:
        lines.append(f"{ph.name:<12} {ph.vram_gib:>8.1f} {ph.ram_gib:>8.1f}  {ph.note}")
    if p.launch_options:
        lines += ["", "ComfyUI launch options:"] + [f"  {opt}: {why}" for opt, why in p.launch_options]
    lines += ["", "Assumptions (estimates, not measurements of your machine):"] + [f"  - {a}" for a in p.assumptions]
    if p.problems:
        lines += ["", "DOES NOT FIT:"] + [f"  - {x}" for x in p.problems]
    return "\n".join(lines)
