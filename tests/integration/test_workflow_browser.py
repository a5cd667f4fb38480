"""The bundled workflows in a real browser: ComfyUI's own frontend, served by a test ComfyUI and driven through
Playwright in Debian's chromium, does with each workflow what a person's clicks do.

For every workflow in workflows/: the page fetches it from the template browser's routes, loads it into the canvas
(`app.loadGraphData`), gets the CPU sizing a person would give it (KSampler steps 2, FluxKontextImageScale
bypassed), converts it with the frontend's own `app.graphToPrompt()` — which must give the very prompt that
tools/workflow_prompt.py's `ui_to_prompt(cpu_sized(workflow), object_info)` gives — and queues it
(`app.queuePrompt(0, 1)`); the server runs it, writes a real 128x128 image, the page shows that image on the
Save Image node and the per-phase report in the VRAM Report node's box (web/text_boxes.js). Errors from our frontend
extension (/extensions/comfyui-kontext-lowvram/...) fail the test; the frontend's own noise is printed. One
screenshot per workflow goes to pytest's tmp_path (printed; run with -s).

The files a workflow names are tiny random ones under those exact names (workflow_models.py). Skipped without
$COMFYUI_PATH, without the playwright package, or without a chromium ($KLV_CHROMIUM, else /usr/bin/chromium;
Playwright's own browser download is not needed).
"""
import json
import os
import re
import sys
from contextlib import contextmanager
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

import comfy_harness as H
import workflow_models as WM

sys.path.insert(0, str(H.REPO_ROOT / "tools"))
from workflow_prompt import ui_to_prompt  # noqa: E402

WORKFLOWS = sorted((H.REPO_ROOT / "workflows").glob("*.json"))
PACK = H.PACK_DIR_NAME
OUR_EXTENSION_FILES = f"/extensions/{PACK}/"
DEFAULT_CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
VIEWPORT = {"width": 1600, "height": 1000}
PAGE_READY_MS = 180_000
IMAGE_SHOWN_MS = 120_000
PROMPT_TIMEOUT_S = 1200  # v0.3.64's test transformer is 3072 wide; the machine may be busy with other runs
IMAGE_SIZE = 128
REPORT_WIDGET = "report"  # the box web/text_boxes.js adds to the VRAM Report node
# what the frontends show when a workflow names a model file the host lacks: v1.27's "Missing Models" dialog,
# v1.47's "<file> is missing" toast
NOTICE = re.compile(r"missing|not found", re.I)
NOTICE_SELECTOR = "[role=dialog], [role=alertdialog], [role=alert], [role=status], .p-dialog, .p-toast-message"


def load(path):
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chromium(comfy_root):
    """A headless chromium (Debian's, or $KLV_CHROMIUM) under Playwright; skips when either is absent."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright Python package is not installed in this venv (pip install playwright)")
    exe = os.environ.get("KLV_CHROMIUM", "").strip() or DEFAULT_CHROMIUM
    if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        pytest.skip(f"no chromium executable at {exe} (install Debian's chromium or set KLV_CHROMIUM)")
    pw = sync_playwright().start()
    try:
        browser = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
    finally:
        pw.stop()


@pytest.fixture(scope="module")
def server(chromium, comfy_root, flux_cfg):
    """A ComfyUI of this module's own (a fresh install, as a person's is), holding every file the workflows name."""
    srv = H.ComfyServer(comfy_root)
    try:
        for path in WORKFLOWS:
            if WM.loadable(load(path)):
                WM.write_files(srv, load(path), flux_cfg)
        srv.start(timeout=300)
        # a person past the first-run template dialog, which would otherwise cover the canvas of every new page
        srv.post_json("/settings/Comfy.TutorialCompleted", True)
        yield srv
    finally:
        srv.cleanup()


@pytest.fixture(scope="module")
def object_info(server):
    return server.object_info()


# ---------------------------------------------------------------------------------------------------------------
# the page
# ---------------------------------------------------------------------------------------------------------------

class WatchedPage:
    """A page of the ComfyUI frontend, with what it said: page errors, console errors, our extension's requests."""

    def __init__(self, page):
        self.page = page
        self.page_errors = []     # (message, stack)
        self.console = []         # (type, text, url)
        self.extension_responses = {}  # our extension's files: path -> HTTP status (or the failure)
        self.extension_lists = []  # the frontend's own GET /extensions (what it will import)
        page.on("pageerror", lambda e: self.page_errors.append((str(e), getattr(e, "stack", "") or "")))
        page.on("console", self._on_console)
        page.on("response", self._on_response)
        page.on("requestfailed", self._on_request_failed)

    def _on_console(self, msg):
        if msg.type in ("error", "warning"):
            self.console.append((msg.type, msg.text, (msg.location or {}).get("url", "")))

    def _on_response(self, response):
        path = urlparse(response.url).path
        if path.startswith(OUR_EXTENSION_FILES):
            self.extension_responses[path] = response.status
        elif path in ("/extensions", "/api/extensions"):
            self.extension_lists.append(response)

    def _on_request_failed(self, request):
        path = urlparse(request.url).path
        if path.startswith(OUR_EXTENSION_FILES):
            self.extension_responses[path] = f"failed: {request.failure}"

    def ours(self):
        """Problems of our own frontend code: page errors / console errors from our extension files, and the
        warning text_boxes.js logs when it could not show a report."""
        out = [f"page error: {m}\n{s}" for m, s in self.page_errors if OUR_EXTENSION_FILES in m + s]
        out += [f"console {t}: {text} ({url})" for t, text, url in self.console
                if (t == "error" and OUR_EXTENSION_FILES in text + url) or text.startswith("Kontext LowVRAM")]
        return out

    def noise(self):
        """Everything else the frontend complained about (404s for user.css, settings code, offline fetches...)."""
        ours = set(self.ours())
        out = [f"page error: {m}" for m, s in self.page_errors if f"page error: {m}\n{s}" not in ours]
        out += [f"console error: {text} ({url})" for t, text, url in self.console
                if t == "error" and f"console {t}: {text} ({url})" not in ours]
        return out

    def report_noise(self, label):
        noise = self.noise()
        if noise:
            print(f"\n[{label}] frontend noise, not from this pack ({len(noise)}):")
            for line in noise:
                print("   ", line[:300].replace("\n", " "))


@contextmanager
def opened(chromium, server):
    """A new tab on the server's frontend, ready: `window.app` set up, the graph canvas in the page, our
    extension files fetched."""
    context = chromium.new_context(viewport=VIEWPORT)
    try:
        w = WatchedPage(context.new_page())
        w.page.set_default_timeout(PAGE_READY_MS)
        w.page.goto(server.url + "/")
        w.page.wait_for_function(
            """() => { const app = window.app;
                       return !!(app && app.vueAppReady && app.canvas && app.canvas.graph && app.canvasEl
                                 && app.canvasEl.isConnected && Array.isArray(app.extensions)); }""")
        # the list the page itself got (the pack's web/ may change on disk while a session runs)
        assert w.extension_lists, "the page never asked the server for its frontend extensions (GET /extensions)"
        listed = w.extension_lists[0].json()
        ours = [u for u in listed if u.startswith(OUR_EXTENSION_FILES)]
        assert ours, f"the server lists no frontend extension of the pack under {OUR_EXTENSION_FILES} (web/)"
        for _ in range(300):  # the frontend fetches extensions during its setup; wait for the responses to land
            if all(u in w.extension_responses for u in ours):
                break
            w.page.wait_for_timeout(100)
        assert {u: w.extension_responses.get(u) for u in ours} == {u: 200 for u in ours}, \
            "the page did not load our extension files"
        yield w
    finally:
        context.close()


def fetch_json(page, url):
    return page.evaluate("async (url) => { const r = await fetch(url); if (!r.ok) throw new Error(url + ': ' + "
                         "r.status); return await r.json(); }", url)


def load_graph(page, graph):
    """`app.loadGraphData(graph)`, as opening a template does; returns the notices the frontend showed about
    missing files (its missing-model check runs inside loadGraphData, before the promise settles)."""
    page.evaluate("async (g) => { await window.app.loadGraphData(g); }", graph)
    return page.evaluate(
        """([selector, pattern]) => { const re = new RegExp(pattern, 'i');
             const texts = Array.from(document.querySelectorAll(selector)).map(e => e.innerText || '')
                                .filter(t => re.test(t));
             return texts.filter(t => !texts.some(o => o !== t && o.includes(t))); }""",
        [NOTICE_SELECTOR, NOTICE.pattern])


JS_NODES = "() => window.app.graph.nodes.map(n => ({id: String(n.id), type: n.type, mode: n.mode}))"

JS_CPU_SIZE = """({steps, bypass, stepNodes, scaleNodes}) => {
  // what a person does on a CPU: type 2 into the sampler's steps, bypass the 1-megapixel scaling (Ctrl+B)
  const done = [];
  for (const n of window.app.graph.nodes) {
    if (stepNodes.includes(n.type)) {
      const w = (n.widgets || []).find(w => w.name === 'steps');
      if (!w) throw new Error(n.type + ' #' + n.id + ' has no steps widget');
      w.value = steps;
      done.push([String(n.id), 'steps']);
    } else if (scaleNodes.includes(n.type)) {
      n.mode = bypass;
      done.push([String(n.id), 'bypass']);
    }
  }
  window.app.graph.setDirtyCanvas(true, true);
  return done;
}"""

JS_FIND = "const n = window.app.graph.nodes.find(n => String(n.id) === id);"

JS_IMAGE_SHOWN = """([id, filename, size]) => { """ + JS_FIND + """
  // what the canvas draws on the node: its preview images, loaded from /view
  const imgs = (n && n.imgs) || [];
  return imgs.some(i => i.complete && i.naturalWidth === size && i.naturalHeight === size
                        && new URL(i.src, location.href).searchParams.get('filename') === filename);
}"""

JS_REPORT_SHOWN = """([id, name, text]) => { """ + JS_FIND + """
  const w = n && (n.widgets || []).find(w => w.name === name);
  return !!w && w.value === text;
}"""


def prompt_differences(front: dict, ours: dict) -> list[str]:
    """Where two API prompts disagree in node ids, class types or inputs.

    Allowed: `_meta` (titles: v1.27 titles a node by its class name where v1.47 and the converter use the display
    name), and the value of a `seed` / `noise_seed` input when both are ints (the frontend's "control after
    generate" may re-randomize it; the converter keeps the file's). Nothing else."""
    diffs = []
    for nid in sorted(set(front) | set(ours), key=lambda s: (len(s), s)):
        a, b = front.get(nid), ours.get(nid)
        if a is None or b is None:
            diffs.append(f"node {nid}: frontend {a and a.get('class_type')!r}, converter {b and b.get('class_type')!r}")
            continue
        if a.get("class_type") != b.get("class_type"):
            diffs.append(f"node {nid}: class_type frontend {a.get('class_type')!r}, converter {b.get('class_type')!r}")
        ia, ib = a.get("inputs", {}), b.get("inputs", {})
        for name in sorted(set(ia) | set(ib)):
            va, vb = ia.get(name, "<absent>"), ib.get(name, "<absent>")
            if name in ("seed", "noise_seed") and isinstance(va, int) and isinstance(vb, int):
                continue
            if va != vb or (type(va) is bool) != (type(vb) is bool):  # True == 1 in Python, not in a prompt
                diffs.append(f"node {nid} ({b.get('class_type')}).{name}: frontend {va!r}, converter {vb!r}")
    return diffs


def the_one(items, what):
    items = list(items)
    assert len(items) == 1, f"expected one {what}, found {items}"
    return items[0]


# ---------------------------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------------------------

def test_the_page_gets_every_workflow_and_thumbnail_from_the_template_routes(chromium, server):
    with opened(chromium, server) as w:
        listed = fetch_json(w.page, "/workflow_templates")
        assert sorted(listed.get(PACK, [])) == sorted(p.stem for p in WORKFLOWS), listed
        for path in WORKFLOWS:
            assert fetch_json(w.page, f"/api/workflow_templates/{PACK}/{path.name}") == load(path), path.name
            thumb = path.with_suffix(".jpg")
            with Image.open(thumb) as img:
                size = list(img.size)
            decoded = w.page.evaluate(
                """async (url) => { const r = await fetch(url); const bmp = await createImageBitmap(await r.blob());
                                    return [r.status, bmp.width, bmp.height]; }""",
                f"/api/workflow_templates/{PACK}/{thumb.name}")
            assert decoded == [200, *size], f"{thumb.name}: the browser decoded {decoded}"
        assert not w.ours(), "\n".join(w.ours())
        w.report_noise("template routes")


def test_the_missing_model_check_sees_a_missing_file(chromium, server):
    """The control for the test below: on this frontend the notice check does see a file that is not there."""
    wf = load(next(p for p in WORKFLOWS if WM.loadable(load(p))))  # every other file it names is in place
    absent = "klv_no_such_model.safetensors"
    loader = the_one((n for n in wf["nodes"] if n["type"] == "LowVRAMModelLoader"), "model loader")
    loader["widgets_values"][0] = absent
    # a download entry such as the .safetensors loaders carry (.gguf loaders have none: make_workflows says why)
    loader.setdefault("properties", {})["models"] = [
        {"name": absent, "url": f"https://huggingface.co/klv/none/resolve/main/{absent}", "directory": "diffusion_models"}]
    with opened(chromium, server) as w:
        notices = load_graph(w.page, wf)
    assert any(absent in t for t in notices), f"the frontend said nothing of the missing {absent}: {notices}"


@pytest.mark.parametrize("path", WM.params(WORKFLOWS))
def test_the_frontend_finds_every_model_file_the_workflow_names(chromium, server, path):
    """Every file is in place, so the frontend must not tell the person that one is missing."""
    with opened(chromium, server) as w:
        notices = load_graph(w.page, fetch_json(w.page, f"/api/workflow_templates/{PACK}/{path.name}"))
    # (frontend v1.27 checks each loader's properties.models against GET /api/experiment/models/<directory>, which
    # lists only folder_paths.supported_pt_extensions: no .gguf, so it calls a present .gguf missing)
    assert not notices, (f"{path.stem}: with every file it names in place, ComfyUI's frontend says "
                         f"{json.dumps(notices)}")


@pytest.mark.parametrize("path", WM.params(WORKFLOWS, runs=True))
def test_workflow_loads_converts_runs_and_shows_its_image_in_the_browser(chromium, server, object_info, path,
                                                                         tmp_path):
    name = path.stem
    sized = WM.cpu_sized(load(path))
    ours = ui_to_prompt(sized, object_info)
    save_id = the_one((k for k, v in ours.items() if v["class_type"] == "SaveImage"), "SaveImage")
    report_ids = [k for k, v in ours.items() if v["class_type"] == "LowVRAMReport"]

    with opened(chromium, server) as w:
        page = w.page
        # 1. open the template, as the template browser does
        wf = fetch_json(page, f"/api/workflow_templates/{PACK}/{name}.json")
        assert wf == load(path)
        notices = load_graph(page, wf)
        if notices:  # asserted by test_the_frontend_finds_every_model_file_the_workflow_names; close it here
            print(f"\n[{name}] the frontend showed {notices!r}; closing it")
            page.keyboard.press("Escape")
        assert sorted((n["id"], n["type"]) for n in page.evaluate(JS_NODES)) == \
            sorted((str(n["id"]), n["type"]) for n in wf["nodes"]), "the canvas does not hold the workflow's nodes"

        # 2. size it for a CPU by hand; the frontend's graph must then be what cpu_sized() writes
        done = page.evaluate(JS_CPU_SIZE, {"steps": WM.CPU_STEPS, "bypass": WM.BYPASS,
                                           "stepNodes": list(WM.STEP_NODES),
                                           "scaleNodes": list(WM.SCALED_TO_A_MEGAPIXEL)})
        assert sorted(done) == sorted([str(n["id"]), "steps" if n["type"] in WM.STEP_NODES else "bypass"]
                                      for n in wf["nodes"]
                                      if n["type"] in (*WM.STEP_NODES, *WM.SCALED_TO_A_MEGAPIXEL))
        saved = {str(n["id"]): n for n in page.evaluate("() => window.app.graph.serialize()")["nodes"]}
        for n in sized["nodes"]:
            got = saved[str(n["id"])]
            assert (got.get("mode", 0), got.get("widgets_values") or []) == \
                (n.get("mode", 0), n.get("widgets_values") or []), \
                f"node {n['id']} ({n['type']}): the frontend keeps {got.get('widgets_values')}, mode " \
                f"{got.get('mode')}; the workflow file says {n.get('widgets_values')}, mode {n.get('mode')}"

        # 3. the frontend's own conversion is the converter's
        front = page.evaluate("async () => (await window.app.graphToPrompt()).output")
        diffs = prompt_differences(front, ours)
        assert not diffs, f"{name}: app.graphToPrompt() and ui_to_prompt() disagree:\n" + "\n".join(diffs)

        # 4. queue it from the page (the Run button's call) and wait for the server to finish it
        with page.expect_request(lambda r: r.method == "POST"
                                 and urlparse(r.url).path in ("/prompt", "/api/prompt")) as sent:
            queued = page.evaluate("async () => await window.app.queuePrompt(0, 1)")
        request = sent.value
        response = request.response()
        body = response.json()
        assert response.status == 200 and not body.get("node_errors"), f"queuePrompt -> {queued}: {body}"
        posted = request.post_data_json["prompt"]
        assert not prompt_differences(posted, ours), prompt_differences(posted, ours)
        entry = server.wait(body["prompt_id"], timeout=PROMPT_TIMEOUT_S)
        outputs = entry.get("outputs", {})

        # 5. the image: a real 128x128 PNG, carrying the prompt that ran and the workflow as the page had it
        info = the_one((outputs.get(save_id) or {}).get("images", []), f"image from node {save_id}")
        file = server.output_file(info)
        assert file.is_file(), file
        assert file.relative_to(server.output_dir).as_posix().startswith(f"kontext_lowvram/{name}")
        with Image.open(file) as img:
            assert img.format == "PNG" and img.size == (IMAGE_SIZE, IMAGE_SIZE), (img.format, img.size)
            pixels = np.asarray(img.convert("RGB"), dtype=np.float32)
            text = dict(getattr(img, "text", {}) or {})
        assert pixels.std() > 1.0, "the image is empty or flat"
        assert not prompt_differences(json.loads(text["prompt"]), posted), "the PNG's prompt is not what ran"
        embedded = {str(n["id"]): n for n in json.loads(text["workflow"])["nodes"]}
        assert {k: (n["type"], n.get("mode", 0)) for k, n in embedded.items()} == \
            {str(n["id"]): (n["type"], n.get("mode", 0)) for n in sized["nodes"]}

        # 6. the page shows it: the report in the VRAM Report node's box, the image on the Save Image node
        for rid in report_ids:
            report = "\n".join(outputs[rid]["text"])
            assert "denoise" in report and "VAE decode" in report, report
            page.wait_for_function(JS_REPORT_SHOWN, arg=[rid, REPORT_WIDGET, report], timeout=IMAGE_SHOWN_MS)
        page.evaluate("(id) => { " + JS_FIND + " window.app.canvas.centerOnNode(n); "
                      "window.app.graph.setDirtyCanvas(true, true); }", save_id)
        page.wait_for_function(JS_IMAGE_SHOWN, arg=[save_id, info["filename"], IMAGE_SIZE], timeout=IMAGE_SHOWN_MS)
        shot = tmp_path / f"{name}.png"
        page.screenshot(path=str(shot))
        print(f"\n[{name}] screenshot: {shot}")

        # 7. nothing from our extension went wrong in the page
        assert not w.ours(), f"{name}: our frontend extension failed:\n" + "\n".join(w.ours())
        w.report_noise(name)
