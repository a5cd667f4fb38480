"""Run model-file cases each in a forked child under a memory cap (RLIMIT_AS) and a time cap (SIGALRM), so a file
that hangs a reader or balloons its memory fails its own case instead of killing the test run.

    python isolated_harness.py CASES.json RESULTS.json

CASES is a list of {"id", "action", "path", "time_cap"}; run it with ONE_THREAD_ENV added to the environment.
torch and the package are imported once, here; every case is a fork of this process, so it starts warm and nothing
it does leaks into the next. Each result says how the case ended: returned a value, raised (type, message, whether
a MemoryError was anywhere in the exception chain: a reader may re-wrap one into a tidy error), was killed (signal),
or ran past the wall time; and the peak RSS growth, which shows a balloon even when the exception hides it.
"""
import contextlib
import gc
import io
import json
import os
import resource
import select
import signal
import sys
import time

# Address space a case may add to what it had at fork (torch alone maps ~630 MiB). The largest normal case (T5 text
# encoder, soak) adds ~280 MiB with one compute thread (each extra thread adds a malloc arena, hence the harness
# runs with OMP_NUM_THREADS=1 and MALLOC_ARENA_MAX=2); gguf-py looping on a 2^60-element array reaches 512 MiB in
# ~9 s on a 2-core box, so this cap, not just the time cap, is what stops it.
MEMORY_CAP = 512 << 20
WALL_SLACK_S = 5  # past the SIGALRM time cap, the parent kills the child outright
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}  # see MEMORY_CAP


def status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


# ---- what a case can do with its file; each returns a small JSON-able value ----

def _load(path):
    from kontext_lowvram.loaders import load_model_file
    sd, info = load_model_file(path)
    return {"tensors": len(sd), "tensor_types": info.get("tensor_types"), "format": info.get("format"),
            "hidden_size": info["flux_config"].hidden_size}


def _text(path):
    from kontext_lowvram.loaders.text_encoders import read_text_encoder
    sd, info = read_text_encoder(path)
    return {"tensors": len(sd), "kind": info["kind"]}


def _info(path):
    import argparse

    from kontext_lowvram import cli
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.info(argparse.Namespace(file=path))
    return {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}


def _validate(path):
    from kontext_lowvram.loaders.gguf_header import validate_gguf_header
    return validate_gguf_header(path)._asdict()


def _reader(path):
    from kontext_lowvram.loaders.gguf_loader import open_reader
    r = open_reader(path)
    return {"tensors": len(r.tensors), "fields": sorted(r.fields)}


def _st_header(path):
    from kontext_lowvram.loaders.safetensors_header import read_header
    header, metadata = read_header(path)
    return {"tensors": sorted(header), "metadata": metadata}


def _without_gguf(path):
    sys.modules["gguf"] = None  # every later `import gguf` raises ImportError, as on a host without the package
    return _load(path)


def _reader_cost(path):
    """RSS growth while gguf-py parses the file, next to what the validator estimated for it."""
    import gguf

    from kontext_lowvram.loaders.gguf_header import validate_gguf_header
    estimate = validate_gguf_header(path).reader_bytes
    gc.collect()
    before = status_bytes("VmRSS")
    reader = gguf.GGUFReader(path)
    growth = status_bytes("VmRSS") - before
    return {"estimate": estimate, "growth": growth, "fields": len(reader.fields)}


def _soak(path, rounds=50):
    """Load and dequantize the file `rounds` times; RSS after each round (no gc.collect between rounds: it takes
    0.15 s with torch loaded, and a state dict freed only by the cycle collector is worth seeing)."""
    from kontext_lowvram.loaders import load_model_file
    from kontext_lowvram.optimizations import QTensor, dequantize
    rss = []
    for _ in range(rounds):
        sd, _info = load_model_file(path)
        total = sum(float(dequantize(t).abs().sum()) for t in sd.values() if isinstance(t, QTensor))
        del sd, _info
        rss.append(status_bytes("VmRSS"))
    return {"rss": rss, "checksum": total}


ACTIONS = {"load": _load, "text": _text, "info": _info, "validate": _validate, "reader": _reader,
           "st_header": _st_header, "without_gguf": _without_gguf, "reader_cost": _reader_cost, "soak": _soak}


def _unwind(e):
    """Whether a MemoryError is anywhere in e's chain; drops every traceback on it, so the frames (and a reader's
    ballooned objects they hold) are freed before the result is built."""
    seen, memory_error = set(), False
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        memory_error = memory_error or isinstance(e, MemoryError)
        e.__traceback__ = None
        e = e.__cause__ or e.__context__
    return memory_error


def _child(case, wfd):
    vm0 = status_bytes("VmSize")
    resource.setrlimit(resource.RLIMIT_AS, (vm0 + MEMORY_CAP, resource.RLIM_INFINITY))
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # the default action kills: no handler the code under test
    signal.alarm(case["time_cap"])                 # could catch and turn into a tidy error
    rss0 = status_bytes("VmRSS")
    error = None
    try:
        out = {"ok": True, "value": ACTIONS[case["action"]](case["path"])}
    except BaseException as e:  # noqa: B036 - every way out is a result
        error = e
    signal.alarm(0)
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))  # room to report
    if error is not None:
        memory_error = _unwind(error)
        gc.collect()
        out = {"ok": False, "exc_type": type(error).__name__, "message": str(error)[:4000],
               "memory_error_in_chain": memory_error}
    out["peak_growth"] = status_bytes("VmHWM") - rss0
    out["peak_vm_growth"] = status_bytes("VmPeak") - vm0
    data = json.dumps(out).encode()
    while data:
        data = data[os.write(wfd, data):]
    os._exit(0)


def run_case(case):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            _child(case, w)
        finally:
            os._exit(3)
    os.close(w)
    deadline, chunks, wall_killed = time.monotonic() + case["time_cap"] + WALL_SLACK_S, [], False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            os.kill(pid, signal.SIGKILL)
            wall_killed = True
            break
        if select.select([r], [], [], left)[0]:
            chunk = os.read(r, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if chunks and not wall_killed and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return json.loads(b"".join(chunks))
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None  # SIGALRM: the time cap; SIGKILL: OOM or wall
    return {"ok": False, "exc_type": None, "signal": signal.Signals(sig).name if sig else None,
            "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None, "wall_killed": wall_killed}


def main(cases_path, results_path):
    # Imported once, before the forks, so each case starts warm (gguf alone takes 0.1 s to import).
    import gguf  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    import kontext_lowvram.cli  # noqa: F401
    import kontext_lowvram.loaders.gguf_loader  # noqa: F401
    import kontext_lowvram.loaders.safetensors_loader  # noqa: F401
    import kontext_lowvram.loaders.text_encoders  # noqa: F401
    with open(cases_path) as f:
        cases = json.load(f)
    results = {}
    for case in cases:
        t0 = time.monotonic()
        results[case["id"]] = run_case(case)
        results[case["id"]]["wall_s"] = round(time.monotonic() - t0, 3)
    with open(results_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
