"""Converter speed and memory on this machine (the numbers behind BENCHMARKS.md's "Converter" section).

    python tools/bench_convert.py [--hidden 3072 --blocks 1] [--types Q8_0 Q4_K_M ...] [--out BENCHMARKS.md]

1. Speed: a synthetic FLUX-layout transformer (random N(0, 0.02) bf16 weights, real key names; by default FLUX.1's
   widths with 1 double + 1 single block, 0.56 G params, 1.1 GB) is converted to each type with verification on;
   Mparam/s and MB/s are over the conversion alone (read, quantize, write), verification is timed apart.
2. Memory: two models of the same widths, one 4x the blocks of the other, are converted in fresh child processes,
   each reporting its peak resident set (VmHWM) over a child that only imports the same modules.
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import save_file

from kontext_lowvram.loaders.convert import convert
from kontext_lowvram.loaders.convert_mix import TARGETS, TYPES
from kontext_lowvram.loaders.flux_layout import FluxConfig, flux_tensor_shapes

CHILD = r"""
import json, sys
import torch, gguf, safetensors
from kontext_lowvram.loaders.convert import convert
if sys.argv[1] != "--baseline":
    convert(sys.argv[1], sys.argv[2], sys.argv[3])
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print(json.dumps({"peak_mb": int(hwm) / 1024}))
"""


def write_model(path, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.empty(s, dtype=torch.float32).normal_(0, 0.02, generator=g).to(torch.bfloat16)
          for k, s in flux_tensor_shapes(cfg).items()}
    save_file(sd, str(path))
    return sum(v.numel() * 2 for v in sd.values())


def child_peak(*args):
    out = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def device_line():
    cpu = "CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from importlib.metadata import version
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = os.getloadavg()[0]
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()}; torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), gguf {version('gguf')}, safetensors {version('safetensors')}; "
            f"load average {load:.1f} at the start (other jobs share this machine: the last columns say how busy "
            "it was)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=3072)
    p.add_argument("--blocks", type=int, default=1, help="double and single blocks of the speed model")
    p.add_argument("--types", nargs="*", default=list(TYPES))
    p.add_argument("--rss-hidden", type=int, default=1024)
    p.add_argument("--rss-blocks", type=int, nargs=2, default=(2, 8))
    p.add_argument("--rss-type", default="Q8_0")
    p.add_argument("--workdir", default=None, help="where the model files go (default: a temporary folder)")
    p.add_argument("--out", default=None, help="append the section to this markdown file (e.g. BENCHMARKS.md)")
    p.add_argument("--date", default=datetime.date.today().isoformat(), help="the section's date")
    args = p.parse_args(argv)

    heads = max(1, args.hidden // 128)
    given = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python tools/bench_convert.py"] + given)
    lines = [f"## {args.date} — Converter, CPU (`python tools/bench_convert.py`)", "",
             f"Device: {device_line()}. Command: `{command}`.", ""]
    with tempfile.TemporaryDirectory(dir=args.workdir) as d:
        cfg = FluxConfig(hidden_size=args.hidden, num_heads=heads, depth=args.blocks, depth_single_blocks=args.blocks)
        src = os.path.join(d, "flux-synthetic.safetensors")
        nbytes = write_model(src, cfg)
        lines += [f"Speed: synthetic FLUX-layout transformer, hidden {cfg.hidden_size}, {cfg.depth} double + "
                  f"{cfg.depth_single_blocks} single blocks, {cfg.num_params / 1e9:.2f} G params, "
                  f"{nbytes / 2**30:.2f} GiB bf16 (random N(0, 0.02) weights). Mparam/s and MB/s (of source read) "
                  "cover reading, quantizing and writing; verification (reading the output back, dequantizing it "
                  "with gguf-py / our fp8 and NF4 code and comparing every tensor) is timed apart.", "",
                  "| type | output MB | convert s | Mparam/s | MB/s | verify s | rel. L2 error | load avg after |",
                  "|---|---|---|---|---|---|---|---|"]
        for to in args.types:
            out = os.path.join(d, f"out-{to}{TARGETS[to].suffix}")
            r = convert(src, out, to, force=True)
            row = (f"| {to} | {r.out_bytes / 2**20:,.0f} | {r.convert_s:.1f} | {r.params / 1e6 / r.convert_s:,.1f} | "
                   f"{r.src_bytes / 2**20 / r.convert_s:,.1f} | {r.verify_s:.1f} | {r.overall_error:.2e} | "
                   f"{os.getloadavg()[0]:.1f} |")
            print(row, flush=True)
            lines.append(row)
            os.remove(out)
            os.remove(out + ".sha256")
        os.remove(src)

        small, big = args.rss_blocks
        rc = lambda n: FluxConfig(hidden_size=args.rss_hidden, num_heads=max(1, args.rss_hidden // 128),  # noqa: E731
                                  depth=n, depth_single_blocks=n)
        base = child_peak("--baseline")
        largest = max(s[0] * s[1] for s in flux_tensor_shapes(rc(big)).values() if len(s) == 2) * 2 / 2**20
        lines += ["", f"Peak RSS (VmHWM of a child process, minus {base:.0f} MB for one that only imports the same "
                      f"modules), converting to {args.rss_type} with verification, hidden {args.rss_hidden} "
                      f"(largest tensor {largest:.0f} MB in bf16):", "",
                  "| model | bf16 size MB | peak RSS over baseline MB | load avg after |", "|---|---|---|---|"]
        for n in (small, big):
            path = os.path.join(d, f"rss-{n}.safetensors")
            size = write_model(path, rc(n))
            peak = child_peak(path, os.path.join(d, f"rss-{n}{TARGETS[args.rss_type].suffix}"), args.rss_type) - base
            row = f"| {n} double + {n} single blocks | {size / 2**20:,.0f} | {peak:,.0f} | {os.getloadavg()[0]:.1f} |"
            print(row, flush=True)
            lines.append(row)
            os.remove(path)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
