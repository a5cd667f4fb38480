"""Everything that talks to ComfyUI. The only package that imports comfy.*, folder_paths, comfy_api or
comfyui_version, and only inside functions, so the pack imports (tests, the CLI) where ComfyUI is absent.

compat.py names each difference between the host versions. The rest is what the nodes need from the host: our
MODEL (model.py with ops.py and patcher.py), our lazy CLIP (clip.py) and its cached encode (conditioning.py), the
tiled VAE around the host's VAE (vae.py), LoRA plans (lora.py), the attention override (attention.py) and the
model folders (files.py).
"""
