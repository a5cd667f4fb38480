"""Write the bundled workflows (workflows/*.json and their .jpg thumbnails) from the planner's answers.

    python tools/make_workflows.py          # rewrite workflows/
    python tools/make_workflows.py --check  # exit 1 if a committed workflow differs from what this writes

Every choice a workflow makes (diffusion-model file, text encoders and their device policy, VAE budget, steps) is
`optimizations.planner.plan()` for its tier, so `kontext-lowvram plan --vram N` and the workflow for N GB say the
same thing; tests/test_workflows.py checks the committed files against both.
"""
import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import workflow_flux2  # noqa: E402
from workflow_graph import Graph, decode_group, dumps, model_nodes  # noqa: E402

from kontext_lowvram.optimizations import memory_model as mm  # noqa: E402
from kontext_lowvram.optimizations import planner  # noqa: E402

WORKFLOWS_DIR = ROOT / "workflows"
HF = "https://huggingface.co/"
#: file name -> (models folder, where people download it)
DOWNLOADS = {
    "flux1-kontext-dev.safetensors":
        ("diffusion_models", HF + "black-forest-labs/FLUX.1-Kontext-dev/resolve/main/flux1-kontext-dev.safetensors"),
    "clip_l.safetensors": ("text_encoders", HF + "comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors"),
    "t5xxl_fp16.safetensors":
        ("text_encoders", HF + "comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors"),
    "t5xxl_fp8_e4m3fn_scaled.safetensors":
        ("text_encoders", HF + "comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp8_e4m3fn_scaled.safetensors"),
    "ae.safetensors": ("vae", HF + "Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/split_files/vae/ae.safetensors"),
    "FLUX.1-Turbo-Alpha.safetensors":
        ("loras", HF + "alimama-creative/FLUX.1-Turbo-Alpha/resolve/main/diffusion_pytorch_model.safetensors"),
}
for _q in ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"):
    DOWNLOADS[f"flux1-kontext-dev-{_q}.gguf"] = (
        "diffusion_models", HF + f"QuantStack/FLUX.1-Kontext-dev-GGUF/resolve/main/flux1-kontext-dev-{_q}.gguf")
for _q in ("Q8_0", "Q5_K_M", "Q4_K_M"):
    DOWNLOADS[f"t5-v1_1-xxl-encoder-{_q}.gguf"] = (
        "text_encoders", HF + f"city96/t5-v1_1-xxl-encoder-gguf/resolve/main/t5-v1_1-xxl-encoder-{_q}.gguf")
VAE_FILE = "ae.safetensors"
TURBO_LORA = "FLUX.1-Turbo-Alpha.safetensors"
TURBO_GUIDANCE = 3.5  # what the Turbo-Alpha LoRA was distilled at (its model card: 8 steps, guidance 3.5)
KONTEXT_GUIDANCE = 2.5  # Black Forest Labs' default for Kontext edits
INPUT_IMAGE = "example.png"  # ComfyUI ships it in input/, so a fresh install runs the workflow as is
EDIT_CLIP_L = "watercolor painting"
EDIT_T5 = ("Turn this image into a soft watercolor painting. Keep the composition, the people and objects, and "
           "their positions exactly the same.")
MULTI_T5 = ("Place the subject of the first image into the scene of the second image, matching its lighting and "
            "style. Keep the subject's face and clothes unchanged.")


@dataclass(frozen=True)
class Spec:
    name: str
    vram: int
    title: str
    references: int = 1
    steps: int = 20
    turbo: bool = False
    model: str = "kontext"  # planner.Request.model

    @property
    def family(self) -> str:
        return mm.model_spec(self.model).title


SPECS = (
    Spec("kontext_edit_8gb", 8, "FLUX.1 Kontext edit · 8 GB"),
    Spec("kontext_edit_12gb", 12, "FLUX.1 Kontext edit · 12 GB"),
    Spec("kontext_edit_16gb", 16, "FLUX.1 Kontext edit · 16 GB"),
    Spec("kontext_edit_24gb", 24, "FLUX.1 Kontext edit · 24 GB"),
    Spec("kontext_edit_32gb_plus", 32, "FLUX.1 Kontext edit · 32 GB and more"),
    Spec("kontext_multi_reference_16gb", 16, "FLUX.1 Kontext, two reference images · 16 GB", references=2),
    Spec("kontext_edit_fast_8gb", 8, "FLUX.1 Kontext fast edit (8 steps, Turbo LoRA) · 8 GB", steps=8, turbo=True),
    Spec("kontext_edit_fast_12gb", 12, "FLUX.1 Kontext fast edit (8 steps, Turbo LoRA) · 12 GB", steps=8,
         turbo=True),
    # FLUX.2: [klein] 4B where 8 GB is all there is, 9B (better, non-commercial) from 12 GB; [dev] from 16 GB
    Spec("flux2_klein_edit_8gb", 8, "FLUX.2 [klein] 4B edit · 8 GB", steps=4, model="flux2-klein-4b"),
    Spec("flux2_klein_edit_12gb", 12, "FLUX.2 [klein] 9B edit · 12 GB", steps=4, model="flux2-klein-9b"),
    Spec("flux2_dev_edit_16gb", 16, "FLUX.2 [dev] edit · 16 GB", model="flux2-dev"),
    Spec("flux2_dev_edit_24gb", 24, "FLUX.2 [dev] edit · 24 GB", model="flux2-dev"),
    Spec("flux2_dev_edit_32gb_plus", 32, "FLUX.2 [dev] edit · 32 GB and more", model="flux2-dev"),
)


def plan_for(spec: Spec):
    return planner.plan(planner.Request(vram_gib=spec.vram, references=spec.references, steps=spec.steps,
                                        model=spec.model))


def models_entry(*files):
    """The frontend's download entries. Not for .gguf files: both frontends offer downloads only for
    .safetensors-like names, and v1.27 checks an entry against the server's model list, which never holds .gguf
    files (core lists its own suffixes only), so it would call a file that is in place "missing". The note links
    them instead."""
    return [{"name": f, "url": DOWNLOADS[f][1], "directory": DOWNLOADS[f][0]} for f in files
            if not f.endswith(".gguf")]


def build(spec: Spec) -> dict:
    p = plan_for(spec)
    if not p.fits:
        raise SystemExit(f"{spec.name}: the planner says it does not fit: {p.problems}")
    if spec.model != "kontext":
        return workflow_flux2.build(spec, p, INPUT_IMAGE)
    model_file, t5_file = p.model_format.file, p.text_encoder.file
    g = Graph(spec.name)
    y_ref = 380 + 40 * spec.references
    g.add("MarkdownNote", (-520, -40), (460, 900), title="Read me: " + spec.title, text=note_text(spec, p))

    loader, attention = model_nodes(g, model_file, models_entry(model_file), p.attention)
    model_out, loaders = attention, [loader, attention]
    if spec.turbo:
        lora = g.add("LowVRAMLoraLoader", (0, 390), (360, 110), properties={"models": models_entry(TURBO_LORA)},
                     lora_name=TURBO_LORA, strength_model=1.0)
        g.link(attention, 0, lora, "model")
        model_out = lora
        loaders.append(lora)
    y = 540 if spec.turbo else 390
    te_loader = g.add("LowVRAMTextEncoderLoader", (0, y), (360, 130),
                      properties={"models": models_entry(mm.CLIP_L_FILE, t5_file)},
                      clip_l_name=mm.CLIP_L_FILE, t5xxl_name=t5_file, device=p.text_encoder_device)
    vae = g.add("VAELoader", (0, y + 170), (360, 60), properties={"models": models_entry(VAE_FILE)},
                vae_name=VAE_FILE)
    loaders += [te_loader, vae]
    g.group("1 Load models", loaders)

    image_nodes, latents = [], []
    for i in range(spec.references):
        x0 = 440 + 360 * i
        img = g.add("LoadImage", (x0, 0), (320, 360), title="Image to edit" if i == 0 else f"Reference image {i + 1}",
                    image=INPUT_IMAGE, upload="image")
        scale = g.add("FluxKontextImageScale", (x0, 400), (320, 30))
        enc = g.add("LowVRAMTiledVAEEncode", (x0, 480), (320, 110), tile_size=0, vram_budget_mb=p.vae_budget_mb)
        g.link(img, 0, scale, "image")
        g.link(scale, 0, enc, "pixels")
        g.link(vae, 0, enc, "vae")
        image_nodes += [img, scale, enc]
        latents.append(enc)
    g.group("2 Image" if spec.references == 1 else "2 Images", image_nodes)

    x_prompt = 440 + 360 * spec.references + 40
    guidance = TURBO_GUIDANCE if spec.turbo else KONTEXT_GUIDANCE
    text = g.add("LowVRAMTextEncode", (x_prompt, 0), (420, 320), clip_l=EDIT_CLIP_L if spec.references == 1 else
                 "subject in a new scene", t5xxl=EDIT_T5 if spec.references == 1 else MULTI_T5,
                 guidance=guidance, cache=True, cache_max_mb=2048)
    g.link(te_loader, 0, text, "clip")
    cond, prompt_nodes = text, [text]
    for i, enc in enumerate(latents):
        ref = g.add("ReferenceLatent", (x_prompt, 360 + 70 * i), (420, 50))
        g.link(cond, 0, ref, "conditioning")
        g.link(enc, 0, ref, "latent")
        cond = ref
        prompt_nodes.append(ref)
    if spec.references > 1:
        method = g.add("FluxKontextMultiReferenceLatentMethod", (x_prompt, y_ref + 70), (420, 60),
                       reference_latents_method="index")
        g.link(cond, 0, method, "conditioning")
        cond = method
        prompt_nodes.append(method)
    negative = g.add("ConditioningZeroOut", (x_prompt, y_ref + 170), (420, 30), title="Negative (empty)")
    g.link(text, 0, negative, "conditioning")
    prompt_nodes.append(negative)
    g.group("3 Prompt", prompt_nodes)

    x_sample = x_prompt + 480
    sampler = g.add("KSampler", (x_sample, 0), (340, 280), seed=0, control_after_generate="randomize",
                    steps=spec.steps, cfg=1.0, sampler_name="euler", scheduler="simple", denoise=1.0)
    g.link(model_out, 0, sampler, "model")
    g.link(cond, 0, sampler, "positive")
    g.link(negative, 0, sampler, "negative")
    g.link(latents[0], 0, sampler, "latent_image")
    g.group("4 Sample", [sampler])

    decode_group(g, x_sample + 400, sampler, vae, p.vae_budget_mb, spec.name)
    return g.to_json()


def note_text(spec: Spec, p) -> str:
    fmt = p.model_format
    files = [(fmt.file, "the diffusion model")]
    files += [(mm.CLIP_L_FILE, "text encoder"), (p.text_encoder.file, "text encoder"), (VAE_FILE, "the VAE")]
    if spec.turbo:
        files.append((TURBO_LORA, "the Turbo LoRA (8-step sampling)"))
    lines = [f"# {spec.title}", "",
             "Edits the image in **2 Image** following the instruction in **3 Prompt** (FLUX.1 Kontext [dev]). "
             "Pick your image, write what to change, and press Run."
             + (" The first image is edited; the second is a reference it may take from." if spec.references > 1
                else ""), "",
             "## Files to download", "",
             "| file | put it in | what |", "|---|---|---|"]
    lines += [f"| [{f}]({DOWNLOADS[f][1]}) | `models/{DOWNLOADS[f][0]}/` | {what} |" for f, what in files]
    if fmt.name == "bf16":
        lines += ["", "The bf16 file is gated: accept the license on its Hugging Face page first."]
    lines += ["", f"## Why these choices for {spec.vram} GB", "",
              f"- **{fmt.name}** diffusion model ({mm.weight_gib(fmt):.1f} GB), weights "
              f"**{p.weights}**" + (": they do not fit the card, so they stream from RAM every step"
                                    if p.weights == "streamed" else ": they stay on the card"),
              f"- text encoders on device policy **{p.text_encoder_device}**; a repeated prompt is read from the "
              "on-disk cache and the encoders are not even loaded",
              f"- attention **{p.attention}**; VAE decode tiled and seam-free, "
              + (f"held to {p.vae_budget_mb} MB" if p.vae_budget_mb else "as large a tile as fits"),
              f"- {spec.steps} steps, guidance {TURBO_GUIDANCE if spec.turbo else KONTEXT_GUIDANCE}"
              + (" (what the Turbo LoRA was trained for)" if spec.turbo else ""),
              "", "## Expected peak memory (planner estimate, 1024x1024)", "",
              "| phase | VRAM GB | RAM GB |", "|---|---|---|"]
    lines += [f"| {ph.name} | {ph.vram_gib:.1f} | {ph.ram_gib:.1f} |" for ph in p.phases]
    lines += ["", "The **VRAM Report** node shows what your run really used, per phase."]
    if p.launch_options:
        lines += ["", "## ComfyUI launch options", ""] + [f"- `{opt}`: {why}" for opt, why in p.launch_options]
    lines += ["", f"Another card? `kontext-lowvram plan --vram <GB>` says what fits (this workflow is "
                  f"`plan --vram {spec.vram}{' --references 2' if spec.references > 1 else ''}"
                  f"{' --steps 8' if spec.turbo else ''}`)."]
    return "\n".join(lines)


def thumbnail(spec: Spec, path: Path) -> None:
    """A plain card: the template browser shows `<name>.jpg` beside the workflow."""
    from PIL import Image, ImageDraw, ImageFont
    p = plan_for(spec)
    img = Image.new("RGB", (512, 384), (24, 32, 44))
    d = ImageDraw.Draw(img)
    big, small = ImageFont.load_default(size=44), ImageFont.load_default(size=24)
    d.rectangle((0, 0, 511, 12), fill=(63, 120, 158))
    d.text((28, 40), "FLUX.1 Kontext" if spec.model == "kontext" else spec.family, font=small, fill=(180, 200, 220))
    d.text((28, 78), f"{spec.vram} GB" + (" +" if spec.name.endswith("plus") else ""), font=big,
           fill=(255, 255, 255))
    rows = [f"{p.model_format.name}, weights {p.weights}", f"{spec.steps} steps"
            + (", Turbo LoRA" if spec.turbo else ""), f"{spec.references} reference image(s)" if spec.references > 1
            else "image edit", "Kontext LowVRAM"]
    for i, row in enumerate(rows):
        d.text((28, 170 + 44 * i), row, font=small, fill=(220, 230, 240))
    img.save(path, "JPEG", quality=88)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare the committed workflows with the planner's")
    args = ap.parse_args(argv)
    WORKFLOWS_DIR.mkdir(exist_ok=True)
    stale = []
    for spec in SPECS:
        path = WORKFLOWS_DIR / f"{spec.name}.json"
        text = dumps(build(spec))
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(path.name)
            continue
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        thumbnail(spec, path.with_suffix(".jpg"))
        print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print("stale (run python tools/make_workflows.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
