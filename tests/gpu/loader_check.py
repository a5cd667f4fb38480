"""GPU check for the model loader inside a real ComfyUI (run by hand on a CUDA machine; not collected by pytest).

For each format it builds a random FLUX transformer, loads it through `LowVRAMModelLoader`'s path
(`comfy.sd.load_diffusion_model_state_dict` with our ops), runs the Kontext 1024² token shape (4096 image + 4096
reference + 512 text tokens) and reports the median s/step, peak VRAM and error vs the bf16 model. On ComfyUI
v0.29 with a GPU this also exercises dynamic VRAM (ModelPatcherDynamic) with our raw-storage weights.

  COMFYUI_PATH=/path/to/ComfyUI python tests/gpu/loader_check.py            # full-size FLUX.1 on CUDA
  COMFYUI_PATH=/path/to/ComfyUI python tests/gpu/loader_check.py --tiny     # CPU smoke run, tiny model
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: the fixtures
FORMATS = ["bf16", "Q8_0", "Q4_K", "fp8_e4m3fn_scaled", "nf4"]


def build_state_dict(cfg, fmt, device, seed=0):
    """Random weights made directly in `fmt` on `device` (K-quants as random valid blocks), returned on the CPU."""
    from kontext_lowvram.loaders.flux_layout import flux_tensor_shapes
    from kontext_lowvram.loaders.keys import should_quantize
    from kontext_lowvram.optimizations import QTensor, quantize
    from fixtures.gguf_blocks import random_blocks
    std = 1.2 / cfg.hidden_size ** 0.5
    gen = torch.Generator(device=device).manual_seed(seed)
    sd = {}
    for i, (k, shape) in enumerate(flux_tensor_shapes(cfg).items()):
        if k.endswith(".scale"):
            sd[k] = torch.ones(shape, dtype=torch.bfloat16)
            continue
        if fmt == "Q4_K" and should_quantize(k, shape):
            raw = random_blocks("Q4_K", shape, std=std, seed=i)
            sd[k] = QTensor(raw, qformat="gguf", shape=shape, meta={"qtype": "Q4_K"})
            continue
        w = (torch.randn(shape, generator=gen, device=device) * (std if len(shape) > 1 else std / 10)).to(torch.bfloat16)
        sd[k] = quantize(w, fmt).to_device("cpu") if fmt != "bf16" and should_quantize(k, shape) else w.cpu()
    return sd


def run(args):
    sys.argv = [sys.argv[0]] + (["--cpu"] if args.tiny else [])
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.model_management as mm
    import comfy.sd

    from kontext_lowvram.loaders.flux_layout import FLUX_DEV, FluxConfig
    from kontext_lowvram.host.ops import make_comfy_ops

    cfg = FluxConfig(hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1) if args.tiny else FLUX_DEV
    dev = mm.get_torch_device()
    side = 16 if args.tiny else 128  # latent side: 128 -> 1024² image, 4096 tokens
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, side, side, generator=g)
    ref_latent = torch.randn(1, 16, side, side, generator=g)
    ctx = torch.randn(1, 8 if args.tiny else 512, 4096, generator=g)
    y = torch.randn(1, 768, generator=g)
    rows, ref_out = [], None
    for fmt in args.formats:
        sd = build_state_dict(cfg, fmt, "cuda" if dev.type == "cuda" else "cpu")
        t0 = time.perf_counter()
        model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"custom_operations": make_comfy_ops()})
        del sd
        mm.load_models_gpu([model])
        load_s = time.perf_counter() - t0
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            free0 = torch.cuda.mem_get_info()[0]
        times = []
        with torch.no_grad():
            for step in range(args.steps + 1):
                t = time.perf_counter()
                out = model.model.apply_model(x.to(dev), torch.tensor([0.5], device=dev), c_crossattn=ctx.to(dev),
                                              y=y.to(dev), guidance=torch.tensor([2.5], device=dev),
                                              ref_latents=[ref_latent.to(dev)])
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if step:  # the first step warms up
                    times.append(time.perf_counter() - t)
        out = out.float().cpu()
        peak = (torch.cuda.max_memory_allocated() / 2**30, (free0 - torch.cuda.mem_get_info()[0]) / 2**30) if dev.type == "cuda" else (0, 0)
        if fmt == "bf16":
            ref_out = out
        err = ((out - ref_out).norm() / ref_out.norm()).item() if ref_out is not None and fmt != "Q4_K" else float("nan")
        rows.append((fmt, type(model).__name__, statistics.median(times), peak, load_s, err, torch.isfinite(out).all().item()))
        print(rows[-1], flush=True)
        mm.unload_all_models()
        del model
        mm.soft_empty_cache()
    print(f"\ndevice: {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"ComfyUI at {os.environ['COMFYUI_PATH']}, {time.strftime('%Y-%m-%d')}")
    print("| format | patcher | s/step (median) | peak VRAM torch GiB | VRAM held (mem_get_info) GiB | load s | rel err vs bf16 | finite |")
    print("|---|---|---|---|---|---|---|---|")
    for fmt, patcher, s, (p1, p2), load_s, err, finite in rows:
        print(f"| {fmt} | {patcher} | {s:.3f} | {p1:.1f} | {p2:.1f} | {load_s:.1f} | {err:.4f} | {finite} |")
    return 0 if all(r[-1] for r in rows) else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU (smoke test of this script)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--formats", nargs="+", default=FORMATS)
    sys.exit(run(p.parse_args()))
