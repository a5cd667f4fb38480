"""The bundled workflows (workflows/*.json): written by tools/make_workflows.py from the planner, consistent graphs,
valid widget values for our nodes, download entries on every loader, a thumbnail each. Core nodes' inputs are
checked against a real host's /object_info in tests/integration/test_workflows.py."""
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

from kontext_lowvram import NODE_CLASS_MAPPINGS
from kontext_lowvram.optimizations import memory_model as mm
from kontext_lowvram.optimizations import planner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import make_workflows as MW  # noqa: E402
from workflow_graph import FRONTEND_ONLY, SLOTS, UI_ONLY_WIDGETS  # noqa: E402

WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
LOADER_FILES = {"LowVRAMModelLoader": ("diffusion_models",), "LowVRAMTextEncoderLoader": ("text_encoders",) * 2,
                "VAELoader": ("vae",), "LowVRAMLoraLoader": ("loras",)}
WIDGET_KINDS = ("INT", "FLOAT", "STRING", "BOOLEAN")


def load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def by_type(wf, t):
    return [n for n in wf["nodes"] if n["type"] == t]


def widgets(node):
    return dict(zip(SLOTS[node["type"]][1], node["widgets_values"]))


@pytest.fixture
def fake_folder_paths(monkeypatch):
    mod = types.ModuleType("folder_paths")
    mod.get_folder_paths = lambda name: []
    mod.get_filename_list = lambda name: []
    monkeypatch.setitem(sys.modules, "folder_paths", mod)


def test_the_issue_asks_for_these_workflows():
    names = {p.stem for p in WORKFLOWS}
    assert names == {s.name for s in MW.SPECS} == {
        "kontext_edit_8gb", "kontext_edit_12gb", "kontext_edit_16gb", "kontext_edit_24gb", "kontext_edit_32gb_plus",
        "kontext_multi_reference_16gb", "kontext_edit_fast_8gb", "kontext_edit_fast_12gb"}


def test_committed_workflows_are_what_the_generator_writes():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "make_workflows.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("spec", MW.SPECS, ids=lambda s: s.name)
def test_each_workflow_makes_the_planners_choices(spec):
    wf = load(ROOT / "workflows" / f"{spec.name}.json")
    p = planner.plan(planner.Request(vram_gib=spec.vram, references=spec.references, steps=spec.steps))
    assert p.fits and not p.problems
    (model,) = by_type(wf, "LowVRAMModelLoader")
    assert widgets(model)["model_name"] == p.model_format.file
    (te,) = by_type(wf, "LowVRAMTextEncoderLoader")
    assert widgets(te) == {"clip_l_name": mm.CLIP_L_FILE, "t5xxl_name": p.text_encoder.file,
                           "device": p.text_encoder_device}
    (attention,) = by_type(wf, "LowVRAMAttention")
    assert widgets(attention)["backend"] == p.attention
    for vae_node in by_type(wf, "LowVRAMTiledVAEDecode") + by_type(wf, "LowVRAMTiledVAEEncode"):
        assert widgets(vae_node)["vram_budget_mb"] == p.vae_budget_mb
    (sampler,) = by_type(wf, "KSampler")
    assert widgets(sampler)["steps"] == spec.steps and widgets(sampler)["cfg"] == 1.0
    (text,) = by_type(wf, "LowVRAMTextEncode")
    assert widgets(text)["guidance"] == (MW.TURBO_GUIDANCE if spec.turbo else MW.KONTEXT_GUIDANCE)
    assert len(by_type(wf, "ReferenceLatent")) == spec.references == len(by_type(wf, "LoadImage"))
    assert len(by_type(wf, "LowVRAMLoraLoader")) == int(spec.turbo)
    (note,) = by_type(wf, "MarkdownNote")
    text = note["widgets_values"][0]
    assert p.model_format.file in text and p.text_encoder.file in text and f"--vram {spec.vram}" in text
    for opt, _ in p.launch_options:
        assert opt in text
    for ph in p.phases:
        assert f"| {ph.name} | {ph.vram_gib:.1f} | {ph.ram_gib:.1f} |" in text


def test_tiers_get_no_worse_model_with_more_vram():
    rank = {f.file: i for i, f in enumerate(mm.FORMATS)}  # best first
    edits = sorted((s for s in MW.SPECS if s.references == 1 and not s.turbo), key=lambda s: s.vram)
    ranks = [rank[widgets(by_type(load(ROOT / "workflows" / f"{s.name}.json"), "LowVRAMModelLoader")[0])
                  ["model_name"]] for s in edits]
    assert ranks == sorted(ranks, reverse=True) and len(set(ranks)) >= 4


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_links_are_consistent(path):
    wf = load(path)
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]) and wf["last_node_id"] == max(nodes)
    assert wf["last_link_id"] == max(link[0] for link in wf["links"])
    used_in, used_out = set(), set()
    for link_id, src, slot, dst, dst_slot, ltype in wf["links"]:
        out = nodes[src]["outputs"][slot]
        inp = nodes[dst]["inputs"][dst_slot]
        assert link_id in out["links"] and inp["link"] == link_id
        assert ltype in (out["type"], inp["type"]) and "*" in (out["type"], inp["type"]) or \
            out["type"] == inp["type"] == ltype
        used_in.add((dst, dst_slot))
        used_out.add(link_id)
    for n in wf["nodes"]:
        for slot, inp in enumerate(n["inputs"]):
            optional = (n["type"], inp["name"]) == ("ReferenceLatent", "latent")
            assert inp["link"] is not None or optional, f"{n['type']}.{inp['name']} is not connected"
            assert inp["link"] is None or (n["id"], slot) in used_in
        for out in n["outputs"]:
            assert set(out["links"]) <= used_out
    orders = {n["id"]: n["order"] for n in wf["nodes"]}
    for _, src, _, dst, _, _ in wf["links"]:
        assert orders[src] < orders[dst], "order must put a node after its inputs"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_groups_are_the_five_steps_and_hold_their_nodes(path):
    wf = load(path)
    titles = [g["title"] for g in wf["groups"]]
    assert [t.split()[0] for t in titles] == ["1", "2", "3", "4", "5"] and titles[0] == "1 Load models"
    for n in wf["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            continue
        x, y = n["pos"]
        w, h = n["size"]
        inside = [g["title"] for g in wf["groups"]
                  if g["bounding"][0] <= x and x + w <= g["bounding"][0] + g["bounding"][2]
                  and g["bounding"][1] <= y and y + h <= g["bounding"][1] + g["bounding"][3]]
        assert len(inside) == 1, f"{n['type']} is in groups {inside}"


def _widget_inputs(cls):
    spec = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, s in spec.get(section, {}).items():
            if isinstance(s[0], list) or s[0] in WIDGET_KINDS:
                yield name, s


def test_our_nodes_slot_rows_are_their_input_types(fake_folder_paths):
    for t, (linked, widget_names, outputs) in SLOTS.items():
        if t not in NODE_CLASS_MAPPINGS:
            continue
        cls = NODE_CLASS_MAPPINGS[t]
        spec = cls.INPUT_TYPES()
        assert [name for name, _ in _widget_inputs(cls)] == [w for w in widget_names if w not in UI_ONLY_WIDGETS]
        all_inputs = {k: v for s in spec.values() for k, v in s.items()}
        for name, ltype in linked:
            assert name in all_inputs and str(all_inputs[name][0]) == ltype
        assert [str(t) for t in cls.RETURN_TYPES] == [o[1] for o in outputs]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_our_widget_values_are_valid(path, fake_folder_paths):
    for n in load(path)["nodes"]:
        cls = NODE_CLASS_MAPPINGS.get(n["type"])
        if cls is None:
            continue
        values = widgets(n)
        assert len(n["widgets_values"]) == len(SLOTS[n["type"]][1])
        for name, spec in _widget_inputs(cls):
            v, opts = values[name], spec[1]
            if isinstance(spec[0], list):
                if spec[0]:  # a fixed choice (file lists are empty here: the file names are checked below)
                    assert v in spec[0], f"{n['type']}.{name}={v!r} not in {spec[0]}"
                else:
                    assert isinstance(v, str) and v.endswith((".gguf", ".safetensors", ".sft"))
            elif spec[0] in ("INT", "FLOAT"):
                assert isinstance(v, (int, float)) and not isinstance(v, bool)
                assert opts.get("min", v) <= v <= opts.get("max", v), f"{n['type']}.{name}={v}"
                if spec[0] == "INT":
                    assert isinstance(v, int)
            elif spec[0] == "BOOLEAN":
                assert isinstance(v, bool)
            else:
                assert isinstance(v, str)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_loader_offers_its_downloads(path):
    for n in load(path)["nodes"]:
        if n["type"] not in LOADER_FILES:
            continue
        folders = LOADER_FILES[n["type"]]
        names = n["widgets_values"][:len(folders)]
        entries = n["properties"].get("models", [])
        # .gguf files get no entry (tools/make_workflows.models_entry says why): the note links them
        assert [(e["name"], e["directory"]) for e in entries] == [(f, d) for f, d in zip(names, folders)
                                                                   if not f.endswith(".gguf")]
        for e in entries:
            assert e["url"].startswith("https://huggingface.co/") and "/resolve/main/" in e["url"]
            assert e["url"].rsplit(".", 1)[1] == e["name"].rsplit(".", 1)[1]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_each_workflow_has_a_thumbnail(path):
    with Image.open(path.with_suffix(".jpg")) as img:
        assert img.format == "JPEG" and img.size == (512, 384)


def test_pyproject_ships_workflows_and_thumbnails():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert '"workflows/*.json"' in text and '"workflows/*.jpg"' in text
