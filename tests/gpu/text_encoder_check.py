"""GPU check of the lazy text-encoder loader and the cached FLUX text encode with full-size CLIP-L + T5-XXL
(random weights written to --workdir; run by hand on a CUDA machine, not collected by pytest).

Each scenario runs in a fresh process (so peak RAM is its own): load + encode a prompt, report encode time, VRAM
still held by the process after the node returned (what sampling would lose), the process's peak VRAM and peak
RAM. Scenarios: core (comfy.sd.load_clip + CLIPTextEncodeFlux, what DualCLIPLoader does), ours with
gpu_then_release, ours with cpu, and a cache hit in a new process (encoders never loaded).

  COMFYUI_PATH=/path/to/ComfyUI python tests/gpu/text_encoder_check.py [--t5 fp8|bf16]
"""
import argparse
import json
import os
import subprocess
import sys
import time

SCENARIOS = ["core", "gpu_then_release", "hit", "cpu"]


TINY_T5 = {"d_model": 64, "d_kv": 16, "num_heads": 4, "d_ff": 128, "num_layers": 2}


def write_files(workdir, t5_format, tiny=False):
    import torch

    from kontext_lowvram.loaders.text_encoders import clip_l_tensor_shapes, t5_tensor_shapes
    from kontext_lowvram.loaders.writers import write_safetensors
    from kontext_lowvram.optimizations import quantize
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for name, shapes, fmt in (("clip_l.safetensors", clip_l_tensor_shapes(), "bf16"),
                              (f"t5xxl_{t5_format}.safetensors", t5_tensor_shapes(TINY_T5 if tiny else None), t5_format)):
        path = os.path.join(workdir, name)
        out[name] = path
        if os.path.exists(path):
            continue
        g = torch.Generator(device=dev).manual_seed(len(shapes))
        sd = {}
        for k, shape in shapes.items():
            t = torch.randn(shape, generator=g, device=dev)
            if "norm" in k and k.endswith("weight"):
                t = 1.0 + 0.1 * t
            elif not (k.endswith("embedding.weight") or k == "shared.weight" or "relative_attention_bias" in k):
                t = t * 0.02
            t = t.to(torch.bfloat16)
            linear = t.dim() == 2 and ".layer." in k and k.endswith(".weight")
            sd[k] = quantize(t, "fp8_e4m3fn_scaled").to_device("cpu") if fmt == "fp8" and linear else t.cpu()
        write_safetensors(path, sd)
        del sd
    return out


def scenario(name, workdir, files):
    """Runs in its own process; prints one JSON line."""
    import resource

    import torch
    sys.argv = [sys.argv[0]] + ([] if torch.cuda.is_available() else ["--cpu"])
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    import comfy.options
    comfy.options.enable_args_parsing()
    import folder_paths
    folder_paths.add_model_folder_path("text_encoders", workdir, is_default=True)
    # each scenario its own cache, except the hit, which reads what gpu_then_release wrote
    folder_paths.set_user_directory(os.path.join(workdir, "user_" + ("gpu_then_release" if name == "hit" else name)))
    import comfy.sd

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    allocated = torch.cuda.memory_allocated if cuda else (lambda: 0)
    free = (lambda: torch.cuda.mem_get_info()[0]) if cuda else (lambda: 0)
    clip_l, t5 = sorted(files)  # clip_l.safetensors < t5xxl_*.safetensors
    sync()
    base, free0 = allocated(), free()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.inference_mode():
        if name == "core":
            from kontext_lowvram.cli import load_bench
            load_bench().stub_missing_pyav()
            from comfy_extras.nodes_flux import CLIPTextEncodeFlux
            clip = comfy.sd.load_clip(ckpt_paths=[files[clip_l], files[t5]], clip_type=comfy.sd.CLIPType.FLUX,
                                      embedding_directory=None)
            if hasattr(CLIPTextEncodeFlux, "execute"):  # v0.29: comfy_api io.ComfyNode
                cond = CLIPTextEncodeFlux.execute(clip, "a cat", "make the cat blue", 2.5)
            else:
                cond = CLIPTextEncodeFlux().encode(clip, "a cat", "make the cat blue", 2.5)
        else:
            from kontext_lowvram.nodes.text_encoder import LowVRAMTextEncode, LowVRAMTextEncoderLoader
            policy = "gpu_then_release" if name == "hit" else name
            clip = LowVRAMTextEncoderLoader().load(clip_l, t5, policy)[0]
            cond = LowVRAMTextEncode().encode(clip, "a cat", "make the cat blue", 2.5, cache=True)
            loaded = bool(getattr(clip, "klv_loaded", None))
    cond = cond[0] if isinstance(cond, tuple) else cond
    if hasattr(cond, "result"):  # v0.29 io.NodeOutput
        cond = cond.result[0]
    sync()
    secs = time.perf_counter() - t0
    held = (allocated() - base) / 2 ** 30
    held_dev = (free0 - free()) / 2 ** 30
    print(json.dumps({"scenario": name, "s": round(secs, 2), "vram_held_gib": round(held, 3),
                      "vram_held_device_gib": round(held_dev, 3),
                      "peak_vram_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else 0, 2),
                      "peak_ram_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
                      "encoder_loaded": None if name == "core" else loaded,
                      "cond_shape": list(cond[0][0].shape),
                      "cond_norm": round(float(cond[0][0].float().norm()), 3)}), flush=True)


def main(args):
    os.makedirs(args.workdir, exist_ok=True)
    import shutil
    for d in os.listdir(args.workdir):
        if d.startswith("user_"):
            shutil.rmtree(os.path.join(args.workdir, d))
    t = time.perf_counter()
    files = write_files(args.workdir, args.t5, args.tiny)
    print(f"wrote {list(files)} in {time.perf_counter() - t:.0f} s", flush=True)
    rows = []
    for name in args.scenarios:
        proc = subprocess.run([sys.executable, __file__, "--scenario", name, "--workdir", args.workdir,
                               "--files", json.dumps(files)], capture_output=True, text=True)
        line = [l for l in proc.stdout.splitlines() if l.startswith("{")]
        if proc.returncode or not line:
            print(f"{name}: FAILED rc={proc.returncode}\n{proc.stderr[-3000:]}", flush=True)
            continue
        rows.append(json.loads(line[-1]))
        print(line[-1], flush=True)
    import torch
    print(f"\ndevice: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, torch {torch.__version__}, ComfyUI at "
          f"{os.environ['COMFYUI_PATH']}, {time.strftime('%Y-%m-%d')}; CLIP-L bf16 + T5-XXL {args.t5}")
    print("| scenario | load+encode s | VRAM held after (torch / device) GiB | peak VRAM GiB | peak RAM GiB | encoder loaded |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scenario']} | {r['s']} | {r['vram_held_gib']} / {r['vram_held_device_gib']} | "
              f"{r['peak_vram_gib']} | {r['peak_ram_gib']} | {r['encoder_loaded']} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--t5", choices=["fp8", "bf16"], default="fp8")
    p.add_argument("--workdir", default="/tmp/klv_te_check")
    p.add_argument("--scenarios", nargs="+", default=SCENARIOS, choices=SCENARIOS)
    p.add_argument("--tiny", action="store_true", help="tiny encoders (smoke test of this script; core rejects them)")
    p.add_argument("--scenario", help=argparse.SUPPRESS)
    p.add_argument("--files", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.scenario:
        scenario(a.scenario, a.workdir, json.loads(a.files))
    else:
        main(a)
