"""Speed and accuracy of our GGUF quantizers (optimizations/quant/gguf_quantize.py) beside llama.cpp's own.

Speed: Mparam/s of each type's quantize function on random N(0, 0.02) weights of each --shape, on --device
(best of --repeat runs; wall clock, plus CPU time on CPU, since a shared machine's wall clock moves with its load;
the load average is printed). Accuracy, when the llama.cpp reference library is built (tools/llamacpp_reference.py,
KLV_LLAMACPP_SDIST / KLV_LLAMACPP_LIB): rel-L2 error of ours and of llama.cpp on Gaussian N(0, 0.02) and
Student-t(3) * 0.02 weights (--acc-shape), their ratio, the share of byte-identical blocks, and llama.cpp's
single-threaded speed for scale. Markdown on stdout.

Usage: python tools/bench_quantize.py [--types Q4_K,Q8_0] [--shape 3072x3072 --shape 12288x3072] [--threads N]
"""
import argparse
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from kontext_lowvram.optimizations.quant import gguf_quantize as gqz

ROOT = Path(__file__).resolve().parent.parent
TYPES = ["Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K"]


def _reference():
    spec = importlib.util.spec_from_file_location("llamacpp_reference", ROOT / "tools" / "llamacpp_reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    lib = mod.built_library()
    return (mod, mod.LlamaCpp(lib)) if lib else (mod, None)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ours(qtype, w, repeat):
    fn = gqz.QUANTIZE_FUNCTIONS[qtype]
    fn(w[:1])  # warm-up
    best_wall = best_cpu = float("inf")
    for _ in range(repeat):
        _sync(w.device)
        c0, t0 = time.process_time(), time.perf_counter()
        fn(w)
        _sync(w.device)
        best_wall = min(best_wall, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return best_wall, best_cpu


def rel_l2(x, blocks, qtype):
    import gguf.quants
    back = gguf.quants.dequantize(blocks, qtype).astype(np.float64)
    return float(np.linalg.norm(back - x) / np.linalg.norm(x.astype(np.float64)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--shape", action="append", help="ROWSxCOLS (default 3072x3072 and 12288x3072)")
    ap.add_argument("--acc-shape", default="1024x3072")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-accuracy", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    types = [Q[t.strip().upper()] for t in args.types.split(",")]
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in (args.shape or ["3072x3072", "12288x3072"])]

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"CPU {cpu} x{os.cpu_count()}, torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
          f"load average at start {os.getloadavg()[0]:.1f}")
    print()
    head = "| type | " + " | ".join(f"{r}x{c} Mparam/s" for r, c in shapes)
    print(head + (" | CPU-time Mparam/s (last shape) |" if device.type == "cpu" else " |"))
    print("|---" * (len(shapes) + 1 + (device.type == "cpu")) + "|")
    gen = torch.Generator(device="cpu").manual_seed(0)
    weights = {s: (torch.randn(s, generator=gen) * 0.02).to(device) for s in shapes}
    for qtype in types:
        cells, cpu_cell = [], ""
        for s in shapes:
            wall, cpu_s = time_ours(qtype, weights[s], args.repeat)
            n = s[0] * s[1]
            cells.append(f"{n / wall / 1e6:,.1f}")
            cpu_cell = f"{n / cpu_s / 1e6:,.1f}"
        print(f"| {qtype.name} | " + " | ".join(cells) + (f" | {cpu_cell} |" if device.type == "cpu" else " |"))
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")

    if args.no_accuracy:
        return
    _, ref = _reference()
    if ref is None:
        print("\n(llama.cpp reference not built: no accuracy table; see tools/llamacpp_reference.py)")
        return
    r, c = (int(v) for v in args.acc_shape.lower().split("x"))
    rng = np.random.default_rng(1)
    inputs = {"N(0,0.02)": (rng.standard_normal((r, c)) * 0.02).astype(np.float32),
              "t(3)*0.02": (rng.standard_t(3, (r, c)) * 0.02).astype(np.float32)}
    print(f"\nAccuracy vs llama.cpp (ggml {ref.version}, ggml_quantize_chunk without imatrix), {r}x{c}:\n")
    print("| type | weights | rel-L2 ours | rel-L2 llama.cpp | ratio | blocks byte-identical "
          "| llama.cpp Mparam/s (1 thread) |")
    print("|---|---|---|---|---|---|---|")
    for qtype in types:
        type_size = GGML_QUANT_SIZES[qtype][1]
        for name, x in inputs.items():
            t0 = time.perf_counter()
            theirs = ref.quantize(qtype, x)
            ref_speed = x.size / (time.perf_counter() - t0) / 1e6
            ours = gqz.QUANTIZE_FUNCTIONS[qtype](torch.from_numpy(x).to(device)).cpu().numpy()
            e_ours, e_theirs = rel_l2(x, ours, qtype), rel_l2(x, theirs, qtype)
            same = (ours.reshape(-1, type_size) == theirs.reshape(-1, type_size)).all(axis=1).mean()
            print(f"| {qtype.name} | {name} | {e_ours * 100:.3f} % | {e_theirs * 100:.3f} % | {e_ours / e_theirs:.4f} "
                  f"| {same * 100:.2f} % | {ref_speed:,.1f} |")


if __name__ == "__main__":
    sys.exit(main())
