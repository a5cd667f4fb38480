"""The node declarations ComfyUI reads (inputs, tooltips, categories, display names, search aliases); each
execute body hands over to host/. Nothing here imports comfy.*; the pack's __init__.py registers the classes."""
