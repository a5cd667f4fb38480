"""`kontext-lowvram` command line: `demo` (the README's first command), `info FILE` and `bench` (GPU)."""
import argparse
import importlib.util
import os
import sys
import tempfile
import time

DEMO_FORMATS = [
    # (label, writer, conversion)
    ("bf16 safetensors", "safetensors", "none"),
    ("fp8 e4m3fn scaled", "safetensors", "fp8_e4m3fn_scaled"),
    ("fp8 e5m2 scaled", "safetensors", "fp8_e5m2_scaled"),
    ("fp8 comfy_quant", "safetensors:comfy_quant", "fp8_e4m3fn_scaled"),
    ("nf4 (bitsandbytes)", "safetensors", "nf4"),
    ("GGUF Q8_0", "gguf", "Q8_0"),
    ("GGUF Q5_1", "gguf", "Q5_1"),
    ("GGUF Q5_0", "gguf", "Q5_0"),
    ("GGUF Q4_1", "gguf", "Q4_1"),
    ("GGUF Q4_0", "gguf", "Q4_0"),
]


def _write(path, sd, writer):
    from .loaders.writers import write_gguf, write_safetensors
    if writer == "gguf":
        return write_gguf(path, sd)
    return write_safetensors(path, sd, fp8_style="comfy_quant" if writer.endswith("comfy_quant") else "scaled")


def _dequant_all(sd, device, dtype):
    import torch
    from .optimizations import QTensor, dequantize
    moved = {k: v.to_device(device) for k, v in sd.items() if isinstance(v, QTensor)}
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    for v in list(moved.values())[:1]:
        dequantize(v, dtype)  # warm-up (kernel/lazy init)
    sync()
    t0 = time.perf_counter()
    n = 0
    for v in moved.values():
        n += dequantize(v, dtype).numel()
    sync()
    return n, time.perf_counter() - t0


def random_flux_weights(cfg, seed):
    """Random bf16 values in the FLUX key layout of `cfg` (weights N(0, 0.02), norm scales near 1): a checkpoint to
    write in every format and read back, not a model to run."""
    import torch
    from .loaders.flux_layout import flux_tensor_shapes
    gen = torch.Generator().manual_seed(seed)
    return {k: (1 + 0.01 * torch.randn(shape, generator=gen) if k.endswith("_norm.scale")
                else 0.02 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
            for k, shape in flux_tensor_shapes(cfg).items()}


def demo(args):
    import torch
    from .loaders import load_model_file, quantize_state_dict
    from .loaders.flux_layout import FluxConfig
    from .optimizations import QTensor, dequantize

    cfg = FluxConfig(hidden_size=args.hidden, num_heads=args.hidden // 128, depth=args.double, depth_single_blocks=args.single)
    print(f"Synthetic FLUX-layout transformer: hidden {cfg.hidden_size}, {cfg.depth} double + {cfg.depth_single_blocks} "
          f"single blocks, {cfg.num_params / 1e6:.1f} M params (random weights, real key layout)")
    ref = random_flux_weights(cfg, args.seed)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for label, writer, conv in DEMO_FORMATS:
            path = os.path.join(tmp, "model" + (".gguf" if writer == "gguf" else ".safetensors"))
            _write(path, ref if conv == "none" else quantize_state_dict(ref, conv), writer)
            t0 = time.perf_counter()
            sd, info = load_model_file(path)
            load_s = time.perf_counter() - t0
            assert info["flux_config"] == cfg, "loader detected a different architecture"
            num = den = 0.0
            for k, v in ref.items():
                d = dequantize(sd[k]).double() - v.double()
                num += float(d.pow(2).sum())
                den += float(v.double().pow(2).sum())
            speeds = []
            for dev in devices:
                n, s = _dequant_all(sd, dev, torch.bfloat16)
                speeds.append(f"{n / s / 1e6:,.0f}" if n else "—")
            nq = sum(isinstance(v, QTensor) for v in sd.values())
            rows.append((label, os.path.getsize(path), info.get("format") or ", ".join(info.get("tensor_types", {})),
                         (num / den) ** 0.5, nq, load_s, speeds))
            os.remove(path)
    bf16_size = rows[0][1]
    head = ["format", "file MB", "vs bf16", "detected as", "rel. L2 error vs bf16", "quantized tensors", "load s"] + \
           [f"dequant Mparam/s ({d})" for d in devices]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for label, size, detected, err, nq, load_s, speeds in rows:
        cells = [label, f"{size / 2**20:.1f}", f"{size / bf16_size:.2f}x", detected, f"{err:.2e}", str(nq),
                 f"{load_s:.2f}"] + speeds
        print("| " + " | ".join(cells) + " |")
    print("\nEvery file was written in its real on-disk layout, detected from its bytes and read back through "
          "kontext_lowvram.loaders; errors are against the bf16 weights it was made from.")
    return 0


def info(args):
    from .loaders import ModelFileError, load_model_file
    from .optimizations import QTensor
    try:
        sd, inf = load_model_file(args.file)
    except ModelFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    q = [v for v in sd.values() if isinstance(v, QTensor)]
    print(f"file: {inf['file']} ({inf['file_bytes'] / 2**30:.2f} GiB, {inf['container']})")
    print(f"format: {inf.get('format') or inf.get('tensor_types')}")
    print(f"architecture: {inf['flux_config']}")
    print(f"tensors: {len(sd)} ({len(q)} quantized)")
    return 0


# The GPU benchmark is a tool of the source checkout (tools/ is not installed with the package).
BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools", "bench.py")
BENCH_MODULE = "kontext_lowvram_bench"


def load_bench():
    """tools/bench.py as a module (loaded once), or None where this install has no source checkout around it."""
    if BENCH_MODULE not in sys.modules:
        if not os.path.isfile(BENCH):
            return None
        spec = importlib.util.spec_from_file_location(BENCH_MODULE, BENCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[BENCH_MODULE] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[BENCH_MODULE]
            raise
    return sys.modules[BENCH_MODULE]


def bench(argv):
    module = load_bench()
    if module is None:
        print("kontext-lowvram bench runs from a git checkout of comfyui-kontext-lowvram (tools/bench.py is not "
              "installed with the package): clone it, `pip install -e .` there and run it again", file=sys.stderr)
        return 2
    return module.main(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # every option after it is the bench's own (tools/bench.py parses them)
        return bench(argv[1:])
    p = argparse.ArgumentParser(prog="kontext-lowvram", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="build a synthetic FLUX checkpoint, write it in every format, load each back, print a table")
    d.add_argument("--hidden", type=int, default=1024, help="transformer width (FLUX.1 is 3072); a multiple of 256")
    d.add_argument("--double", type=int, default=2, help="double-stream blocks (FLUX.1: 19)")
    d.add_argument("--single", type=int, default=4, help="single-stream blocks (FLUX.1: 38)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--workdir", default=None, help="where temporary model files go (default: system temp)")
    d.set_defaults(fn=demo)
    i = sub.add_parser("info", help="detect a model file's format and architecture")
    i.add_argument("file")
    i.set_defaults(fn=info)
    sub.add_parser("bench", add_help=False, help="full-size FLUX s/step / peak VRAM per format vs ComfyUI core and "
                                                 "ComfyUI-GGUF (CUDA GPU and COMFYUI_PATH needed; runs tools/bench.py "
                                                 "of a source checkout: `kontext-lowvram bench --help`)")
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
