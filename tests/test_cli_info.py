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
