"""tools/workflow_prompt.py: UI graph -> API prompt, on a hand-written /object_info fragment shaped as a host
serves it. (The real frontend's own conversion is the reference in tests/integration/test_workflow_browser.py.)"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from workflow_prompt import WorkflowError, ui_to_prompt  # noqa: E402

OBJECT_INFO = {
    "LoadImage": {"input": {"required": {"image": [["a.png", "b.png"], {"image_upload": True}]}},
                  "input_order": {"required": ["image"]}, "display_name": "Load Image"},
    "ImageScale": {"input": {"required": {"image": ["IMAGE"], "width": ["INT", {"default": 512}],
                                          "method": [["nearest", "bilinear"]]}},
                   "input_order": {"required": ["image", "width", "method"]}},
    "KSampler": {"input": {"required": {"model": ["MODEL"], "seed": ["INT", {"control_after_generate": True}],
                                        "steps": ["INT"], "positive": ["CONDITIONING"]},
                           "optional": {"denoise": ["FLOAT"]}},
                 "input_order": {"required": ["model", "seed", "steps", "positive"], "optional": ["denoise"]}},
    "Loader": {"input": {"required": {"name": [["m.gguf"]]}}},  # an older host: no input_order
    "Encode": {"input": {"required": {"text": ["STRING", {"multiline": True}], "clip": ["CLIP"],
                                      "strength": ["FLOAT", {"forceInput": True}]}}},
    "SaveImage": {"input": {"required": {"images": ["IMAGE"], "filename_prefix": ["STRING"]}}},
}


def node(id_, type_, widgets=(), inputs=(), outputs=(), mode=0, title=None):
    n = {"id": id_, "type": type_, "mode": mode, "widgets_values": list(widgets),
         "inputs": [{"name": name, "type": t, "link": link} for name, t, link in inputs],
         "outputs": [{"name": t, "type": t, "links": links} for t, links in outputs]}
    if title:
        n["title"] = title
    return n


def graph(*nodes, links=()):
    return {"nodes": list(nodes), "links": [list(x) for x in links]}


def test_widgets_follow_the_hosts_input_order_and_skip_ui_only_values():
    wf = graph(
        node(1, "LoadImage", ["b.png", "image"], outputs=[("IMAGE", [1])]),
        node(2, "ImageScale", [768, "bilinear"], inputs=[("image", "IMAGE", 1)], outputs=[("IMAGE", [2])]),
        node(3, "Loader", ["m.gguf"], outputs=[("MODEL", [3])]),
        node(4, "KSampler", [42, "randomize", 20, 0.75], inputs=[("model", "MODEL", 3)], title="Sampler"),
        node(5, "SaveImage", ["out/x"], inputs=[("images", "IMAGE", 2)]),
        links=[(1, 1, 0, 2, 0, "IMAGE"), (2, 2, 0, 5, 0, "IMAGE"), (3, 3, 0, 4, 0, "MODEL")])
    p = ui_to_prompt(wf, OBJECT_INFO)
    assert p["1"] == {"class_type": "LoadImage", "inputs": {"image": "b.png"}, "_meta": {"title": "Load Image"}}
    assert p["2"]["inputs"] == {"image": ["1", 0], "width": 768, "method": "bilinear"}
    assert p["3"]["inputs"] == {"name": "m.gguf"}
    assert p["4"]["inputs"] == {"model": ["3", 0], "seed": 42, "steps": 20, "denoise": 0.75}
    assert p["4"]["_meta"]["title"] == "Sampler"
    assert p["5"]["inputs"] == {"images": ["2", 0], "filename_prefix": "out/x"}


def test_a_linked_widget_takes_the_link_and_force_input_takes_no_value():
    wf = graph(node(1, "Loader", ["m.gguf"], outputs=[("MODEL", [])]),
               node(2, "ImageScale", [512, "nearest"], outputs=[("INT", [1])]),
               node(3, "Encode", ["hello"], inputs=[("clip", "CLIP", None), ("strength", "FLOAT", 1)]),
               links=[(1, 2, 0, 3, 1, "FLOAT")])
    p = ui_to_prompt(wf, OBJECT_INFO)
    assert p["3"]["inputs"] == {"text": "hello", "strength": ["2", 0]}


def test_notes_muted_and_bypassed_nodes():
    wf = graph(
        node(1, "LoadImage", ["a.png", "image"], outputs=[("IMAGE", [1])]),
        node(2, "ImageScale", [64, "nearest"], inputs=[("image", "IMAGE", 1)], outputs=[("IMAGE", [2])], mode=4),
        node(3, "SaveImage", ["x"], inputs=[("images", "IMAGE", 2)]),
        node(4, "MarkdownNote", ["# read me"]),
        node(5, "SaveImage", ["muted"], mode=2),
        links=[(1, 1, 0, 2, 0, "IMAGE"), (2, 2, 0, 3, 0, "IMAGE")])
    p = ui_to_prompt(wf, OBJECT_INFO)
    assert set(p) == {"1", "3"}
    assert p["3"]["inputs"]["images"] == ["1", 0]  # through the bypassed scale


def test_links_in_the_newer_object_form():
    wf = graph(node(1, "LoadImage", ["a.png", "image"], outputs=[("IMAGE", [7])]),
               node(2, "SaveImage", ["x"], inputs=[("images", "IMAGE", 7)]))
    wf["links"] = [{"id": 7, "origin_id": 1, "origin_slot": 0, "target_id": 2, "target_slot": 0, "type": "IMAGE"}]
    assert ui_to_prompt(wf, OBJECT_INFO)["2"]["inputs"]["images"] == ["1", 0]


def test_a_node_the_host_lacks_is_named():
    with pytest.raises(WorkflowError, match="node 9 is a NotInstalled"):
        ui_to_prompt(graph(node(9, "NotInstalled")), OBJECT_INFO)
