"""`kontext-lowvram convert`: success prints the summary; bad inputs exit 2 with one clear line."""
import os
import subprocess
import sys

import pytest
from safetensors.torch import save_file

from fixtures.flux import random_flux_state_dict, random_flux_vae_state_dict
from kontext_lowvram import cli
from kontext_lowvram.loaders.flux_layout import FluxConfig

CFG = FluxConfig(hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1, context_in_dim=256, vec_in_dim=256,
                 mlp_ratio=1.0)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "flux.safetensors"
    save_file(random_flux_state_dict(CFG, seed=2), str(path))
    return str(path)


def test_convert_prints_the_summary_and_names_files_in_a_folder(src, tmp_path, capsys):
    assert cli.main(["convert", src, str(tmp_path), "--to", "q4_k_m"]) == 0
    out = capsys.readouterr().out
    assert "flux.safetensors -> flux-Q4_K_M.gguf (Q4_K_M)" in out and "relative L2 error" in out
    assert sorted(os.listdir(tmp_path)) == ["flux-Q4_K_M.gguf", "flux-Q4_K_M.gguf.sha256"]
    assert cli.main(["convert", src, str(tmp_path / "f.gguf"), "--to", "Q8_0", "--no-verify"]) == 0
    assert "not verified (--no-verify)" in capsys.readouterr().out


def test_existing_output_needs_force(src, tmp_path, capsys):
    out = tmp_path / "f.gguf"
    out.write_bytes(b"keep me")
    assert cli.main(["convert", src, str(out), "--to", "Q8_0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists; pass --force" in err and str(out) in err
    assert out.read_bytes() == b"keep me"
    assert cli.main(["convert", src, str(out), "--to", "Q8_0", "--force", "--no-verify"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"


def test_bad_inputs_exit_2_naming_the_problem(src, tmp_path, capsys):
    vae = tmp_path / "ae.safetensors"
    save_file(random_flux_vae_state_dict(), str(vae))
    missing = tmp_path / "nope.safetensors"
    cases = [
        ([str(missing), str(tmp_path / "o.gguf"), "--to", "Q8_0"], [str(missing), "no such file"]),
        ([str(vae), str(tmp_path / "o.gguf"), "--to", "Q8_0"], [str(vae), "is a VAE"]),
        ([src, str(tmp_path / "o.safetensors"), "--to", "Q8_0"], ["ending in .gguf"]),
        ([src, src, "--to", "BF16"], ["ending in .gguf"]),
        ([src, str(tmp_path / "no" / "o.gguf"), "--to", "Q8_0"], ["does not exist"]),
    ]
    for argv, words in cases:
        assert cli.main(["convert", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and all(w in err for w in words), err
    assert os.listdir(tmp_path) == ["ae.safetensors"]


def test_unknown_type_is_an_argparse_error_listing_the_types(src, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", src, str(tmp_path / "o.gguf"), "--to", "Q9_K"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown type 'Q9_K'" in err and "Q4_K_M" in err and "fp8_e4m3fn_scaled" in err


def test_help_lists_every_type():
    from kontext_lowvram.loaders.convert_mix import TYPES
    out = subprocess.run([sys.executable, "-m", "kontext_lowvram.cli", "convert", "--help"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and all(t in out.stdout for t in TYPES)
    assert "--force" in out.stdout and "--no-verify" in out.stdout
