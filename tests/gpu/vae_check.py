"""GPU check of the tiled VAE nodes vs core's VAEDecode / VAEDecodeTiled / VAEEncode on the full-size FLUX VAE
(random weights; run by hand on a CUDA machine, not collected by pytest).

For each size: median time of --repeats calls after one warm-up, torch peak VRAM above the resident VAE, and
PSNR of each output vs core's untiled result (same weights, same input).

  COMFYUI_PATH=/path/to/ComfyUI python tests/gpu/vae_check.py [--sizes 1024 2048] [--budget-mb 0]
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: the fixtures


def psnr(a, b):
    mse = ((a.float().cpu() - b.float().cpu()) ** 2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


CUDA = torch.cuda.is_available()  # without it the script still runs (smoke test), measuring no VRAM
sync = torch.cuda.synchronize if CUDA else (lambda: None)


def timed(fn, repeats):
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return _timed(fn, repeats)


def _timed(fn, repeats):
    sync()
    out = fn()  # warm-up
    sync()
    base = torch.cuda.memory_allocated() if CUDA else 0
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30 if CUDA else 0.0
    return statistics.median(times), peak, out


def main(args):
    sys.argv = [sys.argv[0]] + ([] if CUDA else ["--cpu"])
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.model_management as mm
    import comfy.sd

    from kontext_lowvram.cli import load_bench
    load_bench().stub_missing_pyav()
    import nodes as core

    from fixtures.flux import random_flux_vae_state_dict
    from kontext_lowvram.nodes.tiled_vae import LowVRAMTiledVAEDecode, LowVRAMTiledVAEEncode

    vae = comfy.sd.VAE(sd=random_flux_vae_state_dict(seed=0))
    rows = []
    for size in args.sizes:
        g = torch.Generator().manual_seed(size)
        latent = {"samples": torch.randn(1, 16, size // 8, size // 8, generator=g)}
        dec = {
            "core VAEDecode": lambda: core.VAEDecode().decode(vae, latent)[0],
            "core VAEDecodeTiled (512/64)": lambda: core.VAEDecodeTiled().decode(vae, latent, 512, 64, 64, 8)[0],
            "ours LowVRAMTiledVAEDecode (auto)": lambda: LowVRAMTiledVAEDecode().decode(latent, vae, 0, args.budget_mb)[0],
        }
        ref = None
        for name, fn in dec.items():
            mm.unload_all_models()
            mm.soft_empty_cache()
            try:
                s, peak, out = timed(fn, args.repeats)
            except Exception as e:
                rows.append((f"decode {size}²", name, None, None, f"failed: {type(e).__name__}: {e}"[:80]))
                continue
            ref = out if ref is None else ref
            rows.append((f"decode {size}²", name, s, peak, f"{psnr(out, ref):.1f}" if out is not ref else "ref"))
            print(rows[-1], flush=True)
        image = ref if ref is not None else torch.rand(1, size, size, 3)
        enc = {
            "core VAEEncode": lambda: core.VAEEncode().encode(vae, image)[0]["samples"],
            "core VAEEncodeTiled (512/64)": lambda: core.VAEEncodeTiled().encode(vae, image, 512, 64, 64, 8)[0]["samples"],
            "ours LowVRAMTiledVAEEncode (auto)": lambda: LowVRAMTiledVAEEncode().encode(image, vae, 0, args.budget_mb)[0]["samples"],
        }
        ref_lat = None
        for name, fn in enc.items():
            mm.unload_all_models()
            mm.soft_empty_cache()
            try:
                s, peak, out = timed(fn, args.repeats)
            except Exception as e:
                rows.append((f"encode {size}²", name, None, None, f"failed: {type(e).__name__}: {e}"[:80]))
                continue
            if ref_lat is None:
                ref_lat, err = out, "ref"
            else:
                err = f"rel L2 {((out.float().cpu() - ref_lat.float().cpu()).norm() / ref_lat.float().cpu().norm()).item():.1e}"
            rows.append((f"encode {size}²", name, s, peak, err))
            print(rows[-1], flush=True)
    print(f"\ndevice: {torch.cuda.get_device_name() if CUDA else 'cpu'}, torch {torch.__version__}, ComfyUI at "
          f"{os.environ['COMFYUI_PATH']}, {time.strftime('%Y-%m-%d')}, median of {args.repeats} after a warm-up")
    print("| op | node | time s | peak VRAM above resident GiB | vs core untiled (PSNR dB / rel L2) |")
    print("|---|---|---|---|---|")
    for op, name, s, peak, err in rows:
        if s is None:
            print(f"| {op} | {name} | — | — | {err} |")
        else:
            print(f"| {op} | {name} | {s:.3f} | {peak:.2f} | {err} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-mb", type=int, default=0, help="our nodes' vram_budget_mb (0: from free memory)")
    main(p.parse_args())
