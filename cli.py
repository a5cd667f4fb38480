"""`kontext-lowvram` command line: `demo` (the README's first command), `inspect FILE` (alias `info`), `compare A B`,
`plan` and `bench` (GPU)."""
import argparse
import contextlib
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
    keep = args.keep
    with (contextlib.nullcontext(keep) if keep else tempfile.TemporaryDirectory(dir=args.workdir)) as out_dir:
        for i, (label, writer, conv) in enumerate(DEMO_FORMATS):
            print(f"[{i + 1}/{len(DEMO_FORMATS)}] {label}: writing, reading back, dequantizing ...", flush=True)
            name = "model-" + label.split(" (")[0].lower().replace(" ", "-")
            path = os.path.join(out_dir, name + (".gguf" if writer == "gguf" else ".safetensors"))
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
            if not keep:
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
    if keep:
        print(f"The files are in {keep}: try `kontext-lowvram inspect {os.path.join(keep, 'model-gguf-q8_0.gguf')}`.")
    return 0


def _hash_progress():
    """sha256 progress on stderr where a person watches it (a terminal), else nothing."""
    if not sys.stderr.isatty():
        return None
    last = [-1]

    def report(done, total):
        pct = int(100 * done / max(total, 1))
        if pct != last[0]:
            last[0] = pct
            print(f"\rsha256: {pct} %", end="" if done < total else "\r\033[K", file=sys.stderr, flush=True)
    return report


def sidecar_lines(path, digest, write: bool):
    """(lines, exit status) for the file's sha256 sidecar: matches / none / does not match (1) / unreadable (1)."""
    from .loaders import ModelFileError, integrity
    name = os.path.basename(integrity.sidecar_path(path))
    try:
        expected = integrity.read_sidecar(path)
    except ModelFileError as e:
        if not write:
            return [f"sidecar: {e}"], 1
        expected = None
    if write:
        integrity.write_sidecar(path)
        return [f"sidecar: wrote {name}" + (" (the old one did not match)" if expected not in (None, digest) else "")], 0
    if expected is None:
        return ["sidecar: none (`kontext-lowvram inspect --write-sidecar FILE` or `sha256sum FILE > FILE.sha256` "
                "writes one; the loaders then check the file before loading it)"], 0
    if expected == digest:
        return [f"sidecar: {name} matches"], 0
    return [f"sidecar: does not match: {integrity.mismatch_error(path, digest, expected)}"], 1


def inspect(args):
    from .loaders import ModelFileError, integrity
    from .loaders.identify import describe, identify
    try:
        sd, inf = identify(args.file)
    except ModelFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(describe(sd, inf)))
    if getattr(args, "no_hash", False):
        print("sha256: not computed (--no-hash)")
        return 0
    digest, _ = integrity.file_digest(args.file, _hash_progress())
    lines, status = sidecar_lines(args.file, digest, getattr(args, "write_sidecar", False))
    print("\n".join([f"sha256: {digest}"] + lines))
    return status


info = inspect  # the subcommand's first name


def compare(args):
    from .loaders.images import read_image, same_channels
    from .optimizations import image_compare as ic
    try:
        a, b = same_channels(read_image(args.a), read_image(args.b))
        ic.check_same_size(a, b, names=(args.a, args.b))
        result = ic.compare(a, b)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lines = [f"a: {args.a}", f"b: {args.b}", f"size: {ic.size_text(a.shape)}"] + ic.summary_lines(result)
    if args.heatmap:
        from PIL import Image
        gain = ic.auto_gain(result.max_abs)
        heat = ic.heat_map(a, b, gain).mul(255).round().byte().numpy()
        Image.fromarray(heat, "RGB").save(args.heatmap)
        lines.append(f"heat map: {args.heatmap} (white = a difference of {1 / gain:.4g} or more)")
    print("\n".join(lines))
    return 0


def _multiple_of(n):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if v <= 0 or v % n:
            raise argparse.ArgumentTypeError(f"{v} is not a positive multiple of {n}")
        return v
    return parse


def _count_arg(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= v <= 64:
        raise argparse.ArgumentTypeError(f"{v} blocks: choose 0 to 64")
    return v


def _writable_dir(text):
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder (create it first)")
    if not os.access(text, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text!r} is not writable")
    return text


def _resolution(text):
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 1024x1024") from None
    if w < 64 or h < 64:
        raise argparse.ArgumentTypeError("width and height must be at least 64")
    return w, h


def _positive(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GB") from None
    if v <= 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return v


def add_plan_parser(sub):
    pl = sub.add_parser("plan", help="which model files and settings fit your GPU, with the VRAM/RAM peak per phase")
    pl.add_argument("--vram", type=_positive, required=True, help="the card's memory in GB, e.g. 8, 12, 16, 24")
    pl.add_argument("--ram", type=_positive, default=None, help="system RAM in GB (checked when given)")
    pl.add_argument("--resolution", type=_resolution, default=(1024, 1024), help="WIDTHxHEIGHT of the edit")
    pl.add_argument("--references", type=int, default=1, choices=range(0, 5), metavar="N",
                    help="reference images (Kontext: 1; multi-reference: 2-4)")
    pl.add_argument("--steps", type=int, default=20, help="sampling steps (shown; memory does not depend on them)")
    pl.add_argument("--model", default="kontext", choices=("kontext", "flux2-dev", "flux2-klein-4b", "flux2-klein-9b"),
                    help="the model: FLUX.1 Kontext [dev] (measured) or FLUX.2 [dev] / [klein] 4B / 9B (estimates)")
    pl.add_argument("--headless", action="store_true", help="the card drives no display (less is kept back)")
    pl.set_defaults(fn=plan_main)
    return pl


def plan_main(args):
    from .optimizations.planner import Request, format_plan, plan
    p = plan(Request(vram_gib=args.vram, ram_gib=args.ram, width=args.resolution[0], height=args.resolution[1],
                     references=args.references, steps=args.steps, model=args.model, desktop=not args.headless))
    print(format_plan(p))
    return 0 if p.fits else 1


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
    d.add_argument("--hidden", type=_multiple_of(256), default=1024,
                   help="transformer width (FLUX.1 is 3072); a multiple of 256")
    d.add_argument("--double", type=_count_arg, default=2, help="double-stream blocks (FLUX.1: 19)")
    d.add_argument("--single", type=_count_arg, default=4, help="single-stream blocks (FLUX.1: 38)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--workdir", type=_writable_dir, default=None,
                   help="where temporary model files go (default: system temp)")
    d.add_argument("--keep", type=_writable_dir, default=None, metavar="DIR",
                   help="write the files into DIR and keep them (to try `inspect` on), instead of a temporary folder")
    d.set_defaults(fn=demo)
    i = sub.add_parser("inspect", aliases=["info"], help="a weights file's architecture, format, size, tensor types, "
                                                          "estimated VRAM and sha256 (checked against its sidecar)")
    i.add_argument("file")
    i.add_argument("--no-hash", action="store_true", help="skip the sha256 (it reads the whole file)")
    i.add_argument("--write-sidecar", action="store_true",
                   help="write FILE.sha256 (sha256sum's format), which the loaders check before loading FILE")
    i.set_defaults(fn=inspect)
    c = sub.add_parser("compare", help="PSNR, SSIM and mean absolute difference of two images of the same size")
    c.add_argument("a", help="an image file (PNG, JPEG, WebP, ...)")
    c.add_argument("b", help="the image to compare it with")
    c.add_argument("--heatmap", metavar="OUT.png", help="also write where they differ: |a-b| amplified so the "
                                                       "largest difference is white")
    c.set_defaults(fn=compare)
    add_plan_parser(sub)
    from .cli_convert import add_convert_parser  # `convert`: its own module
    add_convert_parser(sub)
    sub.add_parser("bench", add_help=False, help="full-size FLUX s/step / peak VRAM per format vs ComfyUI core and "
                                                 "ComfyUI-GGUF (CUDA GPU and COMFYUI_PATH needed; runs tools/bench.py "
                                                 "of a source checkout: `kontext-lowvram bench --help`)")
    args = p.parse_args(argv)
    return args.fn(args)


def _run_as_file():
    """`python .../custom_nodes/comfyui-kontext-lowvram/cli.py ...` from a git-clone install, where the pack is no
    installed package: import it by path under its package name, then run its CLI."""
    import importlib.util
    root = os.path.dirname(os.path.abspath(__file__))
    if "kontext_lowvram" not in sys.modules:
        spec = importlib.util.spec_from_file_location("kontext_lowvram", os.path.join(root, "__init__.py"),
                                                      submodule_search_locations=[root])
        sys.modules["kontext_lowvram"] = importlib.util.module_from_spec(spec)  # its registration is not needed
    from kontext_lowvram import cli
    return cli.main()


if __name__ == "__main__":
    sys.exit(main() if __package__ else _run_as_file())
