"""The FLUX.2 ([dev], [klein]) tier workflows: the graph of ComfyUI's own FLUX.2 edit templates
(comfyui-workflow-templates: image_flux2_fp8, image_flux2_klein_image_edit_*_distilled), with our loaders, the cached
encode, the tiled VAE and the report in place of core's nodes.

The image is scaled to ~1 megapixel and encoded; that latent is both the reference (core's ReferenceLatent; FLUX.2
indexes its references natively) and the sampler's latent_image, whose content a full-strength denoise ignores (it
gives the size, as EmptyFlux2LatentImage + GetImageSize do in the templates). Flux2Scheduler gets 1024x1024: its
shift depends on the pixel count only, which the scale holds at one megapixel.
"""
from workflow_graph import Graph, decode_group, model_nodes

from kontext_lowvram.optimizations import memory_model as mm

HF = "https://huggingface.co/"
#: file name -> (models folder, where people download it). GGUF names follow city96's / unsloth's repositories.
DOWNLOADS = {
    "flux2-dev.safetensors":
        ("diffusion_models", HF + "black-forest-labs/FLUX.2-dev/resolve/main/flux2-dev.safetensors"),
    "flux2_dev_fp8mixed.safetensors":
        ("diffusion_models", HF + "Comfy-Org/flux2-dev/resolve/main/split_files/diffusion_models/"
                                  "flux2_dev_fp8mixed.safetensors"),
    "flux-2-klein-4b.safetensors":
        ("diffusion_models", HF + "black-forest-labs/FLUX.2-klein-4B/resolve/main/flux-2-klein-4b.safetensors"),
    "flux-2-klein-4b-fp8.safetensors":
        ("diffusion_models", HF + "black-forest-labs/FLUX.2-klein-4b-fp8/resolve/main/flux-2-klein-4b-fp8.safetensors"),
    "flux-2-klein-9b.safetensors":
        ("diffusion_models", HF + "black-forest-labs/FLUX.2-klein-9B/resolve/main/flux-2-klein-9b.safetensors"),
    "flux-2-klein-9b-fp8.safetensors":
        ("diffusion_models", HF + "black-forest-labs/FLUX.2-klein-9b-fp8/resolve/main/flux-2-klein-9b-fp8.safetensors"),
    "mistral_3_small_flux2_fp8.safetensors":
        ("text_encoders", HF + "Comfy-Org/flux2-dev/resolve/main/split_files/text_encoders/"
                               "mistral_3_small_flux2_fp8.safetensors"),
    "qwen_3_4b.safetensors":
        ("text_encoders", HF + "Comfy-Org/z_image_turbo/resolve/main/split_files/text_encoders/qwen_3_4b.safetensors"),
    "qwen_3_8b_fp8mixed.safetensors":
        ("text_encoders", HF + "Comfy-Org/flux2-klein-9B/resolve/main/split_files/text_encoders/"
                               "qwen_3_8b_fp8mixed.safetensors"),
    "flux2-vae.safetensors": ("vae", HF + "Comfy-Org/flux2-dev/resolve/main/split_files/vae/flux2-vae.safetensors"),
}
#: GGUF repositories (model pages: the note links them, the loaders get no download entry; see models_entry)
# [klein] GGUFs come from several community repositories: a Hugging Face search lists them all
GGUF_PAGES = {"flux2-dev": HF + "city96/FLUX.2-dev-gguf",
              "flux-2-klein-4b": HF + "models?search=flux.2-klein-4b%20gguf",
              "flux-2-klein-9b": HF + "models?search=flux.2-klein-9b%20gguf", "Qwen3-4B": HF + "unsloth/Qwen3-4B-GGUF",
              "Qwen3-8B": HF + "unsloth/Qwen3-8B-GGUF"}
VAE_FILE = "flux2-vae.safetensors"
DEV_GUIDANCE = 4.0  # ComfyUI's FLUX.2 [dev] templates (FluxGuidance 4)
KLEIN_CFG = 1.0  # the distilled [klein] models: 4 steps at CFG 1 (BFL's model cards, ComfyUI's templates)
EDIT_PROMPT = ("Turn this photo into a soft watercolor painting. Keep the composition, the people and objects, and "
               "their positions exactly the same.")
LICENSES = {"flux2-dev": "FLUX.2 [dev] Non-Commercial License", "flux2-klein-4b": "Apache 2.0",
            "flux2-klein-9b": "FLUX Non-Commercial License"}


def download(file: str):
    """(folder, url or None, model page) of a FLUX.2 file; GGUF files have a page, not a direct link."""
    if file in DOWNLOADS:
        folder, url = DOWNLOADS[file]
        return folder, url, url
    stem = file.rsplit("-", 1)[0] if file.startswith("Qwen3") else file.rsplit("-Q", 1)[0]
    folder = "text_encoders" if file.startswith("Qwen3") else "diffusion_models"
    return folder, None, GGUF_PAGES[stem]


def models_entry(*files):
    return [{"name": f, "url": DOWNLOADS[f][1], "directory": DOWNLOADS[f][0]} for f in files if f in DOWNLOADS]


def build(spec, p, input_image: str) -> dict:
    dev = spec.model == "flux2-dev"
    model_file, te_file = p.model_format.file, p.text_encoder.file
    g = Graph(spec.name)
    g.add("MarkdownNote", (-520, -40), (460, 900), title="Read me: " + spec.title, text=note_text(spec, p))

    loader, attention = model_nodes(g, model_file, models_entry(model_file), p.attention)
    te_loader = g.add("LowVRAMLLMTextEncoderLoader", (0, 390), (360, 110),
                      properties={"models": models_entry(te_file)}, text_encoder_name=te_file,
                      device=p.text_encoder_device)
    vae = g.add("VAELoader", (0, 540), (360, 60), properties={"models": models_entry(VAE_FILE)}, vae_name=VAE_FILE)
    g.group("1 Load models", [loader, attention, te_loader, vae])

    img = g.add("LoadImage", (440, 0), (320, 360), title="Image to edit", image=input_image, upload="image")
    scale = g.add("ImageScaleToTotalPixels", (440, 400), (320, 110), upscale_method="lanczos", megapixels=1.0,
                  resolution_steps=1)
    enc = g.add("LowVRAMTiledVAEEncode", (440, 550), (320, 110), tile_size=0, vram_budget_mb=p.vae_budget_mb)
    g.link(img, 0, scale, "image")
    g.link(scale, 0, enc, "pixels")
    g.link(vae, 0, enc, "vae")
    g.group("2 Image", [img, scale, enc])

    x = 840
    text = g.add("LowVRAMTextEncodeFlux2", (x, 0), (420, 260), text=EDIT_PROMPT, cache=True, cache_max_mb=2048)
    g.link(te_loader, 0, text, "clip")
    cond, prompt_nodes = text, [text]
    if dev:
        guidance = g.add("FluxGuidance", (x, 300), (420, 60), guidance=DEV_GUIDANCE)
        g.link(text, 0, guidance, "conditioning")
        cond = guidance
        prompt_nodes.append(guidance)
    ref = g.add("ReferenceLatent", (x, 400), (420, 50))
    g.link(cond, 0, ref, "conditioning")
    g.link(enc, 0, ref, "latent")
    prompt_nodes.append(ref)
    if not dev:
        negative = g.add("ConditioningZeroOut", (x, 490), (420, 30), title="Negative (empty)")
        g.link(ref, 0, negative, "conditioning")
        prompt_nodes.append(negative)
    g.group("3 Prompt", prompt_nodes)

    x = 1340
    noise = g.add("RandomNoise", (x, 0), (340, 90), noise_seed=0, control_after_generate="randomize")
    sampler = g.add("KSamplerSelect", (x, 130), (340, 60), sampler_name="euler")
    sigmas = g.add("Flux2Scheduler", (x, 230), (340, 110), steps=spec.steps, width=1024, height=1024)
    if dev:
        guider = g.add("BasicGuider", (x, 380), (340, 50))
        g.link(attention, 0, guider, "model")
        g.link(ref, 0, guider, "conditioning")
    else:
        guider = g.add("CFGGuider", (x, 380), (340, 80), cfg=KLEIN_CFG)
        g.link(attention, 0, guider, "model")
        g.link(ref, 0, guider, "positive")
        g.link(negative, 0, guider, "negative")
    run = g.add("SamplerCustomAdvanced", (x, 500), (340, 110))
    g.link(noise, 0, run, "noise")
    g.link(guider, 0, run, "guider")
    g.link(sampler, 0, run, "sampler")
    g.link(sigmas, 0, run, "sigmas")
    g.link(enc, 0, run, "latent_image")
    g.group("4 Sample", [noise, sampler, sigmas, guider, run])

    decode_group(g, 1760, run, vae, p.vae_budget_mb, spec.name)
    return g.to_json()


def _file_row(file: str, what: str) -> str:
    folder, url, page = download(file)
    label = "a Hugging Face search" if "?search=" in page else page.removeprefix(HF)
    where = f"[{file}]({url})" if url else f"`{file}` from [{label}]({page})"
    return f"| {where} | `models/{folder}/` | {what} |"


def note_text(spec, p) -> str:
    dev = spec.model == "flux2-dev"
    fmt = p.model_format
    weight_gib = mm.weight_gib(fmt, cfg=mm.model_spec(spec.model).cfg)
    lines = [f"# {spec.title}", "",
             f"Edits the image in **2 Image** following the instruction in **3 Prompt** ({spec.family}). "
             "Pick your image, write what to change, and press Run. Needs ComfyUI with FLUX.2 (v0.29 or newer).", "",
             "## Files to download", "",
             "| file | put it in | what |", "|---|---|---|",
             _file_row(fmt.file, "the diffusion model"), _file_row(p.text_encoder.file, "the text encoder"),
             _file_row(VAE_FILE, "the VAE")]
    if any(download(f)[1] is None for f in (fmt.file, p.text_encoder.file)):
        lines += ["", "For a GGUF file, open the link and take the file of that type (Q4_K_M, ...); if its name "
                      "differs, pick it in the loader."]
    lines += ["", f"License of the diffusion model: {LICENSES[spec.model]}."]
    if fmt.name == "bf16" and dev:
        lines += ["The bf16 file is gated: accept the license on its Hugging Face page first."]
    lines += ["", f"## Why these choices for {spec.vram} GB", "",
              f"- **{fmt.name}** diffusion model ({weight_gib:.1f} GB), weights **{p.weights}**"
              + (": they do not fit the card, so they stream from RAM every step" if p.weights == "streamed"
                 else ": they stay on the card"),
              f"- text encoder ({p.text_encoder.name}) on device policy **{p.text_encoder_device}**; a repeated "
              "prompt is read from the on-disk cache and the encoder is not even loaded",
              f"- attention **{p.attention}**; VAE encode and decode tiled and seam-free, "
              + (f"held to {p.vae_budget_mb} MB" if p.vae_budget_mb else "as large a tile as fits"),
              f"- {spec.steps} steps, " + (f"guidance {DEV_GUIDANCE:g} (FluxGuidance)" if dev else
                                          f"CFG {KLEIN_CFG:g} (the distilled [klein] is made for 4 steps)"),
              "", "## Expected peak memory (planner estimate, 1024x1024)", "",
              "| phase | VRAM GB | RAM GB |", "|---|---|---|"]
    lines += [f"| {ph.name} | {ph.vram_gib:.1f} | {ph.ram_gib:.1f} |" for ph in p.phases]
    lines += ["", "FLUX.2's peaks are estimates scaled from FLUX.1 measurements. The **VRAM Report** node shows what "
                  "your run really used, per phase."]
    if p.launch_options:
        lines += ["", "## ComfyUI launch options", ""] + [f"- `{opt}`: {why}" for opt, why in p.launch_options]
    lines += ["", f"Another card? `kontext-lowvram plan --model {spec.model} --vram <GB>` says what fits (this "
                  f"workflow is `plan --model {spec.model} --vram {spec.vram} --steps {spec.steps}`)."]
    return "\n".join(lines)
