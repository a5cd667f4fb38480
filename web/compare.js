// Kontext LowVRAM: shows the "Compare Images" node's numbers (its UI output `text`) in a read-only box on the node.
// Only the public `app` module is imported, so it loads on the old and the new ComfyUI frontend alike.
import { app } from "../../scripts/app.js";

const NODE_CLASS = "LowVRAMCompareImages";
const WIDGET = "numbers";

function numbersBox(node) {
  const found = node.widgets?.find((w) => w.name === WIDGET);
  if (found) return found;
  const widget = node.addWidget("text", WIDGET, "", () => {}, { multiline: true, serialize: false });
  widget.serialize = false; // display only: neither sent with the prompt nor saved with the workflow
  return widget;
}

app.registerExtension({
  name: "KontextLowVRAM.CompareImages",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData?.name !== NODE_CLASS) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      try {
        const text = message?.text;
        numbersBox(this).value = Array.isArray(text) ? text.join("\n") : String(text ?? "");
        this.setDirtyCanvas?.(true, true);
      } catch (e) { // a display problem must never break the frontend
        console.warn("Kontext LowVRAM compare:", e);
      }
      return result;
    };
  },
});
