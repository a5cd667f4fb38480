"""`kontext-lowvram bench`: full-size FLUX.1 s/step, peak VRAM and load time per weight format, side by side
with ComfyUI core (bf16, its fp8) and, when GGUF_NODE_PATH is set, city96's ComfyUI-GGUF on the same weights.

Needs a CUDA GPU and COMFYUI_PATH. Random weights (normal, small std) are made directly in each format — values
do not change speed; K-quants are random valid blocks. Each layer gets its own copy of a per-shape template, so
memory is real. The forward is the Kontext 1024² edit shape: 4096 image + 4096 reference + 512 text tokens.
Timing: CUDA events around `apply_model`, median of --steps after one warm-up step. Peak VRAM: torch's allocator
peak and the device-level peak (NVML, sampled every 2 ms), which also sees memory mapped outside torch (dynamic
VRAM). The output is a markdown table, printed and appended to --out.

A tool of the source checkout, not installed with the package: run it as `kontext-lowvram bench` or
`python tools/bench.py` where the pack is pip-installed (`pip install -e .`).
"""
import argparse
import contextlib
import importlib.util
import os
import statistics
import sys
import threading
import time

OURS = ["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q4_0", "nf4", "fp8_e4m3fn_scaled"]
GGUF_NODE = ["Q8_0", "Q4_K", "Q5_K", "Q4_0"]
LORA_RANK = 32
# tests/fixtures makes the random valid blocks of the K-quants (the source checkout has it beside tools/)
TESTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")


# ---------------------------------------------------------------- setup
def setup_comfy(comfy_path, dynamic_vram):
    """Import ComfyUI the way its main.py starts it (dynamic VRAM on v0.29 when asked and available)."""
    sys.path.insert(0, comfy_path)
    sys.argv = [sys.argv[0]] + [a for a in sys.argv[1:] if a == "--cpu"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.cli_args
    dynamic = False
    if dynamic_vram != "off" and getattr(comfy.cli_args, "enables_dynamic_vram", lambda: False)():
        try:
            import comfy_aimdo.control
            comfy_aimdo.control.init()
            dynamic = True
        except Exception as e:  # as main.py: no working comfy-aimdo -> the classic ModelPatcher
            print(f"dynamic VRAM unavailable ({e!r}); classic ModelPatcher")
    import comfy.model_management as mm
    import comfy.model_patcher
    if dynamic:
        import comfy.memory_management
        import comfy_aimdo.control
        try:
            ok = comfy_aimdo.control.init_devices((d.index, 0) for d in mm.get_all_torch_devices())
        except TypeError:
            ok = comfy_aimdo.control.init_devices(d.index for d in mm.get_all_torch_devices())
        except Exception as e:
            print(f"dynamic VRAM unavailable ({e!r}); classic ModelPatcher")
            ok = False
        if ok:
            comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
            comfy.memory_management.aimdo_enabled = True
        dynamic = bool(ok)
    return mm, dynamic


def stub_missing_pyav():
    """ComfyUI's nodes.py (imported by ComfyUI-GGUF's nodes.py) pulls in PyAV for its video types only; a GPU box
    without PyAV gets inert `av` modules so the import works (no video is ever touched here)."""
    try:
        import av  # noqa: F401
        return False
    except ImportError:
        pass
    import importlib.abc
    import importlib.machinery
    import types

    class AnyMeta(type):  # any attribute of an inert class is another inert class: av.logging.set_level(...)
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return AnyMeta(name, (Any,), {})

    class Any(metaclass=AnyMeta):
        def __init__(self, *args, **kwargs):
            pass

    class Inert(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return AnyMeta(name, (Any,), {})

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            if name == "av" or name.startswith("av."):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            mod = Inert(spec.name)
            mod.__path__ = []
            return mod

        def exec_module(self, module):
            return None

    sys.meta_path.insert(0, Finder())
    return True


def import_gguf_node(path):
    """city96's ComfyUI-GGUF as package `klv_gguf_node` (its folder name has a dash)."""
    spec = importlib.util.spec_from_file_location("klv_gguf_node", os.path.join(path, "__init__.py"),
                                                  submodule_search_locations=[path])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["klv_gguf_node"] = mod
    import importlib as il
    ops = il.import_module("klv_gguf_node.ops")
    if stub_missing_pyav():
        print("PyAV missing: ComfyUI's video types are stubbed for this run")
    try:
        nodes = il.import_module("klv_gguf_node.nodes")
    except Exception as e:  # its nodes.py imports ComfyUI's nodes.py; the ops alone still measure the kernels
        print(f"ComfyUI-GGUF nodes.py not importable ({e!r}); its patcher is skipped")
        nodes = None
    return ops, nodes


# ---------------------------------------------------------------- weights
class WeightFactory:
    """Per-shape templates on the GPU, one CPU copy per layer."""

    def __init__(self, cfg, device):
        from kontext_lowvram.optimizations.memory_model import tensor_shapes
        self.shapes = tensor_shapes(cfg)  # FLUX.1 (FluxConfig) or FLUX.2 (Flux2Config)
        self.std = 1.2 / cfg.hidden_size ** 0.5
        self.device = device
        self.templates = {}

    def template(self, fmt, shape):
        import torch
        from kontext_lowvram.optimizations import quantize
        key = (fmt, shape)
        if key not in self.templates:
            seed = sum(shape) * 7 + len(shape)
            if random_blocks_only(fmt):  # no quantizer for these: random valid blocks (their own weights)
                from kontext_lowvram.optimizations import QTensor
                if TESTS_DIR not in sys.path:
                    sys.path.insert(0, TESTS_DIR)
                from fixtures.gguf_blocks import random_blocks
                raw = random_blocks(fmt, shape, std=self.std, seed=seed)
                self.templates[key] = QTensor(raw.to(self.device), qformat="gguf", shape=shape, meta={"qtype": fmt})
            elif fmt == "bf16":
                gen = torch.Generator(device=self.device).manual_seed(seed)
                self.templates[key] = (torch.randn(shape, generator=gen, device=self.device) * self.std).to(torch.bfloat16)
            else:  # quantized from the bf16 weights: the output difference vs bf16 is this format's error
                self.templates[key] = quantize(self.template("bf16", shape), fmt)
        return self.templates[key]

    def state_dict(self, fmt):
        """{key: bf16 tensor | QTensor} on the CPU; `fmt` applies to the transformer blocks' linear weights."""
        import torch
        from kontext_lowvram.loaders.keys import should_quantize
        from kontext_lowvram.optimizations import QTensor
        sd = {}
        for k, shape in self.shapes.items():
            if k.endswith(".scale"):
                sd[k] = torch.ones(shape, dtype=torch.bfloat16)
                continue
            q = fmt != "bf16" and should_quantize(k, shape)
            t = self.template(fmt if q else "bf16", shape if len(shape) > 1 else (shape[0],))
            if len(shape) == 1:
                t = t[: shape[0]] * 0.1
            sd[k] = t.to_device("cpu") if isinstance(t, QTensor) else t.to("cpu", copy=True)
        return sd


def gguf_block_type(fmt) -> bool:
    from kontext_lowvram.optimizations.quant import UnsupportedQuantType
    from kontext_lowvram.optimizations.quant import gguf as gq
    try:
        return gq.is_quantized(gq.qtype_of(fmt))
    except (UnsupportedQuantType, KeyError, ValueError):
        return False


def random_blocks_only(fmt) -> bool:
    """GGUF block types our quantizer cannot make (the K-quants, IQ4): the bench uses random valid blocks."""
    from kontext_lowvram.optimizations.quant import gguf as gq
    return gguf_block_type(fmt) and gq.qtype_of(fmt) not in gq.QUANTIZABLE_TYPES


def weights_tag(fmt, lora):
    """Rows with the same tag ran the same weights (their outputs are comparable)."""
    fmt = fmt.split()[0]
    return (fmt if random_blocks_only(fmt) else "bf16-derived") + ("+lora" if lora else "")


def random_lora(shapes, rank, device, std=0.02):
    """ComfyUI-format LoRA (lora_up/lora_down/alpha) on every linear weight of the transformer blocks."""
    import torch
    from kontext_lowvram.loaders.keys import should_quantize
    g = torch.Generator(device=device).manual_seed(5)
    sd = {}
    for k, shape in shapes.items():
        if should_quantize(k, shape):
            base = "diffusion_model." + k[: -len(".weight")]
            sd[base + ".lora_up.weight"] = (torch.randn(shape[0], rank, generator=g, device=device) * std).to(torch.bfloat16).cpu()
            sd[base + ".lora_down.weight"] = (torch.randn(rank, shape[1], generator=g, device=device) * std).to(torch.bfloat16).cpu()
            sd[base + ".alpha"] = torch.tensor(float(rank))
    return sd


# ---------------------------------------------------------------- measuring
class NvmlPeak:
    """Device-wide used-memory peak (sees memory mapped outside torch's allocator)."""

    def __init__(self):
        try:
            import pynvml
            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or 0))
        except Exception:
            self.nvml = None
        self.peak = 0
        self._stop = threading.Event()

    def used(self):
        return self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used if self.nvml else 0

    def __enter__(self):
        self.peak = self.used()
        self._stop.clear()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.used())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def forward_inputs(device, cfg_tokens=(128, 512), cfg=None):
    """The latent, reference latent, text and pooled vector of one step. FLUX.1: 16 channels at 1/8 (2x2 patches in
    the model); FLUX.2: 128 channels at 1/16 (patch 1), so `side` (the FLUX.1 latent side) halves: same tokens."""
    import torch
    side, txt = cfg_tokens
    channels, width = 16, 4096
    if is_flux2(cfg):
        channels, width, side = cfg.in_channels, cfg.context_in_dim, side // 2
    g = torch.Generator(device=device).manual_seed(1)
    return dict(x=torch.randn(1, channels, side, side, generator=g, device=device),
                ref=torch.randn(1, channels, side, side, generator=g, device=device),
                ctx=torch.randn(1, txt, width, generator=g, device=device),
                y=torch.randn(1, 768, generator=g, device=device))


def is_flux2(cfg) -> bool:
    from kontext_lowvram.loaders.flux2_layout import Flux2Config
    return isinstance(cfg, Flux2Config)


#: --model: the transformer the bench builds at full size with random weights
MODELS = ("flux1-dev", "flux2-dev", "flux2-klein-4b", "flux2-klein-9b")


def model_config(name, smoke=False):
    """The full-size config of --model; with --smoke a small one of the same kind (the whole flow, any device)."""
    from dataclasses import replace

    from kontext_lowvram.loaders.flux2_layout import FLUX2_MODELS
    from kontext_lowvram.loaders.flux_layout import FLUX_DEV, FluxConfig
    if name == "flux1-dev":
        # v0.3.64 hard-codes FLUX.1's width 3072: the smoke keeps it
        return FluxConfig(hidden_size=3072, num_heads=24, depth=1, depth_single_blocks=1) if smoke else FLUX_DEV
    cfg = FLUX2_MODELS[name]
    # FLUX.2 hosts read the width from the weights: the smoke is 256 wide (2 heads of 128), 1 + 1 blocks, the real
    # text width and guidance embedding
    return replace(cfg, hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1) if smoke else cfg


def host_runs(cfg) -> str | None:
    """None when this ComfyUI's own detection reads `cfg`'s layout as the model it is; else why not."""
    import torch
    from kontext_lowvram.host.architecture import detected_image_model, host_version
    from kontext_lowvram.optimizations.memory_model import tensor_shapes
    want = "flux2" if is_flux2(cfg) else "flux"
    seen = detected_image_model({k: torch.empty(v, device="meta") for k, v in tensor_shapes(cfg).items()})
    if seen == want:
        return None
    return (f"ComfyUI {host_version()} reads this layout as image_model {seen!r}, not {want!r}"
            + (": it predates FLUX.2 (v0.3.72+ runs [dev], v0.9.2+ [klein]; v0.29 both)" if want == "flux2" else ""))


def step_fn(model, inp):
    import torch
    dev = inp["x"].device

    def step():
        return model.model.apply_model(inp["x"], torch.tensor([0.5], device=dev), c_crossattn=inp["ctx"],
                                       y=inp["y"], guidance=torch.tensor([2.5], device=dev),
                                       ref_latents=[inp["ref"]])
    return step


def measure(mm, make_model, inp, steps, profile=False):
    """(s/step median, torch peak GiB, device peak GiB, load s, output, patcher name, profile or None)."""
    import torch
    cuda = inp["x"].is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    nv = NvmlPeak()
    with nv:
        t0 = time.perf_counter()
        model = make_model()
        mm.load_models_gpu([model])
        sync()
        load_s = time.perf_counter() - t0
        step = step_fn(model, inp)
        times = []
        with torch.no_grad():
            out = step()  # warm-up: first-use kernels, dynamic VRAM faults, LoRA factor casts
            for _ in range(steps):
                if not cuda:  # --smoke on the CPU
                    t = time.perf_counter()
                    out = step()
                    times.append(time.perf_counter() - t)
                    continue
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                out = step()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1000)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else 0.0
    prof = profile_step(step, cuda) if profile else None  # after the timed steps: the profiler slows its step
    res = (statistics.median(times), peak, nv.peak / 2 ** 30, load_s, out.float().cpu(), type(model).__name__, prof)
    mm.unload_all_models()
    del model
    mm.soft_empty_cache()
    import gc
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return res


# (category, substrings of a kernel / op name); the first match wins, the rest is "other"
PROFILE_CATEGORIES = [
    # our Triton kernels (triton_kernels.py: dequant_*, matmul_*, act_*) and, on the CPU, our custom ops
    ("quant", ("dequant_gguf", "dequant_nf4", "dequant_fp8", "dequant_lora_", "matmul_gguf", "matmul_nf4",
               "matmul_fp8", "act_amax", "act_quant_", "kontext_lowvram::")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "attn")),
    ("matmul", ("gemm", "gemv", "xmma", "nvjet", "cutlass", "scaled_mm", "aten::mm", "aten::addmm", "aten::bmm")),
    ("copies", ("memcpy", "memset", "aten::copy_")),
]
PROFILE_COLUMNS = [c for c, _ in PROFILE_CATEGORIES] + ["other", "idle"]


def profile_category(kernel_name: str) -> str:
    low = kernel_name.lower()
    return next((c for c, keys in PROFILE_CATEGORIES if any(k in low for k in keys)), "other")


def profile_step(step, cuda):
    """Milliseconds of one step per category: GPU kernel time on CUDA (CPU op self time with --smoke), plus "idle":
    gaps between kernels inside the step, where the GPU waits on Python (launch overhead)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    totals = dict.fromkeys(PROFILE_COLUMNS, 0.0)

    def add(name, us):
        totals[profile_category(name)] += us / 1000

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    if cuda:
        spans = []
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                add(e.name, e.time_range.elapsed_us())
                spans.append((e.time_range.start, e.time_range.end))
        spans.sort()
        busy, end = 0, None
        for a, b in spans:  # union of kernel intervals (streams may overlap)
            if end is None or a > end:
                busy += b - a
                end = b
            elif b > end:
                busy += b - end
                end = b
        if spans:
            totals["idle"] = max(0.0, (max(b for _, b in spans) - spans[0][0] - busy) / 1000)
    else:
        for e in prof.key_averages():
            add(e.key, e.self_cpu_time_total)
    return totals


def matmul_rates(device):
    """Measured dense bf16 and fp8 (_scaled_mm) matmul TFLOP/s on this device."""
    import torch
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    rates = {}

    def time_it(fn):
        for _ in range(3):
            fn()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(10):
            fn()
        e.record()
        e.synchronize()
        return 2 * n ** 3 * 10 / (s.elapsed_time(e) / 1000) / 1e12
    rates["bf16"] = time_it(lambda: a @ b)
    try:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()
        one = torch.ones((), device=device)
        rates["fp8"] = time_it(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
    except Exception:
        rates["fp8"] = None
    return rates


def forward_flops(cfg, img=8192, txt=512):
    """(linear FLOPs, attention FLOPs) of one FLUX forward at the Kontext shape (modulation vectors ignored)."""
    h, m = cfg.hidden_size, cfg.mlp_hidden_dim
    mlp_in = 2 * m if is_flux2(cfg) else m  # FLUX.2's SwiGLU: gate and value
    per_stream = h * 3 * h + h * h + h * mlp_in + m * h      # qkv, proj, mlp in/out
    double = 2 * (img + txt) * per_stream * cfg.depth
    single = 2 * (img + txt) * (h * (3 * h + mlp_in) + (h + m) * h) * cfg.depth_single_blocks
    L = img + txt
    attn = 4 * L * L * h * (cfg.depth + cfg.depth_single_blocks)
    return double + single, attn


# ---------------------------------------------------------------- the runs
def run(args):
    import torch
    mm, dynamic = setup_comfy(args.comfyui, args.dynamic_vram)
    import comfy.sd
    import comfy.utils

    from kontext_lowvram.loaders.writers import to_safetensors_dict
    from kontext_lowvram.host import compat
    from kontext_lowvram.host.lora import apply_plan, plan_for_model
    from kontext_lowvram.host.model import build_model
    from kontext_lowvram.optimizations.quant.triton_lora import ENV_ENABLE as FUSED_LORA_ENV
    from kontext_lowvram.optimizations.quant.triton_matmul import ENV_ENABLE as FUSED_ENV
    from kontext_lowvram.optimizations.fp8_linear import ENV_ROWWISE

    dev = mm.get_torch_device()
    # --smoke: the whole flow on a small model (CPU works): checks this script, measures nothing
    cfg = model_config(getattr(args, "model", "flux1-dev"), args.smoke)
    why_not = host_runs(cfg)
    if why_not:
        print(f"bench --model {args.model}: {why_not}", file=sys.stderr)
        return 2
    factory = WeightFactory(cfg, dev)
    inp = forward_inputs(dev, (16, 8) if args.smoke else (128, 512), cfg)
    ballast = None
    if args.vram_gb:
        free = torch.cuda.mem_get_info()[0]
        ballast = torch.empty(max(free - int(args.vram_gb * 2 ** 30), 0), dtype=torch.uint8, device=dev)
    lora_sd = random_lora(factory.shapes, LORA_RANK, dev) if args.lora else None
    gguf_ops = gguf_nodes = None
    if os.environ.get("GGUF_NODE_PATH"):
        gguf_ops, gguf_nodes = import_gguf_node(os.environ["GGUF_NODE_PATH"])

    def core(fmt):
        def make():
            sd = factory.state_dict("fp8_e4m3fn_scaled" if fmt == "fp8_native" else "bf16")
            if fmt == "fp8_native":  # v0.29: comfy_quant layers -> core mixed-precision ops (comfy-kitchen)
                flat, meta = to_safetensors_dict(sd, "comfy_quant")
                return comfy.sd.load_diffusion_model_state_dict(flat, metadata=meta)
            opts = {}
            if fmt in ("fp8_storage", "fp8_fast"):
                opts["dtype"] = torch.float8_e4m3fn
                opts["fp8_optimizations"] = fmt == "fp8_fast"
            return comfy.sd.load_diffusion_model_state_dict(sd, model_options=opts)
        return make

    def ours(fmt, fp8_matmul=True):
        def make():
            return build_model(factory.state_dict(fmt), fp8_matmul=fp8_matmul)
        return make

    def gguf_node(fmt):
        import gguf
        from kontext_lowvram.optimizations import QTensor

        def make():
            sd = {}
            for k, v in factory.state_dict(fmt).items():
                if isinstance(v, QTensor):
                    sd[k] = gguf_ops.GGMLTensor(v.raw, tensor_type=gguf.GGMLQuantizationType[fmt], tensor_shape=v.shape)
                else:  # real GGUF files keep 1-D tensors in F32
                    sd[k] = gguf_ops.GGMLTensor(v.float(), tensor_type=gguf.GGMLQuantizationType.F32, tensor_shape=v.shape)
            model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"custom_operations": gguf_ops.GGMLOps()})
            return gguf_nodes.GGUFModelPatcher.clone(model) if gguf_nodes else model
        return make

    def with_lora(make, kind):
        def wrapped():
            model = make()
            if kind == "ours":
                return apply_plan(model, plan_for_model(model, lora_sd), 1.0)[0]
            return comfy.sd.load_lora_for_models(model, None, lora_sd, 1.0, 0)[0]
        return wrapped

    is_v029 = compat.diffusion_loader_reads_metadata()
    configs = [("core", "bf16", core("bf16"))]
    if "core" in args.include:
        configs += [("core", "fp8 native (comfy_quant)", core("fp8_native"))] if is_v029 else \
                   [("core", "fp8 storage", core("fp8_storage")), ("core", "fp8_e4m3fn_fast", core("fp8_fast"))]
    for fmt in args.formats:
        configs.append(("ours", fmt, ours(fmt)))
        if fmt == "fp8_e4m3fn_scaled" and "upcast" in args.include:
            configs.append(("ours", fmt + " (upcast, no fp8 matmul)", ours(fmt, fp8_matmul=False)))
        if fmt == "fp8_e4m3fn_scaled" and "rowwise" in args.include:
            configs.append(("ours", fmt + " (per-row activation scale)", ours(fmt), {ENV_ROWWISE: "1"}))
        if "fused" in args.include:
            configs.append(("ours", fmt + " (fused small-batch matmul)", ours(fmt), {FUSED_ENV: "1"}))
    if gguf_ops is not None:
        configs += [("ComfyUI-GGUF", fmt, gguf_node(fmt)) for fmt in args.gguf_formats]
    if lora_sd is not None:
        configs.append(("core", f"bf16 + LoRA r{LORA_RANK} (core, merged)", with_lora(core("bf16"), "core")))
        for fmt in args.lora:
            configs.append(("ours", f"{fmt} + LoRA r{LORA_RANK} (low-rank)", with_lora(ours(fmt), "ours")))
            if "corelora" in args.include:  # core's LoRA loader on our model: the host's own patches
                configs.append(("ours", f"{fmt} + LoRA r{LORA_RANK} (core LoRA loader)", with_lora(ours(fmt), "core")))
            if "fused" in args.include and fmt != "fp8_e4m3fn_scaled":
                configs.append(("ours", f"{fmt} + LoRA r{LORA_RANK} (merged in the dequant kernel)",
                                with_lora(ours(fmt), "ours"), {FUSED_LORA_ENV: "1"}))
            if gguf_ops is not None and gguf_block_type(fmt):
                configs.append(("ComfyUI-GGUF", f"{fmt} + LoRA r{LORA_RANK}", with_lora(gguf_node(fmt), "core")))

    rows, refs = [], {}
    for who, label, make, *env in configs:
        if args.only and not any(o in f"{who} {label}" for o in args.only):
            continue
        try:
            with env_vars(env[0] if env else {}):
                s, p_torch, p_dev, load_s, out, patcher, prof = measure(mm, make, inp, args.steps, args.profile)
        except Exception as e:  # one broken config must not lose the others' numbers
            print(f"{who} {label}: FAILED {type(e).__name__}: {e}", flush=True)
            rows.append((who, label, None, None, None, None, "", f"failed: {type(e).__name__}", None))
            mm.unload_all_models()
            mm.soft_empty_cache()
            continue
        tag = weights_tag(label, "LoRA" in label)
        if tag not in refs:
            refs[tag] = (f"{who} {label}", out)
            err = "(reference)"
        else:
            ref_name, ref = refs[tag]
            err = f"{((out - ref).norm() / ref.norm()).item():.4f} vs {ref_name}" if torch.isfinite(out).all() else "non-finite"
        rows.append((who, label, s, p_torch, p_dev, load_s, err, patcher, prof))
        print(f"{who:12s} {label:40s} {s:.4f} s/step  torch peak {p_torch:5.1f} GiB  device peak {p_dev:5.1f} GiB  "
              f"load {load_s:5.1f} s  rel.diff {err}  {patcher}" + (f"  profile ms {prof_text(prof)}" if prof else ""),
              flush=True)
    del ballast
    if args.smoke:
        print(table(args, rows, {"bf16": 0, "fp8": 0}, 0, 0, dynamic, 0, 0))
        return 0 if all(r[2] is not None for r in rows) else 1
    rates = matmul_rates(dev)
    lin, attn = forward_flops(cfg)
    floor_bf16 = (lin + attn) / (rates["bf16"] * 1e12)
    floor_fp8 = lin / ((rates["fp8"] or rates["bf16"]) * 1e12) + attn / (rates["bf16"] * 1e12)
    report = table(args, rows, rates, floor_bf16, floor_fp8, dynamic, lin, attn)
    print(report)
    if args.out:
        with open(args.out, "a") as f:
            f.write(report)
    return 0


def table(args, rows, rates, floor_bf16, floor_fp8, dynamic, lin, attn):
    import torch
    from kontext_lowvram.optimizations.quant import triton_dequant
    triton_on = torch.cuda.is_available() and triton_dequant.available(torch.device("cuda"))
    base = next((r[2] for r in rows if r[0] == "core" and r[1] == "bf16" and r[2]), None)
    version = comfy_version(args.comfyui)
    lines = [
        "",
        f"### bench: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu (smoke)'} · ComfyUI {version} · {time.strftime('%Y-%m-%d')}",
        "",
        f"torch {torch.__version__}; Triton dequant {'on' if triton_on else 'off'}; "
        f"dynamic VRAM {'on' if dynamic else 'off'}; {'VRAM capped at %s GiB by ballast; ' % args.vram_gb if args.vram_gb else ''}"
        f"model {getattr(args, 'model', 'flux1-dev')}{' (smoke size)' if args.smoke else ''}, "
        f"Kontext 1024² shape (4096 + 4096 + 512 tokens), batch 1, median of {args.steps} steps after a warm-up. "
        f"Measured matmul: bf16 {rates['bf16']:.0f} TFLOP/s, fp8 {rates['fp8'] or 0:.0f} TFLOP/s. "
        f"FLOP floor of one step: {floor_bf16:.3f} s (bf16), {floor_fp8:.3f} s (fp8 linears) "
        f"[{lin / 1e12:.0f} TFLOP linear + {attn / 1e12:.0f} TFLOP attention].",
        "",
        f"Command: `{args.command_line}`",
        "",
        "| who | format | s/step | × core bf16 | torch peak GiB | device peak GiB | load s | output rel. L2 diff (same weights) | patcher |"
        + (f" profile ms ({' / '.join(PROFILE_COLUMNS)}) |" if args.profile else ""),
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if args.profile else ""),
    ]
    for who, label, s, p_t, p_d, load_s, err, patcher, prof in rows:
        extra = f" {prof_text(prof) if prof else '—'} |" if args.profile else ""
        if s is None:
            lines.append(f"| {who} | {label} | — | — | — | — | — | — | {patcher} |" + extra)
            continue
        ratio = f"{s / base:.2f}" if base else "—"
        lines.append(f"| {who} | {label} | {s:.3f} | {ratio} | {p_t:.1f} | {p_d:.1f} | {load_s:.1f} | {err} | {patcher} |"
                     + extra)
    lines += target_lines(rows)
    if args.profile:
        lines += ["", "Profile: one extra step under torch.profiler (slower than the timed ones), GPU kernel time per "
                      "category: quant = our Triton dequant / fused matmul / fp8 activation kernels; matmul = cuBLAS/"
                      "CUTLASS; copies = memcpy/memset (weights streamed in); other = elementwise, norms, torch-path "
                      "dequant (ComfyUI-GGUF's); idle = gaps between kernels inside the step (the GPU waiting on Python)."]
    return "\n".join(lines) + "\n"


def target_lines(rows):
    """Issue 4's targets, each as the ratio this run measured (every row present; a target whose rows are missing
    is left out): for each of our formats the default row and, where opt-in variants ran, the best of them."""
    t = {(who, label): s for who, label, s, *_ in rows if s}
    core = t.get(("core", "bf16"))

    def ours(fmt):  # {variant: s/step}; "" is the default row
        return {label[len(fmt):].strip(" ()"): s for (who, label), s in t.items()
                if who == "ours" and (label == fmt or label.startswith(fmt + " (") and "LoRA" not in label)}

    def verdict(name, got, bound, better):
        ok = got <= bound if better == "≤" else got >= bound
        return f"{name}: {got:.2f}× (target {better} {bound:.2f}×) " + (
            "met" if ok else f"missed by {abs(got / bound - 1) * 100:.0f} %")

    out = []

    def add(name, fmt, ref, bound, invert=False):
        variants = ours(fmt)
        if ref is None or "" not in variants:
            return
        ratio = (lambda v: ref / v) if invert else (lambda v: v / ref)
        line = "- " + verdict(name, ratio(variants[""]), bound, "≥" if invert else "≤")
        others = {k: ratio(v) for k, v in variants.items() if k}
        if others:
            best = (max if invert else min)(others, key=others.get)
            line += f"; best opt-in variant ({best}) {others[best]:.2f}×"
        out.append(line)

    add("ours Q8_0 vs core bf16", "Q8_0", core, 1.0)
    add("ours Q4_K vs core bf16", "Q4_K", core, 1.10)
    add("ours Q5_K vs core bf16", "Q5_K", core, 1.10)
    add("ComfyUI-GGUF Q8_0 / ours Q8_0 (speed-up)", "Q8_0", t.get(("ComfyUI-GGUF", "Q8_0")), 1.2, invert=True)
    add("ComfyUI-GGUF Q4_K / ours Q4_K (speed-up)", "Q4_K", t.get(("ComfyUI-GGUF", "Q4_K")), 1.7, invert=True)
    for who, label in t:
        if who == "core" and label.startswith("fp8"):
            add(f"ours fp8 vs core {label}", "fp8_e4m3fn_scaled", t[(who, label)], 1.0)
    for (who, label), s in t.items():
        if who == "ours" and " + LoRA" in label:
            base = t.get(("ours", label.split(" + LoRA")[0]))
            if base:
                out.append(f"- LoRA cost, ours {label}: {(s / base - 1) * 100:+.1f} % (target ≤ +3 %) "
                           + ("met" if s / base <= 1.03 else f"missed by {(s / base - 1.03) * 100:.1f} points"))
    return ["", "Targets (issue 4; ratios within this run):", ""] + out if out else []


def prof_text(prof):
    return " / ".join(f"{prof[c]:.0f}" for c in PROFILE_COLUMNS)


@contextlib.contextmanager
def env_vars(values):
    """Set environment variables for one measurement (e.g. KLV_FUSED_MATMUL), then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def comfy_version(path):
    with contextlib.suppress(Exception):
        src = open(os.path.join(path, "comfyui_version.py")).read()
        return src.split("=")[1].strip().strip("\"'")
    return "unknown"


def add_parser(sub):
    p = sub.add_parser("bench", help="full-size FLUX s/step / peak VRAM per format vs ComfyUI core and ComfyUI-GGUF "
                                     "(CUDA GPU and COMFYUI_PATH needed)")
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout (default $COMFYUI_PATH)")
    p.add_argument("--model", choices=MODELS, default="flux1-dev",
                   help="the transformer, built at full size with random weights: FLUX.1 [dev] / Kontext (default), "
                        "FLUX.2 [dev], [klein] 4B / 9B (FLUX.2 needs a ComfyUI that runs it, e.g. v0.29)")
    p.add_argument("--formats", nargs="*", default=OURS, help="our formats to measure")
    p.add_argument("--gguf-formats", nargs="*", default=GGUF_NODE, help="ComfyUI-GGUF formats (needs GGUF_NODE_PATH)")
    p.add_argument("--include", nargs="*", default=["core", "upcast"],
                   help="extra rows: core (its fp8), upcast (our fp8 without the fp8 matmul), fused (our formats with "
                        "the fused small-batch matmul, KLV_FUSED_MATMUL=1, and LoRA merged in the dequant kernel, "
                        "KLV_FUSED_LORA=1), rowwise (our fp8 with one activation scale per token, KLV_FP8_ROWWISE=1), "
                        "corelora (our --lora formats with core's LoRA loader instead of ours)")
    p.add_argument("--profile", action="store_true",
                   help="profile one extra step per row: GPU time in quant kernels / matmul / attention / copies / "
                        "other, and idle gaps")
    p.add_argument("--lora", nargs="*", default=["Q8_0", "Q4_K"], help="formats measured with a rank-32 LoRA")
    p.add_argument("--only", nargs="*", help="run only rows whose 'who format' contains one of these")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dynamic-vram", choices=["auto", "off"], default="auto",
                   help="v0.29: run as its main.py does, with dynamic VRAM (comfy-aimdo) when it initialises")
    p.add_argument("--vram-gb", type=float, default=0, help="simulate a smaller card: hold all but this much VRAM")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tiny model, any device: tests the script
    p.add_argument("--out", default="BENCHMARKS.md", help="markdown file the table is appended to ('' for none)")
    return p


def bench_main(args):
    import torch
    given = sys.argv[1:] if sys.argv[1:2] == ["bench"] else ["bench"] + sys.argv[1:]  # also `python tools/bench.py`
    args.command_line = "kontext-lowvram " + " ".join(given)
    if args.smoke:
        sys.argv += ["--cpu"] if not torch.cuda.is_available() else []
    if not args.comfyui:
        print("bench needs ComfyUI: set COMFYUI_PATH or pass --comfyui", file=sys.stderr)
        return 2
    if not torch.cuda.is_available() and not args.smoke:
        print("bench needs a CUDA GPU (full-size FLUX); `kontext-lowvram demo` runs on the CPU", file=sys.stderr)
        return 2
    return run(args)


def main(argv=None):
    """`python tools/bench.py ARGS`, and `kontext-lowvram bench ARGS`, which cli.py forwards here."""
    ap = argparse.ArgumentParser(prog="kontext-lowvram")
    add_parser(ap.add_subparsers(dest="cmd", required=True))
    return bench_main(ap.parse_args(["bench"] + list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
