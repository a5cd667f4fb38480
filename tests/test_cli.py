"""`kontext-lowvram bench` forwards to tools/bench.py of the source checkout, and says so where there is none."""
import sys

from kontext_lowvram import cli


def test_bench_forwards_every_option_to_tools_bench(monkeypatch, capsys):
    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    assert cli.main(["bench", "--steps", "1"]) == 2  # tools/bench.py parsed the options and asked for ComfyUI
    assert "bench needs ComfyUI" in capsys.readouterr().err


def test_bench_without_a_source_checkout_says_where_to_run_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "BENCH", str(tmp_path / "tools" / "bench.py"))
    monkeypatch.delitem(sys.modules, cli.BENCH_MODULE, raising=False)
    assert cli.main(["bench", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "git checkout" in err and "tools/bench.py" in err
