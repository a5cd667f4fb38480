"""The bundled workflows inside a real ComfyUI: served to the template browser, every node and widget value valid
by the host's own /object_info, and each one, converted to an API prompt, runs and writes an image.

The files the workflows name are tiny random ones under those exact names (workflow_models.py); the only change
to a workflow is what a person on a CPU would make: 2 steps and the scale to a megapixel bypassed (128 px image).
The FLUX.2 workflows skip on a ComfyUI that predates FLUX.2 (v0.3.64); the FLUX.2 [dev] ones also where core's
Mistral tokenizer cannot be built (a transformers it does not support).
"""
import json
import sys
import urllib.request

import numpy as np
import pytest
from PIL import Image

import comfy_harness as H
import workflow_models as WM

sys.path.insert(0, str(H.REPO_ROOT / "tools"))
from workflow_graph import FRONTEND_ONLY, SLOTS, UI_ONLY_WIDGETS  # noqa: E402
from workflow_prompt import ui_to_prompt  # noqa: E402

WORKFLOWS = sorted((H.REPO_ROOT / "workflows").glob("*.json"))


def load(path):
    return json.loads(path.read_text(encoding="utf-8"))


VALID = WM.params(WORKFLOWS)
RUNS = WM.params(WORKFLOWS, runs=True)


@pytest.fixture(scope="module")
def object_info(comfy, flux_cfg):
    """The host's /object_info once every file the workflows name is in place (file combos list them)."""
    for path in WORKFLOWS:
        if WM.loadable(load(path)):
            WM.write_files(comfy, load(path), flux_cfg)
    return comfy.object_info()


def test_the_template_browser_gets_every_workflow_and_thumbnail(comfy):
    listed = comfy.get_json("/workflow_templates")
    assert sorted(listed.get(H.PACK_DIR_NAME, [])) == sorted(p.stem for p in WORKFLOWS)
    for path in WORKFLOWS:
        assert comfy.get_json(f"/api/workflow_templates/{H.PACK_DIR_NAME}/{path.name}") == load(path)
        with urllib.request.urlopen(f"{comfy.url}/api/workflow_templates/{H.PACK_DIR_NAME}/{path.stem}.jpg",
                                    timeout=30) as r:
            assert r.read() == path.with_suffix(".jpg").read_bytes()


def _choices(spec):
    """A combo's choices in either host's form: [[...], {...}] or ["COMBO", {"options": [...]}]."""
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO":
        return spec[1].get("options", [])
    return None


def _widget_inputs(info):
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info["input"][section][name]
            opts = spec[1] if len(spec) > 1 else {}
            if (_choices(spec) is not None or spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN")) \
                    and not opts.get("forceInput"):
                yield name, spec


@pytest.mark.parametrize("path", VALID)
def test_every_node_and_widget_value_is_valid_for_this_host(object_info, path):
    for n in load(path)["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            continue
        assert n["type"] in object_info, f"{n['type']} is not a node of this ComfyUI"
        info = object_info[n["type"]]
        linked, widget_names, outputs = SLOTS[n["type"]]
        expected = list(_widget_inputs(info))
        assert [name for name, _ in expected] == [w for w in widget_names if w not in UI_ONLY_WIDGETS], n["type"]
        every_input = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for name, ltype in linked:
            assert name in every_input and (ltype == "*" or every_input[name][0] == ltype), f"{n['type']}.{name}"
        # a prefix: v0.29's SaveImage also declares an IMAGE output the graph need not show
        assert info["output"][:len(outputs)] == [t for _, t in outputs], n["type"]
        values = dict(zip(widget_names, n["widgets_values"]))
        for name, spec in expected:
            v, opts = values[name], spec[1] if len(spec) > 1 else {}
            choices = _choices(spec)
            if choices is not None:
                assert v in choices, f"{path.stem}: {n['type']}.{name}={v!r} is not one of {choices[:8]}"
            elif spec[0] in ("INT", "FLOAT"):
                assert opts.get("min", v) <= v <= opts.get("max", v), f"{n['type']}.{name}={v}"
            elif spec[0] == "BOOLEAN":
                assert isinstance(v, bool)
            else:
                assert isinstance(v, str)


@pytest.mark.parametrize("path", RUNS)
def test_workflow_runs_and_writes_an_image(comfy, object_info, path):
    wf = WM.cpu_sized(load(path))
    prompt = ui_to_prompt(wf, object_info)
    (save_id,) = [k for k, v in prompt.items() if v["class_type"] == "SaveImage"]
    outputs = comfy.run(prompt, timeout=1200)
    (image,) = comfy.saved_images(outputs, save_id)
    with Image.open(image) as img:
        a = np.asarray(img.convert("RGB"), dtype=np.float32)
    assert a.shape == (128, 128, 3) and a.std() > 1.0, "the image is empty or flat"
    assert image.relative_to(comfy.output_dir).as_posix().startswith(f"kontext_lowvram/{path.stem}")
    (report_id,) = [k for k, v in prompt.items() if v["class_type"] == "LowVRAMReport"]
    report = "\n".join(outputs[report_id]["text"])
    assert "denoise" in report and "VAE decode" in report, report
