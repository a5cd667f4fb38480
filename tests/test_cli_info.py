"""`kontext-lowvram info FILE`: plain words and numbers, the file named on bad input."""
import pytest

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
