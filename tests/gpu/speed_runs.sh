#!/usr/bin/env bash
# The speed measurements (issue 4) in a few GPU calls of under ten minutes each. Run from the repository root on
# a CUDA machine; the tables go to stdout and are appended to ${OUT:-.}/bench-<part>.md for BENCHMARKS.md.
#
#   COMFYUI_PATH=... GGUF_NODE_PATH=... bash tests/gpu/speed_runs.sh kernels  # exactness, fused kernels, tile sweep
#   COMFYUI_PATH=... GGUF_NODE_PATH=... bash tests/gpu/speed_runs.sh ratios   # every ratio the targets name, one run
#   COMFYUI_PATH=... bash tests/gpu/speed_runs.sh lora        # LoRA cost: our LoRA node and core's LoRA loader
#   COMFYUI_PATH=... bash tests/gpu/speed_runs.sh fusedlora   # LoRA merged in the dequant kernel (opt-in)
#   COMFYUI_PATH=... bash tests/gpu/speed_runs.sh others      # Q5_K, nf4 (+ fused small-batch matmul)
#   COMFYUI_PATH=<v0.3.64> GGUF_NODE_PATH=... bash tests/gpu/speed_runs.sh ratios   # the same on v0.3.64
#   COMFYUI_PATH=... GGUF_NODE_PATH=... bash tests/gpu/speed_runs.sh small    # an 8 GiB card (ballast), v0.29
#   bash tests/gpu/speed_runs.sh compile   # torch.compile of every Triton path (kernel_check.py --quick)
#   COMFYUI_PATH=<v0.29> bash tests/gpu/speed_runs.sh flux2   # FLUX.2 [klein] 4B / 9B and [dev]: core bf16 vs ours
#
# All of it is more than one session's 30 minutes of device time: run ratios, kernels, lora, fusedlora first (they
# decide which opt-in kernels become defaults), then v0.3.64 ratios, small, others, compile.
#
# COMFYUI_PATH: a ComfyUI checkout (v0.29 is the one to beat); GGUF_NODE_PATH: city96/ComfyUI-GGUF, for its rows.
# "fused" rows switch on the opt-in kernels (KLV_FUSED_MATMUL, KLV_FUSED_LORA) for that row only, "rowwise" the
# per-row fp8 activation scales (KLV_FP8_ROWWISE). `python tests/gpu/kernel_check.py --cpu-smoke` rehearses the
# kernels part on a CPU; tests/integration/test_bench_smoke.py the bench flow.
set -euo pipefail
part=${1:?"usage: speed_runs.sh kernels|ratios|lora|fusedlora|others|small|compile|flux2"}
out=${OUT:-.}
bench() { python3 tools/bench.py "$@" --profile --out "$out/bench-$part.md"; }

case "$part" in
  kernels)  # ~3 min on an H100
    python3 tests/gpu/kernel_check.py --sweep --no-compile | tee "$out/kernels.md" ;;
  ratios)   # ~7 min: core bf16 / fp8, ours Q8_0 / Q4_K / fp8 (+ fused, + per-row fp8 scales), ComfyUI-GGUF Q8_0 / Q4_K
    bench --steps 4 --formats Q8_0 Q4_K fp8_e4m3fn_scaled --gguf-formats Q8_0 Q4_K --lora --include core fused rowwise ;;
  lora)     # ~8 min, 11 rows: one rank-32 LoRA on core bf16 and on ours (Q8_0, Q4_K, fp8: low-rank on the fp8
            # matmul), through our LoRA node and through core's LoRA loader (its per-forward patches as low-rank
            # deltas, or fp8 merged and requantized), each beside its LoRA-free row
    bench --steps 4 --formats Q8_0 Q4_K fp8_e4m3fn_scaled --gguf-formats --lora Q8_0 Q4_K fp8_e4m3fn_scaled \
      --include corelora ;;
  fusedlora)  # ~7 min, 10 rows: the LoRA merged in the dequant kernel (KLV_FUSED_LORA) beside the default merge
    bench --steps 4 --formats Q8_0 Q4_K --gguf-formats --lora Q8_0 Q4_K --include fused ;;
  others)   # ~4 min, 5 rows: the remaining K-quant and nf4, with the fused small-batch matmul
    bench --steps 4 --formats Q5_K nf4 --gguf-formats --lora --include fused ;;
  small)    # ~8 min: 8 GiB of VRAM left to the run (dynamic VRAM and offloading at work)
    bench --steps 3 --vram-gb 8 --formats Q8_0 Q4_K fp8_e4m3fn_scaled --gguf-formats Q8_0 Q4_K --lora \
      --include core ;;
  compile)  # ~4 min: Inductor compiles of the dequant, fused matmul, LoRA merge and fp8 linear paths, on two shapes
    python3 tests/gpu/kernel_check.py --quick | tee "$out/compile.md" ;;
  flux2)    # ~9 min (estimate; FLUX.2 never ran on a GPU here): full-size random FLUX.2, 1024^2 + one reference
            # (8704 tokens); [dev] bf16 is 64 GB, so core's row needs an 80 GB+ card (H100/H200)
    bench --model flux2-klein-4b --steps 3 --formats Q8_0 Q4_K fp8_e4m3fn_scaled --gguf-formats --lora --include core
    bench --model flux2-klein-9b --steps 3 --formats Q8_0 Q4_K --gguf-formats --lora --include core
    bench --model flux2-dev --steps 2 --formats Q8_0 Q4_K --gguf-formats --lora --include core ;;
  *) echo "unknown part: $part" >&2; exit 2 ;;
esac
