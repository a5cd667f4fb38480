// Kontext LowVRAM: shows the "Convert Model" node's summary (its UI output `text`) in a read-only box on the node.
// Only the public `app` module is imported, so it loads on the old and the new ComfyUI frontend alike.
import { app } from "../../scripts/app.js";

const NODE_CLASS = "LowVRAMConvert";
const WIDGET = "conversion";

function summaryBox(node) {
  const found = node.widgets?.find((w) => w.name === WIDGET);
  if (found) return found;
  let widget;
  if (typeof node.addDOMWidget === "function") {
    const box = document.createElement("textarea");
    box.readOnly = true;
    box.spellcheck = false;
    box.placeholder = "Queue the prompt: what was written appears here.";
    Object.assign(box.style, { width: "100%", minHeight: "110px", fontFamily: "monospace", fontSize: "11px" });
    widget = node.addDOMWidget(WIDGET, "customtext", box, {
      serialize: false, // display only: never sent with the prompt
      getValue: () => box.value,
      setValue: (v) => { box.value = v ?? ""; },
    });
  } else { // frontends without DOM widgets: a plain text widget
    widget = node.addWidget("text", WIDGET, "", () => {}, { multiline: true, serialize: false });
  }
  widget.serialize = false; // nor saved with the workflow
  return widget;
}

app.registerExtension({
  name: "KontextLowVRAM.Convert",
  nodeCreated(node) {
    if (node?.comfyClass === NODE_CLASS) summaryBox(node);
  },
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_CLASS) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      try {
        const text = message?.text;
        summaryBox(this).value = Array.isArray(text) ? text.join("\n") : String(text ?? "");
        this.setDirtyCanvas?.(true, true);
      } catch (e) { // a display problem must never break the frontend
        console.warn("Kontext LowVRAM convert:", e);
      }
      return result;
    };
  },
});
