"""The per-phase report without ComfyUI: measurements (optimizations/phase_report.py) on the CPU and on a stand-in
for CUDA's memory counters, the report's rows and text, the node, and the frontend extension (run under Node)."""
import json
import logging
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from kontext_lowvram.optimizations import phase_report
from kontext_lowvram.optimizations.phase_report import Recorder

MIB = 2 ** 20
REPO = Path(__file__).resolve().parents[1]


def touched(nbytes):
    """A tensor whose pages are really resident (torch.empty alone would not raise RSS)."""
    return torch.ones(nbytes // 4, dtype=torch.float32)


def test_a_cpu_phase_records_time_and_ram_and_says_vram_is_not_there():
    rec = Recorder()
    with rec.phase("VAE decode", run="p1", node="8", device="cpu") as r:
        big = touched(256 * MIB)
        rec.wait_for_sample()
        del big
    assert r.wall_s > 0 and r.error is None and rec.of_run("p1") == [r]
    assert r.ram_peak is not None and not r.ram_lifetime
    # the sampler saw the 256 MiB while they lived; freed before the end, they are not held after
    assert r.ram_held < 64 * MIB
    assert r.peak_allocated is None and r.peak_reserved is None and r.device_used is None
    text = phase_report.measured_text(r)
    assert "VRAM: n/a (CPU run)" in text and "RAM peak" in text and text.startswith(f"{r.wall_s:.2f} s")


def test_the_sampled_peak_counts_an_allocation_that_is_gone_by_the_end():
    rec = Recorder()
    reader = phase_report.ram_reader()
    with rec.phase("denoise", device="cpu") as r:
        before = reader()
        big = touched(256 * MIB)
        rec.wait_for_sample()
        del big
    assert r.ram_peak - before >= 200 * MIB, (r.ram_peak, before)


def test_a_failed_phase_is_recorded_with_its_error_and_the_error_goes_on():
    rec = Recorder()
    with pytest.raises(KeyError):
        with rec.phase("model load", run="p", node="1") as r:
            raise KeyError("x")
    assert rec.of_run("p") == [r] and r.error == "KeyError"
    assert "FAILED (KeyError)" in phase_report.measured_text(r)


def test_without_a_rss_source_the_ram_is_the_labelled_lifetime_peak(monkeypatch):
    monkeypatch.setattr(phase_report, "ram_reader", lambda: None)
    rec = Recorder()
    with rec.phase("text encode") as r:
        pass
    assert r.ram_lifetime and r.ram_held is None
    assert 0 < r.ram_peak <= phase_report.lifetime_peak_ram()
    assert "(process peak since start)" in phase_report.measured_text(r)


class FakeCuda:
    """torch.cuda's memory counters for one device: allocations move `current`; reset sets the peaks to it."""

    def __init__(self):
        self.current = self.peak = 0
        self.used = 5 * 2 ** 30

    def alloc(self, n):
        self.current += n
        self.peak = max(self.peak, self.current)

    def install(self, monkeypatch):
        c = torch.cuda
        monkeypatch.setattr(c, "is_available", lambda: True)
        monkeypatch.setattr(c, "reset_peak_memory_stats", lambda d=None: setattr(self, "peak", self.current))
        monkeypatch.setattr(c, "memory_allocated", lambda d=None: self.current)
        monkeypatch.setattr(c, "max_memory_allocated", lambda d=None: self.peak)
        monkeypatch.setattr(c, "max_memory_reserved", lambda d=None: self.peak + MIB)
        monkeypatch.setattr(c, "device_memory_used", lambda d=None: self.used, raising=False)


def test_gpu_phase_peaks_are_reset_per_phase_and_survive_a_nested_phase(monkeypatch):
    cuda = FakeCuda()
    cuda.install(monkeypatch)
    cuda.alloc(1000 * MIB)                 # before the phase: not its peak
    cuda.alloc(-1000 * MIB)
    rec = Recorder()
    with rec.phase("denoise", device="cuda:0") as outer:
        cuda.alloc(300 * MIB)
        cuda.alloc(-300 * MIB)             # outer's peak so far: 300 MiB, then the nested phase resets the counters
        with rec.phase("VAE decode", device="cuda:0") as inner:
            cuda.alloc(100 * MIB)
        cuda.alloc(-100 * MIB)
        cuda.alloc(10 * MIB)               # held after the phase
    assert inner.peak_allocated == 100 * MIB and inner.vram_held == 100 * MIB
    assert outer.peak_allocated == 300 * MIB and outer.peak_reserved == 301 * MIB
    assert outer.vram_held == 10 * MIB and outer.device_used == cuda.used
    text = phase_report.measured_text(outer)
    assert "VRAM peak 0.29 allocated / 0.29 reserved GiB (+0.01 after), device 5.00 GiB used" in text
    assert "n/a" not in text


def test_gpu_phase_without_nvml_says_device_use_is_not_measured(monkeypatch):
    FakeCuda().install(monkeypatch)
    monkeypatch.setattr(phase_report, "device_used_reader", lambda device: None)
    with Recorder().phase("denoise", device="cuda:0") as r:
        pass
    assert "device use n/a (no NVML)" in phase_report.measured_text(r)


def test_the_recorder_keeps_the_records_of_the_last_runs_only():
    rec = Recorder(keep_runs=2)
    for run in ("a", "b", "c"):
        with rec.phase("denoise", run=run, node="5"):
            pass
    assert rec.of_run("a") == [] and len(rec.of_run("b")) == len(rec.of_run("c")) == 1
    assert rec.earlier("denoise", "5", "c").run == "b"


# ---- rows and text ------------------------------------------------------------------------------

DOERS = {"model load": {"LowVRAMModelLoader"}, "text encode": {"LowVRAMTextEncode"},
         "VAE encode": {"LowVRAMTiledVAEEncode"}, "VAE decode": {"LowVRAMTiledVAEDecode"}}
USERS = {"denoise": {"LowVRAMModelLoader"}}


def graph(decoder="LowVRAMTiledVAEDecode", loader="LowVRAMModelLoader"):
    """An API-format edit: loader -> KSampler <- text encode; KSampler -> decode -> report."""
    n = lambda cls, **inputs: {"class_type": cls, "inputs": inputs}  # noqa: E731
    return {"1": n(loader, model_name="m.gguf"), "2": n("LowVRAMTextEncode", clip_l="a", t5xxl="b"),
            "3": n("KSampler", model=["1", 0], positive=["2", 0], seed=0),
            "4": n(decoder, samples=["3", 0]), "5": n("LowVRAMReport", value=["4", 0])}


def record(rec, phase, run, node):
    with rec.phase(phase, run=run, node=node) as r:
        pass
    return r


def test_rows_measured_cached_and_not_measured():
    rec = Recorder()
    for phase, node in (("model load", "1"), ("text encode", "2"), ("denoise", "3"), ("VAE decode", "4")):
        record(rec, phase, "run1", node)
    # run 2: a new seed re-runs the sampler and the decode; ComfyUI answers the loader and the encode from its cache
    d = record(rec, "denoise", "run2", "3")
    record(rec, "VAE decode", "run2", "4")
    rows = {r.phase: r for r in phase_report.report_rows(rec, "run2", graph(), DOERS, USERS)}
    assert [r.phase for r in phase_report.report_rows(rec, "run2", graph(), DOERS, USERS)] == list(phase_report.PHASES)
    assert rows["denoise"].status == "measured" and rows["denoise"].record is d
    assert rows["model load"].status == "cached" and rows["model load"].record.run == "run1"
    assert rows["text encode"].status == "cached"
    assert rows["VAE encode"].status == "not measured"  # no node of ours encodes in this graph
    text = phase_report.report_text(list(rows.values()), phase_report.class_names(graph()), "run2")
    assert "model load (LowVRAMModelLoader #1): cached (earlier run): " in text
    assert "VAE encode: not measured (not done by a Kontext LowVRAM node)" in text
    assert text.splitlines()[0] == "Kontext LowVRAM report (prompt run2): VRAM: n/a (CPU run)"


def test_a_phase_done_by_core_nodes_is_not_claimed_from_an_earlier_run():
    """The same node ids with core nodes now (core VAEDecode, core loader): earlier records of ours don't count."""
    rec = Recorder()
    record(rec, "VAE decode", "run1", "4")
    record(rec, "denoise", "run1", "3")
    rows = {r.phase: r for r in phase_report.report_rows(rec, "run2", graph("VAEDecode", "UNETLoader"), DOERS, USERS)}
    assert rows["VAE decode"].status == rows["denoise"].status == "not measured"


def test_our_model_denoise_without_a_record_is_not_run_and_a_cached_sampler_is_cached():
    rec = Recorder()
    rows = {r.phase: r for r in phase_report.report_rows(rec, "run1", graph(), DOERS, USERS)}
    assert rows["denoise"].status == "not run"
    record(rec, "denoise", "run1", "3")
    rows = {r.phase: r for r in phase_report.report_rows(rec, "run2", graph(), DOERS, USERS)}
    assert rows["denoise"].status == "cached" and rows["denoise"].node == "3"


def test_summary_line_names_recoveries_and_cached_phases():
    rec = Recorder()
    with rec.phase("denoise", run="r", node="3") as d:
        d.recovered("OOM: retried once")
    record(rec, "model load", "r0", "1")
    line = phase_report.summary_line(phase_report.report_rows(rec, "r", graph(), DOERS, USERS))
    assert f"denoise {d.wall_s:.2f} s, 1 OOM recovery" in line and "model load cached" in line
    assert line.endswith("VRAM n/a (CPU run)") and "RAM peak" in line
    only_cached = phase_report.summary_line(phase_report.report_rows(rec, "r2", graph(), DOERS, USERS))
    assert only_cached == ("model load cached; text encode cached; denoise cached; VAE decode cached; "
                           "nothing measured in this prompt")


# ---- the node -----------------------------------------------------------------------------------

@pytest.fixture
def executing(monkeypatch):
    """ComfyUI's execution context as comfy_execution.utils offers it, for prompt `run` and node `node`."""
    ctx = types.SimpleNamespace(prompt_id="run", node_id=None)
    utils = types.ModuleType("comfy_execution.utils")
    utils.get_executing_context = lambda: ctx
    pkg = types.ModuleType("comfy_execution")
    pkg.utils = utils
    monkeypatch.setitem(sys.modules, "comfy_execution", pkg)
    monkeypatch.setitem(sys.modules, "comfy_execution.utils", utils)
    return ctx


def test_report_node_passes_its_input_through_and_shows_the_report(executing, monkeypatch, caplog):
    from kontext_lowvram.host import report
    from kontext_lowvram.nodes.report import LowVRAMReport

    monkeypatch.setattr(report, "RECORDER", Recorder())
    executing.node_id = "4"
    with report.phase("VAE decode", device="cpu") as r:
        pass
    assert (r.run, r.node) == ("run", "4")
    executing.node_id = "5"
    value = object()
    with caplog.at_level(logging.INFO, logger="kontext_lowvram"):
        out = LowVRAMReport().show(value, prompt=graph())
    assert out["result"][0] is value
    (text,) = out["ui"]["text"]
    assert f"VAE decode (LowVRAMTiledVAEDecode #4): {r.wall_s:.2f} s" in text and "VAE decode (" not in \
        text.split("#4")[1] and "denoise: not run in this prompt" in text
    lines = [m for m in caplog.messages if m.startswith("Kontext LowVRAM report: ")]
    assert len(lines) == 1 and "VAE decode" in lines[0] and "\n" not in lines[0]


def test_the_any_type_matches_every_type_both_ways():
    from kontext_lowvram.nodes.report import ANY, LowVRAMReport
    for t in ("IMAGE", "LATENT", "MODEL", "*"):
        assert not (ANY != t) and not (t != ANY)
    assert LowVRAMReport.RETURN_TYPES == (ANY,) and LowVRAMReport.INPUT_TYPES()["required"]["value"][0] is ANY
    assert json.dumps(LowVRAMReport.RETURN_TYPES) == '["*"]'  # what /object_info sends the frontend


# ---- the frontend extension ---------------------------------------------------------------------

FRONTEND_CHECK = r"""
import { registered } from "./scripts/app.js";
await import("./extensions/pack/text_boxes.js");
const ext = registered[0];
const made = [];
globalThis.document = { createElement: (tag) => { const el = { tag, style: {} }; made.push(el); return el; } };
function Node() {}
const calls = [];
Node.prototype.onExecuted = function (m) { calls.push(m); };
Node.prototype.addDOMWidget = function (name, type, element, options) {
  const w = { name, type, element, options, get value() { return options.getValue(); },
              set value(v) { options.setValue(v); } };
  (this.widgets ??= []).push(w);
  return w;
};
ext.beforeRegisterNodeDef(Node, { name: "LowVRAMReport" });
function Convert() {}
Convert.prototype.addWidget = function (type, name, value, cb, options) {
  const w = { type, name, value, options };
  (this.widgets ??= []).push(w);
  return w;
};
ext.beforeRegisterNodeDef(Convert, { name: "LowVRAMConvert" });
const conv = new Convert();
conv.onExecuted({ text: ["wrote x.gguf"] });
const other = function () {};
ext.beforeRegisterNodeDef(other, { name: "KSampler" });
const node = new Node();
node.comfyClass = "LowVRAMReport";
ext.nodeCreated(node);
node.onExecuted({ text: ["line one\nline two"] });
node.onExecuted({ text: ["second run"] });
const core = new Node();
core.comfyClass = "KSampler";
ext.nodeCreated(core);
const w = node.widgets[0];
console.log(JSON.stringify({ name: ext.name, widgets: node.widgets.length, value: w.value,
  readOnly: w.element.readOnly, serialize: w.serialize, optionSerialize: w.options.serialize,
  chained: calls.length, coreWidgets: (core.widgets ?? []).length, otherPatched: "onExecuted" in other.prototype,
  convert: [conv.widgets[0].name, conv.widgets[0].value, conv.widgets[0].serialize] }));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed: the frontend extension is not run")
def test_frontend_extension_shows_the_text_read_only(tmp_path):
    from kontext_lowvram import WEB_DIRECTORY
    (tmp_path / "package.json").write_text('{"type": "module"}')
    (tmp_path / "scripts").mkdir()
    # the host's module: the extension imports `app` from it, as from ComfyUI's /scripts/app.js
    (tmp_path / "scripts" / "app.js").write_text(
        "export const registered = [];\nexport const app = { registerExtension: (e) => registered.push(e) };\n")
    (tmp_path / "extensions" / "pack").mkdir(parents=True)
    shutil.copy(REPO / WEB_DIRECTORY / "text_boxes.js", tmp_path / "extensions" / "pack" / "text_boxes.js")
    (tmp_path / "check.js").write_text(FRONTEND_CHECK)
    out = subprocess.run(["node", "check.js"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"name": "KontextLowVRAM.TextBoxes", "widgets": 1, "value": "second run", "readOnly": True,
                   "serialize": False, "optionSerialize": False, "chained": 2, "coreWidgets": 0,
                   "otherPatched": False, "convert": ["conversion", "wrote x.gguf", False]}
