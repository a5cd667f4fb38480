"""tools/bench_convert.py (BENCHMARKS.md's "Converter" section) still runs, at a tiny size."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_convert_runs(tmp_path):
    out = tmp_path / "bench.md"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_convert.py"), "--hidden", "256",
                           "--types", "Q8_0", "fp8_e4m3fn_scaled", "--rss-hidden", "256", "--rss-blocks", "1", "2",
                           "--workdir", str(tmp_path), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text.count("\n| Q8_0 |") == 1 and text.count("\n| fp8_e4m3fn_scaled |") == 1
    assert "| 1 double + 1 single blocks |" in text and "| 2 double + 2 single blocks |" in text
    assert "Command: `python tools/bench_convert.py --hidden 256" in text
    assert sorted(os.listdir(tmp_path)) == ["bench.md"]  # the model files are gone
