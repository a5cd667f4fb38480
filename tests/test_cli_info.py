"""`kontext-lowvram inspect FILE` (alias `info`): plain words and numbers, the file named on bad input."""
import pytest
import torch

from kontext_lowvram.cli import main
from kontext_lowvram.loaders import quantize_state_dict
from kontext_lowvram.loaders.writers import write_gguf, write_safetensors


@pytest.mark.parametrize("fmt,suffix,label", [("Q8_0", ".gguf", "Q8_0 x"), ("nf4", ".safetensors", "nf4"),
                                               ("fp8_e4m3fn_scaled", ".safetensors", "fp8 (scaled)")])
def test_info_in_plain_words(tmp_path, capsys, tiny_sd, tiny_cfg, fmt, suffix, label):
    sd = quantize_state_dict({k: v.float() for k, v in tiny_sd.items()}, fmt)
    path = tmp_path / f"m{suffix}"
    write_gguf(path, sd) if suffix == ".gguf" else write_safetensors(path, sd)
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert label in out and f"hidden {tiny_cfg.hidden_size}" in out and "1 double + 1 single blocks" in out
    n_quant = sum(k.startswith(("double_blocks.", "single_blocks.")) and k.endswith(".weight") and v.dim() == 2
                  for k, v in tiny_sd.items())
    assert f"{n_quant} of them quantized" in out and "MiB" in out
    for repr_marker in ("FluxConfig(", "{'", "QTensor("):
        assert repr_marker not in out


def test_info_names_a_bad_file(tmp_path, capsys):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(20))
    assert main(["info", str(bad)]) == 2
    assert "broken.gguf" in capsys.readouterr().err


def test_cli_runs_as_a_file_from_a_git_clone_install(tmp_path):
    """`python custom_nodes/comfyui-kontext-lowvram/cli.py ...` where the pack is not an installed package: run
    with -S (no .pth files, so no editable install), torch reached by its site-packages folder alone."""
    import json
    import os
    import subprocess
    import sys
    import sysconfig

    cli_file = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cli.py")
    site = sysconfig.get_paths()["purelib"]
    code = ("import sys, runpy\n"
            f"sys.path.append({site!r})\n"
            "try:\n    import kontext_lowvram\n    print('INSTALLED')\nexcept ImportError:\n    pass\n"
            f"sys.argv = ['cli.py', 'plan', '--vram', '8']\n"
            f"runpy.run_path({cli_file!r}, run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert "INSTALLED" not in proc.stdout, json.dumps(proc.stdout[:200])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Kontext LowVRAM plan: FLUX.1 Kontext [dev] on 8 GB VRAM" in proc.stdout


def test_demo_keeps_its_files_and_refuses_bad_options(tmp_path, capsys):
    assert main(["demo", "--hidden", "256", "--double", "1", "--single", "1", "--keep", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "[1/10] bf16 safetensors" in out and f"The files are in {tmp_path}" in out
    kept = tmp_path / "model-gguf-q8_0.gguf"
    assert kept.is_file() and main(["info", str(kept)]) == 0
    for bad in (["--hidden", "1000"], ["--hidden", "x"], ["--double", "-1"], ["--workdir", str(tmp_path / "nope")],
                ["--keep", str(kept)]):
        with pytest.raises(SystemExit) as e:
            main(["demo", *bad])
        assert e.value.code == 2


# ---- `kontext-lowvram inspect FILE` (`info` is its alias): architecture, numbers, sha256 and sidecar ----

def _inspect(capsys, *argv):
    rc = main(["inspect", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _line(out, label):
    return next(ln for ln in out.splitlines() if ln.startswith(label + ": "))[len(label) + 2:]


def _mib(n_bytes):
    return f"{n_bytes / 2**20:.1f} MiB"


def _numel(sd):
    return sum(v.numel() for v in sd.values())


def _plain_words(out):
    for repr_marker in ("FluxConfig(", "{'", "QTensor(", "torch.", "dtype="):
        assert repr_marker not in out


@pytest.mark.parametrize("fmt", ["bf16", "fp8_e4m3fn_scaled", "Q8_0"])
def test_inspect_flux_files(tmp_path, capsys, tiny_sd, tiny_cfg, fmt):
    import hashlib
    float_sd = {k: v.float() for k, v in tiny_sd.items()}
    if fmt == "bf16":
        path = tmp_path / "flux1-kontext-dev-tiny.safetensors"
        write_safetensors(path, tiny_sd)
    elif fmt == "Q8_0":
        path = tmp_path / "flux1-schnell-tiny.gguf"
        write_gguf(path, quantize_state_dict(float_sd, fmt))
    else:
        path = tmp_path / "flux1-tiny-fp8.safetensors"
        write_safetensors(path, quantize_state_dict(float_sd, fmt))
    rc, out, _ = _inspect(capsys, str(path))
    assert rc == 0
    _plain_words(out)
    arch = _line(out, "architecture")
    assert arch.startswith("FLUX.1 transformer (") and f"hidden {tiny_cfg.hidden_size}" in arch
    assert ("Kontext, by its file name" in arch) == (fmt == "bf16")
    assert _line(out, "parameters") == f"{_numel(tiny_sd) / 1e6:.1f} M"
    blocks = [k for k, v in tiny_sd.items() if k.startswith(("double_blocks.", "single_blocks.")) and v.dim() == 2
              and k.endswith(".weight")]
    n_quant = 0 if fmt == "bf16" else len(blocks)
    assert _line(out, "tensors") == f"{len(tiny_sd)}, {n_quant} of them quantized"
    others = len(tiny_sd) - n_quant
    types = {"bf16": f"BF16 x{len(tiny_sd)}", "Q8_0": f"F32 x{others}, Q8_0 x{n_quant}",
             "fp8_e4m3fn_scaled": f"F32 x{others}, float8_e4m3fn_scaled x{n_quant}"}[fmt]
    assert _line(out, "tensor types") == types
    assert _line(out, "size").startswith(_mib(path.stat().st_size) + " on disk")
    quant_values = sum(tiny_sd[k].numel() for k in blocks) if n_quant else 0
    per_value = {"bf16": 0, "Q8_0": 34 / 32, "fp8_e4m3fn_scaled": 1}[fmt]  # bytes per quantized value as stored
    vram = 2 * (_numel(tiny_sd) - quant_values) + per_value * quant_values + (4 * n_quant if fmt.startswith("fp8") else 0)
    assert _line(out, "estimated resident VRAM").startswith(_mib(vram))
    assert _line(out, "sha256") == hashlib.sha256(path.read_bytes()).hexdigest()
    assert _line(out, "sidecar").startswith("none")


def test_inspect_text_encoders(tmp_path, capsys):
    import gguf

    from fixtures.text_encoders import random_state_dict
    from kontext_lowvram.loaders.text_encoders import clip_l_tensor_shapes, t5_tensor_shapes
    from t5_files import TINY_T5, write_llamacpp_t5
    t5 = random_state_dict(t5_tensor_shapes(TINY_T5), seed=1, dtype=torch.float32)
    t5_path = tmp_path / "t5-tiny-Q8_0.gguf"
    write_llamacpp_t5(t5_path, t5, gguf.GGMLQuantizationType.Q8_0)
    rc, out, _ = _inspect(capsys, "--no-hash", str(t5_path))
    assert rc == 0 and "sha256: not computed" in out
    _plain_words(out)
    assert _line(out, "architecture") == ("T5 text encoder (not the T5-XXL size FLUX was trained with): width 64, "
                                          "2 layers, 4 heads, feed-forward 128")
    n_q = sum(v.dim() == 2 and v.shape[1] % 32 == 0 for v in t5.values())  # what write_llamacpp_t5 quantizes
    assert _line(out, "tensor types") == f"Q8_0 x{n_q}, F32 x{len(t5) - n_q}"
    assert _line(out, "parameters") == f"{_numel(t5) / 1e6:.1f} M" and _line(out, "format") == "GGUF"

    cfg = {"hidden_size": 768, "intermediate_size": 64, "num_hidden_layers": 2, "vocab_size": 16,
           "max_position_embeddings": 8}
    clip = random_state_dict(clip_l_tensor_shapes(cfg), seed=2)
    clip_path = tmp_path / "clip_l.safetensors"
    write_safetensors(clip_path, {"text_encoders.clip_l.transformer." + k: v for k, v in clip.items()})
    rc, out, _ = _inspect(capsys, "--no-hash", str(clip_path))
    assert rc == 0 and _line(out, "architecture") == "CLIP-L text encoder: width 768, 2 layers"
    assert _line(out, "tensor types") == f"BF16 x{len(clip)}" and _line(out, "tensors") == f"{len(clip)}, 0 of them quantized"
    assert _line(out, "estimated resident VRAM").startswith(_mib(2 * _numel(clip)))


def test_inspect_flux2_and_unknown_files(tmp_path, capsys):
    def blocks(kind, n):
        return {f"{kind}.{i}.linear.weight": torch.zeros(8, 8, dtype=torch.bfloat16) for i in range(n)}
    flux2 = {"img_in.weight": torch.zeros(96, 128, dtype=torch.bfloat16),
             "double_stream_modulation_img.lin.weight": torch.zeros(96, 16, dtype=torch.bfloat16),
             **blocks("double_blocks", 2), **blocks("single_blocks", 3)}
    path = tmp_path / "flux2.safetensors"
    write_safetensors(path, {"model.diffusion_model." + k: v for k, v in flux2.items()})
    rc, out, _ = _inspect(capsys, "--no-hash", str(path))
    assert rc == 0 and _line(out, "architecture").startswith("FLUX.2 transformer: hidden 96, 2 double + 3 single blocks")
    assert _line(out, "parameters") == str(_numel(flux2)) and _line(out, "tensors") == f"{len(flux2)}, 0 of them quantized"

    vae = tmp_path / "vae.safetensors"
    write_safetensors(vae, {"decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)})
    rc, out, _ = _inspect(capsys, "--no-hash", str(vae))
    assert rc == 0 and _line(out, "architecture").startswith("unknown (") and "F32 x1" in out


def test_inspect_checks_and_writes_the_sidecar(tmp_path, capsys, tiny_sd):
    import hashlib
    path = tmp_path / "m.safetensors"
    write_safetensors(path, tiny_sd)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    rc, out, _ = _inspect(capsys, "--write-sidecar", str(path))
    assert rc == 0 and _line(out, "sidecar") == "wrote m.safetensors.sha256"
    assert (tmp_path / "m.safetensors.sha256").read_text() == f"{digest}  m.safetensors\n"
    rc, out, _ = _inspect(capsys, str(path))
    assert rc == 0 and _line(out, "sidecar") == "m.safetensors.sha256 matches"
    (tmp_path / "m.safetensors.sha256").write_text("f" * 64 + "  m.safetensors\n")
    assert main(["info", str(path)]) == 1  # the alias: same command, same answer
    out = capsys.readouterr().out
    side = _line(out, "sidecar")
    assert side.startswith("does not match") and digest in side and "f" * 64 in side and "download it again" in side
    assert "architecture: FLUX.1" in out  # the rest is still reported
    (tmp_path / "m.safetensors.sha256").write_text("garbage\n")
    rc, out, _ = _inspect(capsys, str(path))
    assert rc == 1 and "is not a sha256sum file" in _line(out, "sidecar")
    rc, out, _ = _inspect(capsys, "--write-sidecar", str(path))
    assert rc == 0 and (tmp_path / "m.safetensors.sha256").read_text() == f"{digest}  m.safetensors\n"
