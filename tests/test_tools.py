"""tools/reader_memory.py (the measurement behind BENCHMARKS.md's GGUF reader table) still runs, at a small size."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reader_memory_script_runs():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "reader_memory.py"), "20000"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 20,000")]
    assert len(rows) == 2 and all(row.endswith("| yes |") for row in rows), proc.stdout
