"""What gguf-py's GGUFReader costs in RSS per metadata item, against what loaders/gguf_header.py estimates: the
measurement behind its per-item costs and its 768 MiB budget (BENCHMARKS.md). Each file is parsed in a fresh
process. Usage: python tools/reader_memory.py [N]  (N string elements, N numeric elements; default 1,000,000)"""
import os
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

CHILD = """
import sys, gguf
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) * 1024
before = rss()
reader = gguf.GGUFReader(sys.argv[1])
print(rss() - before)
"""


def main():
    from gguf_bytes import I32, STRING, f32_tensor_file, kv_array, kv_str, string_array_body

    from kontext_lowvram.loaders.gguf_header import validate_gguf_header
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    cases = {
        f"{n:,} strings": kv_array("tokenizer.ggml.tokens", STRING, n, string_array_body(b"<tok%07d>" % i for i in range(n))),
        f"{n:,} int32": kv_array("tokenizer.ggml.token_type", I32, n, struct.pack(f"<{n}i", *[1] * n)),
    }
    print("| metadata | RSS growth in GGUFReader MiB | bytes per element | header estimate MiB | accepted |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for label, kv in cases.items():
            path = os.path.join(tmp, "m.gguf")
            with open(path, "wb") as f:
                f.write(f32_tensor_file([("t.weight", [8])], [kv_str("general.architecture", "llama"), kv]))
            grown = int(subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True,
                                       check=True).stdout)
            try:
                est, ok = validate_gguf_header(path).reader_bytes, "yes"
            except ValueError as e:  # over the budget: the estimate is in the message's reasoning, not returned
                est, ok = None, f"no ({str(e).split(': ', 2)[-1][:60]}…)"
            print(f"| {label} | {grown / 2**20:.0f} | {grown / n:.0f} | "
                  f"{'—' if est is None else f'{est / 2**20:.0f}'} | {ok} |")


if __name__ == "__main__":
    main()
