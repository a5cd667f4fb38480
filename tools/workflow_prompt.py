"""Turn a UI (graph) workflow into the API prompt ComfyUI's /prompt takes, as the frontend's graphToPrompt does.

    prompt = ui_to_prompt(workflow, object_info)   # object_info: GET /object_info of the host that will run it

Widget values are matched to inputs by the host's own input order; links become [source id, output slot].
Frontend-only nodes (notes, reroutes) are dropped; muted nodes (mode 2) are dropped; bypassed nodes (mode 4) pass
their input of the same type through. tests/integration/test_workflow_browser.py checks this against the real
frontend's own conversion.
"""
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"MarkdownNote", "Note", "Reroute", "PrimitiveNode"}
MUTED, BYPASSED = 2, 4


class WorkflowError(ValueError):
    pass


def _input_order(info: dict) -> list[tuple[str, list]]:
    spec = info.get("input", {})
    order = info.get("input_order") or {s: list(spec.get(s, {})) for s in ("required", "optional")}
    return [(name, spec[section][name]) for section in ("required", "optional") for name in order.get(section, [])
            if name in spec.get(section, {})]


def _is_widget(spec: list) -> bool:
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput")


def _extra_values(name: str, spec: list) -> int:
    """Values the frontend stores after this widget's own: the seed's 'control after generate' and the image
    upload button."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    n = 0
    if spec[0] == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
        n += 1
    if opts.get("image_upload") or opts.get("video_upload") or opts.get("audio_upload"):
        n += 1
    return n


def ui_to_prompt(workflow: dict, object_info: dict) -> dict:
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):  # the newer serialisation
            link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                    link["type"]]
        links[link[0]] = link

    def source(link_id, seen=()):
        """[node id, slot] feeding a link, through bypassed nodes; None when it leads nowhere."""
        _, src, slot, _, _, ltype = links[link_id]
        n = nodes.get(src)
        if n is None or n.get("mode") == MUTED:
            return None
        if n.get("mode") == BYPASSED or n["type"] == "Reroute":
            if src in seen:
                raise WorkflowError(f"link cycle through node {src}")
            for inp in n.get("inputs", []):
                if inp.get("link") is not None and (n["type"] == "Reroute" or inp.get("type") in (ltype, "*")):
                    return source(inp["link"], seen + (src,))
            return None
        return [str(src), slot]

    prompt = {}
    for nid, n in nodes.items():
        if n["type"] in FRONTEND_ONLY or n.get("mode") in (MUTED, BYPASSED):
            continue
        info = object_info.get(n["type"])
        if info is None:
            raise WorkflowError(f"node {nid} is a {n['type']}, which this ComfyUI does not have: install the pack "
                                "that provides it (ComfyUI Manager's 'Install Missing Custom Nodes')")
        linked = {inp["name"]: inp["link"] for inp in n.get("inputs", []) if inp.get("link") is not None}
        values = list(n.get("widgets_values") or [])
        if isinstance(n.get("widgets_values"), dict):
            raise WorkflowError(f"node {nid} ({n['type']}) stores its widgets by name, which this converter "
                                "does not read")
        inputs, pos = {}, 0
        for name, spec in _input_order(info):
            if _is_widget(spec):
                if pos < len(values):
                    inputs[name] = values[pos]
                pos += 1 + _extra_values(name, spec)
            if name in linked:
                src = source(linked[name])
                if src is not None:
                    inputs[name] = src
        prompt[str(nid)] = {"class_type": n["type"], "inputs": inputs,
                            "_meta": {"title": n.get("title") or info.get("display_name") or n["type"]}}
    return prompt
