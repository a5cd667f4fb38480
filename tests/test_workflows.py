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
                "LowVRAMLLMTextEncoderLoader": ("text_encoders",), "VAELoader": ("vae",),
                "LowVRAMLoraLoader": ("loras",)}
KONTEXT = [s for s in MW.SPECS if s.model == "kontext"]
FLUX2 = [s for s in MW.SPECS if s.model != "kontext"]
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
        "kontext_multi_reference_16gb", "kontext_edit_fast_8gb", "kontext_edit_fast_12gb",
        "flux2_klein_edit_8gb", "flux2_klein_edit_12gb", "flux2_dev_edit_16gb", "flux2_dev_edit_24gb",
        "flux2_dev_edit_32gb_plus"}


def test_committed_workflows_are_what_the_generator_writes():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "make_workflows.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("spec", KONTEXT, ids=lambda s: s.name)
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
    edits = sorted((s for s in KONTEXT if s.references == 1 and not s.turbo), key=lambda s: s.vram)
    ranks = [rank[widgets(by_type(load(ROOT / "workflows" / f"{s.name}.json"), "LowVRAMModelLoader")[0])
                  ["model_name"]] for s in edits]
    assert ranks == sorted(ranks, reverse=True) and len(set(ranks)) >= 4


def _source(wf, node, input_name):
    """The node feeding `node`'s input `input_name`."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    (link,) = [i["link"] for i in node["inputs"] if i["name"] == input_name]
    return nodes[next(lk[1] for lk in wf["links"] if lk[0] == link)]


@pytest.mark.parametrize("spec", FLUX2, ids=lambda s: s.name)
def test_each_flux2_workflow_makes_the_planners_choices(spec):
    """The planner's files and policies, and the graph of ComfyUI's own FLUX.2 edit templates: [dev] FluxGuidance 4
    and a BasicGuider, [klein] CFG 1 with an empty negative, Flux2Scheduler with the spec's steps, the encoded image
    as both the reference and the sampler's latent."""
    wf = load(ROOT / "workflows" / f"{spec.name}.json")
    p = planner.plan(planner.Request(vram_gib=spec.vram, steps=spec.steps, model=spec.model))
    assert p.fits and not p.problems
    (model,) = by_type(wf, "LowVRAMModelLoader")
    assert widgets(model)["model_name"] == p.model_format.file
    (te,) = by_type(wf, "LowVRAMLLMTextEncoderLoader")
    assert widgets(te) == {"text_encoder_name": p.text_encoder.file, "device": p.text_encoder_device}
    assert by_type(wf, "LowVRAMTextEncoder") == [] and by_type(wf, "KSampler") == []
    for vae_node in by_type(wf, "LowVRAMTiledVAEDecode") + by_type(wf, "LowVRAMTiledVAEEncode"):
        assert widgets(vae_node)["vram_budget_mb"] == p.vae_budget_mb
    (vae,) = by_type(wf, "VAELoader")
    assert widgets(vae)["vae_name"] == "flux2-vae.safetensors"
    (sched,) = by_type(wf, "Flux2Scheduler")
    assert widgets(sched)["steps"] == spec.steps
    (run,) = by_type(wf, "SamplerCustomAdvanced")
    (ref,) = by_type(wf, "ReferenceLatent")
    (enc,) = by_type(wf, "LowVRAMTiledVAEEncode")
    assert _source(wf, run, "latent_image") is enc and _source(wf, ref, "latent") is enc
    guider = _source(wf, run, "guider")
    assert _source(wf, guider, "model")["type"] == "LowVRAMAttention"
    if spec.model == "flux2-dev":
        assert guider["type"] == "BasicGuider" and spec.steps == 20
        (guidance,) = by_type(wf, "FluxGuidance")
        assert widgets(guidance)["guidance"] == 4.0 and _source(wf, ref, "conditioning") is guidance
    else:
        assert guider["type"] == "CFGGuider" and widgets(guider)["cfg"] == 1.0 and spec.steps == 4
        assert _source(wf, guider, "positive") is ref
        assert _source(wf, _source(wf, guider, "negative"), "conditioning") is ref
    (note,) = by_type(wf, "MarkdownNote")
    text = note["widgets_values"][0]
    assert p.model_format.file in text and p.text_encoder.file in text
    assert f"--model {spec.model} --vram {spec.vram}" in text
    for ph in p.phases:
        assert f"| {ph.name} | {ph.vram_gib:.1f} | {ph.ram_gib:.1f} |" in text


def test_flux2_tiers_get_no_worse_dev_model_with_more_vram():
    formats = [f.file for f in mm.model_spec("flux2-dev").formats]
    devs = sorted((s for s in FLUX2 if s.model == "flux2-dev"), key=lambda s: s.vram)
    ranks = [formats.index(widgets(by_type(load(ROOT / "workflows" / f"{s.name}.json"), "LowVRAMModelLoader")[0])
                           ["model_name"]) for s in devs]
    assert ranks == sorted(ranks, reverse=True)


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


@pytest.mark.parametrize("spec", FLUX2, ids=lambda s: s.name)
def test_readme_flux2_table_is_the_planners_answer(spec):
    """README's FLUX.2 rows name the workflow, the planner's files, policies and peaks for that tier."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    row = next(line for line in readme.splitlines() if line.startswith(f"| `{spec.name}` |"))
    p = MW.plan_for(spec)
    assert f"| {spec.vram} GB | {spec.family}" in row and f"`{p.model_format.file}`" in row
    assert f"`{p.text_encoder.file}` ({p.text_encoder_device})" in row and f"| {p.weights} |" in row
    assert " / ".join(f"{ph.vram_gib:.1f}" for ph in p.phases) in row
    assert f"| {max(ph.ram_gib for ph in p.phases):.1f} |" in row
