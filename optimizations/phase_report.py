"""Per-phase measurements and the report that words them (plain Python + torch; host/report.py says which prompt,
node and device a phase belongs to).

A phase (``with recorder.phase("denoise", run=..., node=..., device=...) as rec:``) records its wall time, on a
CUDA device the peak VRAM torch allocated and reserved (its peak counters are reset when the phase starts) and the
VRAM in use on the whole device (NVML, when torch or pynvml can reach it), and the peak RAM of this process, which a
background thread samples while the phase runs (psutil, else /proc/self/statm, else getrusage's lifetime peak).
On the CPU there is no VRAM to measure and the report says so.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

#: The phases of one edit, in the order the report lists them.
PHASES = ("model load", "text encode", "VAE encode", "denoise", "VAE decode")
#: Seconds between two RAM / device-memory samples while a phase runs.
SAMPLE_INTERVAL_S = 0.02
#: How many prompts' records a recorder keeps (a phase ComfyUI cached shows the numbers of its earlier run).
KEEP_RUNS = 32

GIB = 2 ** 30


# ---- what can be measured here ------------------------------------------------------------------

def ram_reader() -> Optional[Callable[[], int]]:
    """A function returning this process's resident memory in bytes, or None where none is available."""
    try:
        import psutil
        proc = psutil.Process()
        return lambda: proc.memory_info().rss
    except Exception:  # not installed, or no access: try the next source
        pass
    if os.path.exists("/proc/self/statm"):
        page = os.sysconf("SC_PAGE_SIZE")

        def statm() -> int:
            with open("/proc/self/statm", "rb") as f:
                return int(f.read().split()[1]) * page
        return statm
    return None


def lifetime_peak_ram() -> Optional[int]:
    """The process's peak resident memory since it started (getrusage), the last resort; None without it."""
    try:
        import resource
        import sys
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS counts bytes, Linux KiB
    except Exception:  # no resource module (Windows)
        return None


def device_used_reader(device: torch.device) -> Optional[Callable[[], int]]:
    """A function returning the bytes in use on the whole CUDA `device` (all processes, as nvidia-smi shows), or
    None when neither torch.cuda.device_memory_used nor pynvml can answer."""
    if device.type != "cuda":
        return None
    fn = getattr(torch.cuda, "device_memory_used", None)
    if fn is not None:
        try:
            fn(device)
            return lambda: int(fn(device))
        except Exception:  # torch reaches NVML through pynvml / amdsmi, which may be missing
            pass
    try:
        import pynvml
        pynvml.nvmlInit()
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else "GPU-" + uuid)
        pynvml.nvmlDeviceGetMemoryInfo(handle)
        return lambda: int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:  # no pynvml, no driver access: device-wide use stays unmeasured
        return None


# ---- one phase ----------------------------------------------------------------------------------

@dataclass
class PhaseRecord:
    phase: str
    run: Optional[str] = None          # the prompt it ran in
    node: Optional[str] = None         # the node that ran it
    device: str = "cpu"                # where it computed
    wall_s: float = 0.0
    peak_allocated: Optional[int] = None   # VRAM torch allocated at the peak (CUDA only)
    peak_reserved: Optional[int] = None    # VRAM torch's allocator reserved at the peak
    vram_held: Optional[int] = None        # VRAM allocated at the end minus at the start
    device_used: Optional[int] = None      # peak VRAM in use on the whole device (NVML)
    ram_peak: Optional[int] = None         # peak resident RAM of this process
    ram_held: Optional[int] = None         # resident RAM at the end minus at the start
    ram_lifetime: bool = False             # ram_peak is the process's peak since it started (getrusage)
    notes: list = field(default_factory=list)
    recoveries: int = 0                    # out-of-memory recoveries in this phase
    error: Optional[str] = None

    def note(self, text: str) -> None:
        self.notes.append(text)

    def recovered(self, text: str) -> None:
        self.recoveries += 1
        self.note(text)

    @property
    def on_gpu(self) -> bool:
        return not self.device.startswith("cpu")


class _Sampler:
    """Samples RAM (and device-wide VRAM) in a background thread; the maxima are what it reports."""

    def __init__(self, ram, device_used, interval):
        self.ram, self.device_used, self.interval = ram, device_used, interval
        self.ram_start = self.ram_max = ram() if ram else None
        self.used_max = device_used() if device_used else None
        self._stop = threading.Event()
        self._taken = threading.Condition()
        self.count = 0
        self._thread = None
        if ram or device_used:
            self._thread = threading.Thread(target=self._loop, name="kontext_lowvram phase sampler", daemon=True)
            self._thread.start()

    def _sample(self):
        if self.ram:
            self.ram_max = max(self.ram_max, self.ram())
        if self.device_used:
            self.used_max = max(self.used_max, self.device_used())
        with self._taken:
            self.count += 1
            self._taken.notify_all()

    def wait(self):
        """Until the background thread has taken a sample after this call."""
        if self._thread is None:
            return
        with self._taken:
            target = self.count + 2  # one may have been under way before the call
            self._taken.wait_for(lambda: self.count >= target or not self._thread.is_alive(), timeout=10)

    def _loop(self):
        while not self._stop.wait(self.interval):
            try:
                self._sample()
            except Exception:  # a reader that fails once stops sampling; the phase still finishes
                return

    def stop(self):
        """-> the RAM in use now (None without a reader, or when it fails); the maxima include the end state, so
        a phase shorter than one interval is measured too."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self._sample()
            return self.ram() if self.ram else None
        except Exception:  # measuring must never fail the phase it measures
            return None


class _Meter:
    def __init__(self, device: torch.device, interval: float):
        self.device = device
        self.cuda = device.type == "cuda" and torch.cuda.is_available()
        self.peak_allocated = self.peak_reserved = 0
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
            self.allocated_start = torch.cuda.memory_allocated(device)
        self.t0 = time.perf_counter()
        self.sampler = _Sampler(ram_reader(), device_used_reader(device), interval)

    def fold_cuda_peak(self):
        """Keep the peak so far: a nested phase is about to reset the device's peak counters."""
        if self.cuda:
            self.peak_allocated = max(self.peak_allocated, torch.cuda.max_memory_allocated(self.device))
            self.peak_reserved = max(self.peak_reserved, torch.cuda.max_memory_reserved(self.device))

    def stop(self, rec: PhaseRecord):
        ram_end = self.sampler.stop()
        rec.wall_s = time.perf_counter() - self.t0
        if self.cuda:
            self.fold_cuda_peak()
            rec.peak_allocated, rec.peak_reserved = self.peak_allocated, self.peak_reserved
            rec.vram_held = torch.cuda.memory_allocated(self.device) - self.allocated_start
        rec.device_used = self.sampler.used_max
        if ram_end is not None:
            rec.ram_peak, rec.ram_held = self.sampler.ram_max, ram_end - self.sampler.ram_start
        else:
            rec.ram_peak, rec.ram_lifetime = lifetime_peak_ram(), True


class Recorder:
    """Phase records of the last KEEP_RUNS prompts. One per process (the host keeps it); nothing in it is a
    class attribute, so two recorders never share state."""

    def __init__(self, keep_runs: int = KEEP_RUNS, interval: float = SAMPLE_INTERVAL_S):
        self.keep_runs, self.interval = keep_runs, interval
        self.records: list[PhaseRecord] = []
        self._open: list[_Meter] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def phase(self, name: str, *, run=None, node=None, device="cpu"):
        device = torch.device(device)
        rec = PhaseRecord(name, run, node, str(device))
        for m in self._open:
            m.fold_cuda_peak()
        meter = _Meter(device, self.interval)
        self._open.append(meter)
        try:
            yield rec
        except BaseException as e:
            rec.error = type(e).__name__
            raise
        finally:
            self._open.remove(meter)
            meter.stop(rec)
            self._add(rec)

    def wait_for_sample(self):
        """Block until every open phase's sampler has sampled the present state (so a short-lived allocation is
        counted in the peak; the tests use it instead of sleeping)."""
        for m in list(self._open):
            m.sampler.wait()

    def _add(self, rec: PhaseRecord):
        with self._lock:
            self.records.append(rec)
            runs = list(dict.fromkeys(r.run for r in self.records))
            if len(runs) > self.keep_runs:
                keep = set(runs[-self.keep_runs:])
                self.records = [r for r in self.records if r.run in keep]

    def of_run(self, run) -> list[PhaseRecord]:
        with self._lock:
            return [r for r in self.records if r.run == run]

    def earlier(self, phase: str, node, run) -> Optional[PhaseRecord]:
        """The latest record of `phase` by `node` from another prompt than `run`."""
        with self._lock:
            found = [r for r in self.records if r.phase == phase and r.node == node and r.run != run]
        return found[-1] if found else None


# ---- the report ---------------------------------------------------------------------------------

def _gib(b: Optional[int], signed: bool = False) -> str:
    return f"{b / GIB:+.2f}" if signed else f"{b / GIB:.2f}"


def measured_text(rec: PhaseRecord) -> str:
    """What one record measured, in one line."""
    parts = [f"{rec.wall_s:.2f} s"]
    if rec.ram_peak is None:
        parts.append("RAM: n/a")
    elif rec.ram_lifetime:
        parts.append(f"RAM peak {_gib(rec.ram_peak)} GiB (process peak since start)")
    else:
        parts.append(f"RAM peak {_gib(rec.ram_peak)} GiB ({_gib(rec.ram_held, True)} after)")
    if not rec.on_gpu:
        parts.append("VRAM: n/a (CPU run)")
    elif rec.peak_allocated is None:
        parts.append(f"VRAM: n/a (not measured on {rec.device})")
    else:
        used = "device use n/a (no NVML)" if rec.device_used is None else f"device {_gib(rec.device_used)} GiB used"
        parts.append(f"VRAM peak {_gib(rec.peak_allocated)} allocated / {_gib(rec.peak_reserved)} reserved GiB "
                     f"({_gib(rec.vram_held, True)} after), {used}")
    text = " · ".join(parts)
    if rec.error:
        text += f" · FAILED ({rec.error})"
    return text + "".join(f"; {n}" for n in rec.notes)


@dataclass
class Row:
    phase: str
    node: Optional[str]
    status: str                      # "measured" | "cached" | "not run" | "not measured"
    record: Optional[PhaseRecord] = None

    def text(self, names: dict) -> str:
        who = f" ({names.get(self.node, 'node')} #{self.node})" if self.node is not None else ""
        if self.status == "measured":
            what = measured_text(self.record)
        elif self.status == "cached":
            what = "cached (earlier run)" + (f": {measured_text(self.record)}" if self.record else "")
        elif self.status == "not run":
            what = "not run in this prompt"
        else:
            what = "not measured (not done by a Kontext LowVRAM node)"
        return f"{self.phase}{who}: {what}"


def _upstream(prompt: dict, node) -> set:
    """The ids of every node `node` takes an input from, directly or not (API-format prompt links)."""
    seen, todo = set(), [node]
    while todo:
        for v in (prompt.get(todo.pop()) or {}).get("inputs", {}).values():
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and v[0] not in seen:
                seen.add(v[0])
                todo.append(v[0])
    return seen


def class_names(prompt: dict) -> dict:
    """node id -> class type of an API-format prompt."""
    return {n: d.get("class_type") for n, d in (prompt or {}).items() if isinstance(d, dict)}


def report_rows(recorder: Recorder, run, prompt: dict, doers: dict, users: dict) -> list[Row]:
    """The report's rows for prompt `run` (its API-format graph: `prompt`). `doers[phase]`: our node classes
    whose node runs that phase itself; `users[phase]`: our node classes that make the phase of a node downstream
    of them ours (the denoise of a sampler fed by our model loader). A node of ours that recorded nothing in this
    prompt was cached by ComfyUI: its row says so, with the numbers of its earlier run where they are kept."""
    names = class_names(prompt)
    now = recorder.of_run(run)
    rows = []
    for phase in PHASES:
        mine = [r for r in now if r.phase == phase]
        rows += [Row(phase, r.node, "measured", r) for r in mine]
        ran = {r.node for r in mine}
        ours = [n for n, c in names.items() if c in doers.get(phase, ())]
        if users.get(phase):
            ours += [n for n in names if recorder.earlier(phase, n, run) and
                     any(names.get(u) in users[phase] for u in _upstream(prompt, n))]
        cached = [Row(phase, n, "cached", recorder.earlier(phase, n, run)) for n in dict.fromkeys(ours)
                  if n not in ran]
        rows += cached
        if not mine and not cached:
            used = any(c in doers.get(phase, ()) or c in users.get(phase, ()) for c in names.values())
            rows.append(Row(phase, None, "not run" if used else "not measured"))
    return rows


def report_text(rows: list[Row], names: dict, run=None) -> str:
    measured = [r.record for r in rows if r.status == "measured"]
    gpu = [r for r in measured if r.on_gpu]
    where = (f"VRAM on {gpu[0].device}" if gpu else "VRAM: n/a (CPU run)") if measured else "nothing measured"
    head = f"Kontext LowVRAM report{f' (prompt {str(run)[:8]})' if run else ''}: {where}"
    return "\n".join([head] + [r.text(names) for r in rows])


def summary_line(rows: list[Row]) -> str:
    """The report in one log line."""
    parts = []
    for r in rows:
        if r.status == "measured":
            rec = r.record
            extra = f", {rec.recoveries} OOM recover{'y' if rec.recoveries == 1 else 'ies'}" if rec.recoveries else ""
            extra += f", failed ({rec.error})" if rec.error else ""
            parts.append(f"{r.phase} {rec.wall_s:.2f} s{extra}")
        elif r.status == "cached":
            parts.append(f"{r.phase} cached")
    measured = [r.record for r in rows if r.status == "measured"]
    if not measured:
        return "; ".join(parts + ["nothing measured in this prompt"])
    rams = [m.ram_peak for m in measured if m.ram_peak is not None]
    vram = [m.peak_reserved for m in measured if m.peak_reserved is not None]
    tail = [f"RAM peak {_gib(max(rams))} GiB" if rams else "RAM n/a"]
    if vram:
        tail.append(f"VRAM peak {_gib(max(vram))} GiB reserved")
    elif not any(m.on_gpu for m in measured):
        tail.append("VRAM n/a (CPU run)")
    return "; ".join(parts + tail)
