// Kontext LowVRAM: shows a node's text result (its UI output `text`) in a read-only box on the node, for each node
// in BOXES. Only the public `app` module is imported, so it loads on the old and the new ComfyUI frontend alike.
import { app } from "../../scripts/app.js";

// node class -> the box: widget name, what it says before a run, its height
const BOXES = {
  LowVRAMReport: { widget: "report", placeholder: "Run the workflow: the per-phase report appears here.",
                   minHeight: "140px" },
  LowVRAMConvert: { widget: "conversion", placeholder: "Queue the prompt: what was written appears here.",
                    minHeight: "110px" },
  LowVRAMCompareImages: { widget: "numbers", placeholder: "Queue the prompt: the numbers appear here.",
                          minHeight: "90px" },
};

function textBox(node, spec) {
  const found = node.widgets?.find((w) => w.name === spec.widget);
  if (found) return found;
  let widget;
  if (typeof node.addDOMWidget === "function") {
    const box = document.createElement("textarea");
    box.readOnly = true;
    box.spellcheck = false;
    box.placeholder = spec.placeholder;
    Object.assign(box.style, { width: "100%", minHeight: spec.minHeight, fontFamily: "monospace", fontSize: "11px" });
    widget = node.addDOMWidget(spec.widget, "customtext", box, {
      serialize: false, // display only: never sent with the prompt
      getValue: () => box.value,
      setValue: (v) => { box.value = v ?? ""; },
    });
  } else { // frontends without DOM widgets: a plain text widget
    widget = node.addWidget("text", spec.widget, "", () => {}, { multiline: true, serialize: false });
  }
  widget.serialize = false; // nor saved with the workflow
  return widget;
}

app.registerExtension({
  name: "KontextLowVRAM.TextBoxes",
  nodeCreated(node) {
    const spec = BOXES[node?.comfyClass];
    if (spec) textBox(node, spec);
  },
  beforeRegisterNodeDef(nodeType, nodeData) {
    const spec = BOXES[nodeData?.name];
    if (!spec) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      try {
        const text = message?.text;
        textBox(this, spec).value = Array.isArray(text) ? text.join("\n") : String(text ?? "");
        this.setDirtyCanvas?.(true, true);
      } catch (e) { // a display problem must never break the frontend
        console.warn(`Kontext LowVRAM ${nodeData.name}:`, e);
      }
      return result;
    };
  },
});
