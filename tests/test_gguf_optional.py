"""Without the gguf package every non-GGUF model still loads and runs, and a .gguf file says what to install.
Run in a child interpreter where `import gguf` fails (sys.modules["gguf"] = None), as on an install without it."""
import json
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent('''
    import json, sys
    sys.modules["gguf"] = None  # any `import gguf` now raises ImportError
    import torch
    from safetensors.torch import save_file
    import kontext_lowvram.nodes  # registration imports nothing GGUF
    from kontext_lowvram.loaders import ModelFileError, load_model_file, quantize_state_dict
    from kontext_lowvram.loaders.flux_layout import FluxConfig, flux_tensor_shapes
    from kontext_lowvram.loaders.writers import write_safetensors
    from kontext_lowvram.optimizations import QTensor, dequantize
    from kontext_lowvram.optimizations.ops import QuantLinear

    tmp = sys.argv[1]
    cfg = FluxConfig(hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1, context_in_dim=256, vec_in_dim=256)
    sd = {k: (torch.randn(shape) * 0.02).to(torch.bfloat16) for k, shape in flux_tensor_shapes(cfg).items()}
    key = "double_blocks.0.img_attn.qkv.weight"
    out = {}
    for fmt in ("bf16", "fp8_e4m3fn_scaled", "nf4"):
        path = f"{tmp}/{fmt}.safetensors"
        if fmt == "bf16":
            save_file(sd, path)
        else:
            write_safetensors(path, quantize_state_dict(sd, fmt))
        loaded, info = load_model_file(path)
        w = loaded[key]
        x = torch.randn(3, w.shape[1])
        if isinstance(w, QTensor):
            y = QuantLinear(w)(x)
        else:
            y = x @ w.float().T
        ref = x @ dequantize(w, torch.float32).T
        out[fmt] = {"quantized": isinstance(w, QTensor), "err": float((y - ref).abs().max())}
    try:
        load_model_file(f"{tmp}/bf16.safetensors", convert="q8_0")
        out["convert_q8_0"] = "loaded"
    except ImportError as e:
        out["convert_q8_0"] = str(e)
    open(f"{tmp}/m.gguf", "wb").write(b"GGUF" + bytes(60))
    try:
        load_model_file(f"{tmp}/m.gguf")
        out["gguf"] = "loaded"
    except ModelFileError as e:
        out["gguf"] = str(e)
    print(json.dumps(out))
''')


def test_everything_but_gguf_runs_without_the_gguf_package(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not out["bf16"]["quantized"] and out["fp8_e4m3fn_scaled"]["quantized"] and out["nf4"]["quantized"]
    for fmt in ("bf16", "fp8_e4m3fn_scaled", "nf4"):
        assert out[fmt]["err"] < 1e-4, (fmt, out[fmt])
    assert "pip install gguf" in out["convert_q8_0"]
    assert "m.gguf" in out["gguf"] and "pip install gguf" in out["gguf"]
