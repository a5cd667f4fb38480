"""llama.cpp's own GGUF quantizer as a reference: build ggml's base library from a llama-cpp-python sdist and call
`ggml_quantize_chunk` through ctypes.

The PyPI sdist of llama-cpp-python vendors llama.cpp's sources (vendor/llama.cpp/ggml). This tool extracts only
ggml/ from it into a cache folder outside the repository, builds the `ggml-base` library there (ggml.c,
ggml-quants.c and friends: the library llama-quantize calls into) with cmake when it is installed, else with a direct
cc/c++ compile of the same sources, and wraps

    size_t ggml_quantize_chunk(enum ggml_type type, const float * src, void * dst,
                               int64_t start, int64_t nrows, int64_t n_per_row, const float * imatrix);

(the signature of ggml.h in llama-cpp-python 0.3.36; the wrapper checks ggml's type enum, names and block sizes
against gguf-py's GGMLQuantizationType on load). Nothing of llama.cpp is copied into the repository.

The build uses ggml's own Release flags (-O3, no -march: ggml-base is portable code, only the CPU backend gets
native flags), so on x86-64 its float arithmetic is plain SSE2 single precision without FMA contraction: the
arithmetic of a stock llama-quantize build.

Usage (SDIST may also come from the env KLV_LLAMACPP_SDIST; the cache is KLV_LLAMACPP_CACHE, default
~/.cache/kontext_lowvram/llamacpp; KLV_LLAMACPP_LIB may name an already built libggml-base.so instead):
    python tools/llamacpp_reference.py build    [--sdist SDIST]      build (once) and print the library path
    python tools/llamacpp_reference.py fixtures [--sdist SDIST]      regenerate tests/fixtures/llamacpp/*.npy
    python tools/llamacpp_reference.py check    [--sdist SDIST]      rel-L2 of llama.cpp on N(0, 0.02) per type
Get an sdist with: pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d DIR
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "llamacpp"
LIB_NAME = "libggml-base.so"
GGML_PREFIX = "vendor/llama.cpp/ggml/"
CMAKE_OPTIONS = ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=OFF", "-DGGML_BACKEND_DL=OFF",
                 "-DGGML_OPENMP=OFF", "-DGGML_CCACHE=OFF", "-DGGML_BUILD_TESTS=OFF", "-DGGML_BUILD_EXAMPLES=OFF"]
# the direct build: ggml-base's compile definitions and ggml's Release flags, as its CMakeLists sets them
DIRECT_DEFINES = ["-DNDEBUG", "-DGGML_BUILD", "-DGGML_SHARED", "-DGGML_SCHED_MAX_COPIES=4", "-D_GNU_SOURCE",
                  "-D_XOPEN_SOURCE=600"]


def sdist_from(arg: str | None = None) -> Path | None:
    value = arg or os.environ.get("KLV_LLAMACPP_SDIST")
    return Path(value).expanduser() if value else None


def cache_root() -> Path:
    if os.environ.get("KLV_LLAMACPP_CACHE"):
        return Path(os.environ["KLV_LLAMACPP_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "kontext_lowvram" / "llamacpp"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _build_dir(sdist: Path, cache: Path | None = None) -> Path:
    stem = re.sub(r"\.(tar\.gz|tgz|zip)$", "", sdist.name)
    # name + size keeps the lookup cheap (no hashing of 70 MB); build.json records the full sha256
    return (cache or cache_root()) / f"{stem}-{sdist.stat().st_size}"


def built_library(sdist: Path | None = None, cache: Path | None = None) -> Path | None:
    """The library built earlier for `sdist` (default: KLV_LLAMACPP_SDIST), or the one KLV_LLAMACPP_LIB names, or
    None; never builds."""
    if sdist is None and os.environ.get("KLV_LLAMACPP_LIB"):
        lib = Path(os.environ["KLV_LLAMACPP_LIB"]).expanduser()
        return lib if lib.is_file() else None
    sdist = sdist or sdist_from()
    if sdist is None or not sdist.is_file():
        return None
    lib = _build_dir(sdist, cache) / LIB_NAME
    return lib if lib.is_file() else None


def _extract_ggml(sdist: Path, dest: Path) -> Path:
    """Extract <top>/vendor/llama.cpp/ggml/ of the sdist into dest; returns the ggml folder."""
    with tarfile.open(sdist) as tar:
        members = []
        for m in tar.getmembers():
            parts = m.name.split("/", 1)
            if len(parts) == 2 and parts[1].startswith(GGML_PREFIX) and (m.isfile() or m.isdir()):
                if m.name.startswith("/") or ".." in Path(m.name).parts:
                    raise RuntimeError(f"unsafe path in sdist: {m.name}")
                members.append(m)
        if not members:
            raise RuntimeError(f"{sdist} has no {GGML_PREFIX} (not a llama-cpp-python sdist?)")
        try:
            tar.extractall(dest, members=members, filter="data")
        except TypeError:  # Python without extraction filters (the members were checked above)
            tar.extractall(dest, members=members)
        top = members[0].name.split("/", 1)[0]
    return dest / top / GGML_PREFIX


def _base_sources(ggml: Path) -> list[str]:
    """The source files of add_library(ggml-base ...) in ggml/src/CMakeLists.txt."""
    text = (ggml / "src" / "CMakeLists.txt").read_text()
    m = re.search(r"add_library\(ggml-base\s+(.*?)\)", text, re.S)
    if not m:
        raise RuntimeError("ggml/src/CMakeLists.txt has no add_library(ggml-base ...)")
    return [s for s in m.group(1).split() if s.endswith((".c", ".cpp"))]


def _run(cmd: list[str], log) -> None:
    log("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")


def _build_cmake(ggml: Path, work: Path, log) -> tuple[Path, list[str]]:
    # The sdist omits ggml.pc.in (only used to write a pkg-config file at install); configure_file needs one.
    pc = ggml / "ggml.pc.in"
    if not pc.exists():
        pc.write_text("")
    build = work / "cmake-build"
    _run(["cmake", "-S", str(ggml), "-B", str(build), *CMAKE_OPTIONS], log)
    _run(["cmake", "--build", str(build), "--target", "ggml-base", "-j", str(os.cpu_count() or 2)], log)
    libs = sorted(p for p in build.rglob("libggml-base.so*") if p.is_file() and not p.is_symlink())
    if not libs:
        raise RuntimeError("cmake built no libggml-base.so")
    flags = (build / "src" / "CMakeFiles" / "ggml-base.dir" / "flags.make")
    return libs[0], [line for line in flags.read_text().splitlines() if line.startswith("C_FLAGS")]


def _build_direct(ggml: Path, work: Path, log) -> tuple[Path, list[str]]:
    cc, cxx = shutil.which("cc") or shutil.which("gcc"), shutil.which("c++") or shutil.which("g++")
    if not cc or not cxx:
        raise RuntimeError("neither cmake nor a C and C++ compiler (cc, c++) found")
    gen = work / "gen"
    gen.mkdir(parents=True, exist_ok=True)
    text = (ggml / "CMakeLists.txt").read_text()
    version = ".".join(re.search(rf"set\(GGML_VERSION_{k} (\d+)\)", text).group(1)
                       for k in ("MAJOR", "MINOR", "PATCH"))
    (gen / "ggml-version.h").write_text(f'#pragma once\n#define GGML_VERSION "{version}"\n#define GGML_COMMIT "unknown"\n')
    src, objs = ggml / "src", []
    inc = [f"-I{gen}", f"-I{src}", f"-I{ggml / 'include'}"]
    for name in _base_sources(ggml):
        obj = work / (name.replace("/", "_") + ".o")
        if name.endswith(".c"):
            cmd = [cc, "-O3", "-fPIC", "-std=gnu11", *DIRECT_DEFINES, *inc, "-c", str(src / name), "-o", str(obj)]
        else:
            cmd = [cxx, "-O3", "-fPIC", "-std=gnu++17", *DIRECT_DEFINES, *inc, "-c", str(src / name), "-o", str(obj)]
        _run(cmd, log)
        objs.append(str(obj))
    lib = work / LIB_NAME
    _run([cxx, "-shared", "-o", str(lib), *objs, "-lm", "-lpthread"], log)
    return lib, ["C_FLAGS = -O3 -fPIC -std=gnu11 " + " ".join(DIRECT_DEFINES)]


def build(sdist: Path | None = None, cache: Path | None = None, method: str = "auto", log=print) -> Path:
    """Build ggml-base from the sdist into the cache (once); returns the library path."""
    sdist = sdist or sdist_from()
    if sdist is None:
        raise RuntimeError("no sdist: pass --sdist or set KLV_LLAMACPP_SDIST (pip download --no-deps --no-binary "
                           ":all: llama-cpp-python==0.3.36 -d DIR)")
    if not sdist.is_file():
        raise FileNotFoundError(sdist)
    out = _build_dir(sdist, cache)
    lib = out / LIB_NAME
    if lib.is_file():
        return lib
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        work = Path(tmp)
        ggml = _extract_ggml(sdist, work / "src")
        use_cmake = method == "cmake" or (method == "auto" and shutil.which("cmake"))
        built, flags = (_build_cmake if use_cmake else _build_direct)(ggml, work, log)
        shutil.copy2(built, out / (LIB_NAME + ".tmp"))
        (out / "build.json").write_text(json.dumps({
            "sdist": sdist.name, "sdist_sha256": _sha256(sdist), "method": "cmake" if use_cmake else "direct",
            "flags": flags}, indent=1))
        os.replace(out / (LIB_NAME + ".tmp"), lib)
    return lib


class LlamaCpp:
    """ctypes wrapper of ggml-base's quantizer."""

    def __init__(self, lib_path: Path | str):
        self.path = str(lib_path)
        lib = self.lib = ctypes.CDLL(self.path)
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_type_name.restype = ctypes.c_char_p
        lib.ggml_type_name.argtypes = [ctypes.c_int]
        lib.ggml_blck_size.restype = ctypes.c_int64
        lib.ggml_blck_size.argtypes = [ctypes.c_int]
        lib.ggml_type_size.restype = ctypes.c_size_t
        lib.ggml_type_size.argtypes = [ctypes.c_int]
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib.ggml_version.restype = ctypes.c_char_p
        self.version = lib.ggml_version().decode()
        self.check_types()

    def check_types(self, types=None) -> None:
        """ggml's enum value, name and block geometry of each type equal gguf-py's (a version skew would show)."""
        for qt in types or [GGMLQuantizationType[n] for n in ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1",
                                                                 "Q4_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")]:
            name = self.lib.ggml_type_name(int(qt))
            geometry = (self.lib.ggml_blck_size(int(qt)), self.lib.ggml_type_size(int(qt)))
            if name is None or name.decode().upper() != qt.name or geometry != tuple(GGML_QUANT_SIZES[qt]):
                raise RuntimeError(f"ggml type {int(qt)} is {name!r} {geometry}, gguf-py says {qt.name} "
                                   f"{GGML_QUANT_SIZES[qt]}")

    def quantize(self, qtype, x: np.ndarray, threads: int = 1) -> np.ndarray:
        """float32 (nrows, n_per_row) -> uint8 (nrows, row bytes), llama.cpp's non-imatrix path (imatrix=NULL).
        `threads` > 1 splits the rows over threads (ggml_quantize_chunk is thread-safe and releases the GIL)."""
        qt = GGMLQuantizationType(int(qtype)) if not isinstance(qtype, str) else GGMLQuantizationType[qtype]
        if self.lib.ggml_quantize_requires_imatrix(int(qt)):
            raise ValueError(f"{qt.name} needs an importance matrix")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2:
            raise ValueError("x must be 2-D (nrows, n_per_row)")
        nrows, n_per_row = x.shape
        block = GGML_QUANT_SIZES[qt][0]
        if n_per_row % block:
            raise ValueError(f"row length {n_per_row} is not a multiple of the {qt.name} block size {block}")
        row_size = self.lib.ggml_row_size(int(qt), n_per_row)
        out = np.zeros((nrows, row_size), dtype=np.uint8)

        def run(r0, r1):
            done = self.lib.ggml_quantize_chunk(int(qt), x.ctypes.data, out.ctypes.data, r0 * n_per_row, r1 - r0,
                                                n_per_row, None)
            if done != (r1 - r0) * row_size:
                raise RuntimeError(f"ggml_quantize_chunk wrote {done} bytes, expected {(r1 - r0) * row_size}")

        if nrows == 0:
            return out
        bounds = np.linspace(0, nrows, min(max(threads, 1), nrows) + 1).astype(int)
        if len(bounds) == 2:
            run(0, nrows)
        else:
            with ThreadPoolExecutor(len(bounds) - 1) as pool:
                list(pool.map(lambda ab: run(*ab), zip(bounds[:-1], bounds[1:])))
        return out


def load(sdist: Path | None = None, build_if_missing: bool = True, log=print) -> LlamaCpp:
    lib = built_library(sdist) or (build(sdist, log=log) if build_if_missing else None)
    if lib is None:
        raise RuntimeError("llama.cpp reference library not built")
    return LlamaCpp(lib)


def rel_l2(x: np.ndarray, blocks: np.ndarray, qtype) -> float:
    """||x - dequant(blocks)|| / ||x||, dequantized by gguf-py."""
    import gguf.quants
    back = gguf.quants.dequantize(blocks, GGMLQuantizationType[qtype] if isinstance(qtype, str) else qtype)
    x64 = x.astype(np.float64)
    return float(np.linalg.norm(back.astype(np.float64) - x64) / np.linalg.norm(x64))


# ------------------------------------------------------------------------------------------------- commands
def _fixture_module():
    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures import llamacpp
    return llamacpp


def write_fixtures(ref: LlamaCpp, sdist: Path, out: Path = FIXTURES) -> dict:
    """llama.cpp's blocks of each K-quant type for each fixture input, as <type>.<input>.npy uint8."""
    fx = _fixture_module()
    inputs = fx.inputs()
    build_info = Path(ref.path).with_name("build.json")
    manifest = {"llama_cpp_python_sdist": sdist.name, "sdist_sha256": _sha256(sdist), "ggml_version": ref.version,
                "build": json.loads(build_info.read_text()) if build_info.is_file() else None,
                "inputs": {k: {"shape": list(v.shape), "sha256": hashlib.sha256(v.tobytes()).hexdigest()}
                           for k, v in inputs.items()},
                "rel_l2": {}}
    out.mkdir(parents=True, exist_ok=True)
    for qtype in fx.TYPES:
        for name, x in inputs.items():
            blocks = ref.quantize(qtype, x)
            np.save(out / fx.fixture_name(qtype, name), blocks)
            with np.errstate(all="ignore"):
                manifest["rel_l2"][f"{qtype}.{name}"] = rel_l2(x, blocks, qtype)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


ARCHITECTURE_RELL2 = {"Q8_0": 0.0053, "Q6_K": 0.018, "Q5_K": 0.036, "Q4_K": 0.071, "Q3_K": 0.15}


def check_architecture(ref: LlamaCpp, rows: int = 1024, cols: int = 3072, seed: int = 0) -> list[tuple]:
    """llama.cpp's rel-L2 on N(0, 0.02) weights per type, beside the numbers quoted in ARCHITECTURE.md."""
    x = (np.random.default_rng(seed).standard_normal((rows, cols)) * 0.02).astype(np.float32)
    out = []
    for qtype in ("Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K"):
        out.append((qtype, rel_l2(x, ref.quantize(qtype, x, threads=os.cpu_count() or 1), qtype),
                    ARCHITECTURE_RELL2.get(qtype)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=["build", "fixtures", "check"])
    ap.add_argument("--sdist", help="llama-cpp-python sdist (.tar.gz); default $KLV_LLAMACPP_SDIST")
    ap.add_argument("--method", choices=["auto", "cmake", "direct"], default="auto")
    ap.add_argument("--out", default=str(FIXTURES), help="fixtures folder (fixtures command)")
    args = ap.parse_args(argv)
    sdist = sdist_from(args.sdist)
    lib = build(sdist, method=args.method, log=lambda s: print(s, file=sys.stderr))
    ref = LlamaCpp(lib)
    if args.command == "build":
        print(lib)
    elif args.command == "fixtures":
        manifest = write_fixtures(ref, sdist, Path(args.out))
        for k, v in manifest["rel_l2"].items():
            print(f"{k:24s} rel-L2 {v:.5f}")
    else:
        print(f"llama.cpp (ggml {ref.version}) on N(0, 0.02), 1024x3072: rel-L2")
        print("| type | llama.cpp rel-L2 | ARCHITECTURE.md |")
        print("|---|---|---|")
        for qtype, err, quoted in check_architecture(ref):
            print(f"| {qtype} | {err * 100:.2f} % | {'' if quoted is None else f'{quoted * 100:.2g} %'} |")


if __name__ == "__main__":
    main()
