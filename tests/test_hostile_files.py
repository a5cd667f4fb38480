"""Hostile model files: every reader entry point (load_model_file, read_text_encoder, the CLI's `info`, the GGUF
header validator, read_header) must reject a malformed file with a ModelFileError naming it, quickly and in bounded
memory, and must still accept real ones. The cases are in hostile_cases.py.

Each case runs in its own forked child with a memory cap (address space +512 MiB) and a time cap (isolated_harness),
so a reader that loops on a hostile count or balloons fails its own case instead of taking the run down. One
harness process serves the whole module; each case is still its own test.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hostile_cases import CASES
from isolated_harness import MEMORY_CAP, ONE_THREAD_ENV

# fork, RLIMIT_AS and /proc/self/status are what make the caps work
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the isolation harness needs Linux")

HARNESS = Path(__file__).with_name("isolated_harness.py")
# A rejected file may make the process grow by at most this much (peak RSS): the validator reads the header with
# bounded reads, so even a 64 MiB hostile file costs a few MB. A reader that trusted a count would blow past it.
REJECT_PEAK_GROWTH = 256 << 20


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    built, specs = {}, []
    for case in CASES:
        path = folder / (case.id + case.suffix)
        built[case.id] = (path, case.build(path))
        specs.append({"id": case.id, "action": case.action, "path": str(path), "time_cap": case.time_cap})
    cases_json, results_json = folder / "cases.json", folder / "results.json"
    cases_json.write_text(json.dumps(specs))
    wall = sum(c.time_cap + 10 for c in CASES) + 120  # a backstop only: every case has its own caps
    proc = subprocess.run([sys.executable, str(HARNESS), str(cases_json), str(results_json)],
                          capture_output=True, text=True, timeout=wall, env={**os.environ, **ONE_THREAD_ENV})
    assert proc.returncode == 0, f"harness failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = json.loads(results_json.read_text())
    return {cid: (*built[cid], results[cid]) for cid in built}


def _error_of(case, out):
    """(exception type name, message) of a rejection; the CLI reports one as exit code 2 plus stderr."""
    if case.action == "info" and out["ok"]:
        value = out["value"]
        return ("ModelFileError" if value["rc"] == 2 else f"exit code {value['rc']}"), value["stderr"]
    return out.get("exc_type"), out.get("message", "")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_file(case, outcomes):
    path, expected, out = outcomes[case.id]
    assert not out.get("signal") and not out.get("wall_killed") and out.get("exit_code") is None, \
        f"the case hit its time cap ({case.time_cap} s) or died: {out}"
    assert not out.get("memory_error_in_chain") and out.get("peak_vm_growth", 0) < MEMORY_CAP - (16 << 20), \
        f"the case hit the memory cap ({MEMORY_CAP >> 20} MiB more address space): {out}"
    if case.check is not None:
        assert out["ok"], f"a valid file was rejected: {out}"
        verdict = case.check(out["value"], expected)
        assert verdict is None or verdict, f"unexpected values: {out['value']} (built: {expected})"
        return
    exc_type, message = _error_of(case, out)
    assert exc_type == "ModelFileError", f"not rejected with ModelFileError: {out}"
    assert str(path) in message, message
    detail = message.replace(str(path), "")  # the path holds the case id: it must not satisfy `expect`
    for text in case.expect:
        assert text in detail, f"{text!r} missing from: {message}"
    assert out["peak_growth"] < REJECT_PEAK_GROWTH, f"rejecting took {out['peak_growth'] >> 20} MiB"
