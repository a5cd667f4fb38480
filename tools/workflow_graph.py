"""A small builder for ComfyUI's UI (graph) workflow format, the one the frontend saves and people share.

Each node type the bundled workflows use has one row in SLOTS: its linked inputs, its widgets in the order the
frontend stores `widgets_values`, and its outputs. Our nodes' rows are checked against their INPUT_TYPES by the
unit tests, and every row against a real host's /object_info by the integration tests, so a row cannot drift.
"""
import json
import uuid
from dataclasses import dataclass, field

ANY = "*"

#: type -> (linked inputs [(name, type)], widgets [name], outputs [(name, type)])
SLOTS = {
    # ours
    "LowVRAMModelLoader": ([], ["model_name", "compute_dtype", "convert_on_load", "fp8_matmul", "torch_compile"],
                           [("model", "MODEL")]),
    "LowVRAMAttention": ([("model", "MODEL")], ["backend", "split_chunk_mb"], [("model", "MODEL")]),
    "LowVRAMLoraLoader": ([("model", "MODEL")], ["lora_name", "strength_model"], [("model", "MODEL")]),
    "LowVRAMTextEncoderLoader": ([], ["clip_l_name", "t5xxl_name", "device"], [("clip", "CLIP")]),
    "LowVRAMTextEncode": ([("clip", "CLIP")], ["clip_l", "t5xxl", "guidance", "cache", "cache_max_mb"],
                          [("CONDITIONING", "CONDITIONING")]),
    "LowVRAMLLMTextEncoderLoader": ([], ["text_encoder_name", "device"], [("clip", "CLIP")]),
    "LowVRAMTextEncodeFlux2": ([("clip", "CLIP")], ["text", "cache", "cache_max_mb"],
                               [("CONDITIONING", "CONDITIONING")]),
    "LowVRAMTiledVAEEncode": ([("pixels", "IMAGE"), ("vae", "VAE")], ["tile_size", "vram_budget_mb"],
                              [("LATENT", "LATENT")]),
    "LowVRAMTiledVAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], ["tile_size", "vram_budget_mb"],
                              [("IMAGE", "IMAGE")]),
    "LowVRAMReport": ([("value", ANY)], [], [("value", ANY)]),
    # ComfyUI core
    "VAELoader": ([], ["vae_name"], [("VAE", "VAE")]),
    "LoadImage": ([], ["image", "upload"], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "FluxKontextImageScale": ([("image", "IMAGE")], [], [("IMAGE", "IMAGE")]),
    "ReferenceLatent": ([("conditioning", "CONDITIONING"), ("latent", "LATENT")], [],
                        [("CONDITIONING", "CONDITIONING")]),
    "FluxKontextMultiReferenceLatentMethod": ([("conditioning", "CONDITIONING")], ["reference_latents_method"],
                                              [("CONDITIONING", "CONDITIONING")]),
    "ConditioningZeroOut": ([("conditioning", "CONDITIONING")], [], [("CONDITIONING", "CONDITIONING")]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")],
                 ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
                 [("LATENT", "LATENT")]),
    "SaveImage": ([("images", "IMAGE")], ["filename_prefix"], []),
    # ComfyUI core, the FLUX.2 graph (its own templates' nodes; v0.29)
    "ImageScaleToTotalPixels": ([("image", "IMAGE")], ["upscale_method", "megapixels", "resolution_steps"],
                                [("IMAGE", "IMAGE")]),
    "FluxGuidance": ([("conditioning", "CONDITIONING")], ["guidance"], [("CONDITIONING", "CONDITIONING")]),
    "RandomNoise": ([], ["noise_seed", "control_after_generate"], [("NOISE", "NOISE")]),
    "KSamplerSelect": ([], ["sampler_name"], [("SAMPLER", "SAMPLER")]),
    "Flux2Scheduler": ([], ["steps", "width", "height"], [("SIGMAS", "SIGMAS")]),
    "BasicGuider": ([("model", "MODEL"), ("conditioning", "CONDITIONING")], [], [("GUIDER", "GUIDER")]),
    "CFGGuider": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING")], ["cfg"],
                  [("GUIDER", "GUIDER")]),
    "SamplerCustomAdvanced": ([("noise", "NOISE"), ("guider", "GUIDER"), ("sampler", "SAMPLER"),
                               ("sigmas", "SIGMAS"), ("latent_image", "LATENT")], [],
                              [("output", "LATENT"), ("denoised_output", "LATENT")]),
    # the frontend's own (never sent to the server)
    "MarkdownNote": ([], ["text"], []),
}
FRONTEND_ONLY = {"MarkdownNote", "Note"}
# the frontend's widgets that are not inputs of the node: they store a value but send none
UI_ONLY_WIDGETS = {"control_after_generate", "upload"}
GROUP_COLOR = "#3f789e"


@dataclass
class Node:
    id: int
    type: str
    pos: tuple
    size: tuple
    widgets: dict
    title: str | None = None
    properties: dict = field(default_factory=dict)
    links_in: dict = field(default_factory=dict)  # input name -> link id
    links_out: dict = field(default_factory=dict)  # output slot -> [link ids]


class Graph:
    def __init__(self, name: str):
        self.id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"kontext-lowvram/{name}"))  # stable across regenerations
        self.nodes: list[Node] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def add(self, type_: str, pos, size=(320, 130), title=None, properties=None, **widgets) -> Node:
        _, names, _ = SLOTS[type_]
        unknown = set(widgets) - set(names)
        missing = set(names) - set(widgets)
        if unknown or missing:
            raise ValueError(f"{type_}: unknown widgets {sorted(unknown)}, missing {sorted(missing)}")
        n = Node(len(self.nodes) + 1, type_, tuple(pos), tuple(size), widgets, title, dict(properties or {}))
        if n.properties.get("models") == []:
            del n.properties["models"]
        n.properties.setdefault("Node name for S&R", type_)
        self.nodes.append(n)
        return n

    def link(self, src: Node, out_slot: int, dst: Node, input_name: str) -> None:
        inputs = [name for name, _ in SLOTS[dst.type][0]]
        if input_name not in inputs or input_name in dst.links_in:
            raise ValueError(f"{dst.type} has no free input {input_name!r}")
        out_type = SLOTS[src.type][2][out_slot][1]
        in_type = dict(SLOTS[dst.type][0])[input_name]
        if ANY not in (out_type, in_type) and out_type != in_type:
            raise ValueError(f"{src.type}[{out_slot}] is {out_type}, {dst.type}.{input_name} takes {in_type}")
        link_id = len(self.links) + 1
        self.links.append([link_id, src.id, out_slot, dst.id, inputs.index(input_name),
                           out_type if out_type != ANY else in_type])
        dst.links_in[input_name] = link_id
        src.links_out.setdefault(out_slot, []).append(link_id)

    def group(self, title: str, nodes: list[Node], pad: int = 30) -> None:
        x0 = min(n.pos[0] for n in nodes) - pad
        y0 = min(n.pos[1] for n in nodes) - pad - 40  # room for the title bar
        x1 = max(n.pos[0] + n.size[0] for n in nodes) + pad
        y1 = max(n.pos[1] + n.size[1] for n in nodes) + pad
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": [x0, y0, x1 - x0, y1 - y0],
                            "color": GROUP_COLOR, "font_size": 24, "flags": {}})

    def to_json(self) -> dict:
        return {
            "id": self.id, "revision": 0,
            "last_node_id": len(self.nodes), "last_link_id": len(self.links),
            "nodes": [self._node_json(n, order) for order, n in enumerate(self._execution_order())],
            "links": self.links, "groups": self.groups,
            "config": {}, "extra": {"ds": {"scale": 0.75, "offset": [520, 80]}, "frontendVersion": "1.27.10"},
            "version": 0.4,
        }

    def _execution_order(self) -> list[Node]:
        """Nodes sorted so every node comes after its inputs (the frontend's `order`)."""
        by_id = {n.id: n for n in self.nodes}
        src_of = {link[0]: link[1] for link in self.links}
        done, out = set(), []

        def visit(n):
            if n.id in done:
                return
            for link_id in n.links_in.values():
                visit(by_id[src_of[link_id]])
            done.add(n.id)
            out.append(n)
        for n in self.nodes:
            visit(n)
        return out

    def _node_json(self, n: Node, order: int) -> dict:
        inputs, widget_names, outputs = SLOTS[n.type]
        d = {"id": n.id, "type": n.type, "pos": list(n.pos), "size": list(n.size), "flags": {}, "order": order,
             "mode": 0,
             "inputs": [{"name": name, "type": t, "link": n.links_in.get(name)} for name, t in inputs],
             "outputs": [{"name": name, "type": t, "links": n.links_out.get(slot, []), "slot_index": slot}
                         for slot, (name, t) in enumerate(outputs)],
             "properties": n.properties,
             "widgets_values": [n.widgets[w] for w in widget_names]}
        if n.title:
            d["title"] = n.title
        if n.type in FRONTEND_ONLY:
            d["color"], d["bgcolor"] = "#432", "#653"
        return d


def model_nodes(g: Graph, model_file: str, models: list, attention_backend: str) -> tuple:
    """Step 1's first two nodes in every bundled workflow: our model loader (with its download entries) and the
    attention backend it feeds. Returns (loader, attention)."""
    loader = g.add("LowVRAMModelLoader", (0, 0), (360, 190), properties={"models": models}, model_name=model_file,
                   compute_dtype="default", convert_on_load="none", fp8_matmul=True, torch_compile=False)
    attention = g.add("LowVRAMAttention", (0, 240), (360, 110), backend=attention_backend, split_chunk_mb=1024)
    g.link(loader, 0, attention, "model")
    return loader, attention


def decode_group(g: Graph, x: int, samples: Node, vae: Node, vram_budget_mb: int, name: str) -> None:
    """Step 5 of every bundled workflow: the tiled decode, the VRAM report it passes through, the saved image."""
    decode = g.add("LowVRAMTiledVAEDecode", (x, 0), (340, 110), tile_size=0, vram_budget_mb=vram_budget_mb)
    report = g.add("LowVRAMReport", (x, 150), (340, 220))
    save = g.add("SaveImage", (x, 410), (420, 460), filename_prefix=f"kontext_lowvram/{name}")
    g.link(samples, 0, decode, "samples")
    g.link(vae, 0, decode, "vae")
    g.link(decode, 0, report, "value")
    g.link(report, 0, save, "images")
    g.group("5 Decode", [decode, report, save])


def dumps(graph: dict) -> str:
    return json.dumps(graph, indent=1, ensure_ascii=False) + "\n"
