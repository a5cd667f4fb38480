"""The converter streams: a model 4x larger (same widths, 4x the blocks, so the same largest tensor) does not raise
the converting process's peak RSS 4x. Each conversion runs in a fresh child process, which reports its own
peak resident set (VmHWM); a child that only imports the same modules gives the baseline."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from kontext_lowvram.loaders.flux_layout import FluxConfig, flux_tensor_shapes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak RSS is read from /proc/self/status")

# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the parent (pytest, which wrote the models)
CHILD = r"""
import json, sys
import torch, gguf, safetensors
from kontext_lowvram.loaders.convert import convert
if sys.argv[1] != "--baseline":
    r = convert(sys.argv[1], sys.argv[2], sys.argv[3])
    assert r.overall_error is not None
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print(json.dumps({"maxrss_mb": int(hwm) / 1024}))
"""


def cfg(blocks):
    return FluxConfig(hidden_size=1024, num_heads=8, depth=blocks, depth_single_blocks=blocks, context_in_dim=1024)


def write_model(path, c):
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.empty(s, dtype=torch.float32).normal_(0, 0.02, generator=g).to(torch.bfloat16)
          for k, s in flux_tensor_shapes(c).items()}
    save_file(sd, str(path))
    return sum(v.numel() * 2 for v in sd.values())


def peak_mb(*args):
    out = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["maxrss_mb"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    small, big = d / "small.safetensors", d / "big.safetensors"
    sizes = (write_model(small, cfg(2)), write_model(big, cfg(8)))  # ~0.23 GB and ~0.87 GB of bf16
    return d, small, big, sizes


@pytest.mark.parametrize("to,suffix", [("F16", ".gguf"), ("fp8_e4m3fn_scaled", ".safetensors")])
def test_peak_rss_does_not_grow_with_the_model(models, to, suffix):
    d, small, big, (small_bytes, big_bytes) = models
    largest = max(s[0] * s[1] for s in flux_tensor_shapes(cfg(8)).values() if len(s) == 2) * 4 / 2**20  # MB, f32
    base = peak_mb("--baseline")
    grow_small = peak_mb(small, d / f"small-{to}{suffix}", to) - base
    grow_big = peak_mb(big, d / f"big-{to}{suffix}", to) - base
    print(f"{to}: baseline {base:.0f} MB; +{grow_small:.0f} MB for {small_bytes / 2**20:.0f} MB, "
          f"+{grow_big:.0f} MB for {big_bytes / 2**20:.0f} MB (largest tensor {largest:.0f} MB in float32)")
    assert big_bytes > 3.5 * small_bytes
    assert grow_big < 1.3 * grow_small + 64  # 4x the model, about the same peak (not ~4x)
    assert grow_big < 0.5 * big_bytes / 2**20  # far below the model's size
    assert grow_big < 12 * largest  # a few times the largest tensor
