"""LowVRAMCompareImages in a real ComfyUI (LoadImage x 2 -> compare -> heat map saved as float32), and a sha256
sidecar checked by LowVRAMModelLoader before it loads. References: PSNR and mean |a-b| by their formulas in numpy
on the PNGs as LoadImage reads them (8 bits / 255), SSIM by scikit-image where it is installed, the heat map by
its definition (|a-b| largest over channels, scaled so the largest is white, black-red-yellow-white)."""
import re

import numpy as np
import pytest

import comfy_harness as H
from kontext_lowvram.loaders import integrity

OTHER, SMALL = "klv_compare_b.png", "klv_compare_small.png"


@pytest.fixture(scope="module")
def images(comfy):
    from PIL import Image
    a = np.asarray(Image.open(comfy.input_dir / H.INPUT_IMAGE).convert("RGB"))
    noise = np.random.default_rng(5).integers(-25, 26, a.shape)
    b = np.clip(a.astype(int) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(b).save(comfy.input_dir / OTHER)
    Image.fromarray(a[:64]).save(comfy.input_dir / SMALL)
    return a.astype(np.float32) / 255, b.astype(np.float32) / 255


def graph(other):
    n = H.node
    return {"a": n("LoadImage", image=H.INPUT_IMAGE), "b": n("LoadImage", image=other),
            "cmp": n("LowVRAMCompareImages", image_a=["a", 0], image_b=["b", 0], amplify=0.0),
            "save": n("KLVSaveImageTensor", images=["cmp", 0], filename_prefix="klv_compare/heat")}


def test_registered_with_tooltips(comfy):
    spec = comfy.object_info("LowVRAMCompareImages")["LowVRAMCompareImages"]
    assert spec["category"] == "Kontext LowVRAM/utils" and spec["output_node"] is True
    assert spec["output"] == ["IMAGE", "STRING"] and spec["output_name"] == ["difference", "summary"]
    for section in ("required", "optional"):
        for name, inp in spec["input"][section].items():
            assert inp[1].get("tooltip"), name


def test_numbers_on_the_node_and_heat_map(comfy, images):
    a, b = images
    outputs = comfy.run(graph(OTHER), timeout=300)
    (summary,) = outputs["cmp"]["text"]
    number = {k: float(re.search(rf"^{k}: ([0-9.]+)", summary, re.M).group(1)) for k in ("PSNR", "SSIM")}
    da, db = a.astype(np.float64), b.astype(np.float64)
    assert number["PSNR"] == pytest.approx(10 * np.log10(1 / np.mean((da - db) ** 2)), abs=0.006)
    mean_abs = float(re.search(r"^mean \|a-b\|: ([0-9.]+)", summary, re.M).group(1))
    assert mean_abs == pytest.approx(np.abs(da - db).mean(), abs=6e-6)
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        structural_similarity = None
    if structural_similarity is not None:
        ref = structural_similarity(da, db, channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False)
        assert number["SSIM"] == pytest.approx(ref, abs=6e-6)
    assert 0 < number["SSIM"] < 1
    heat = comfy.saved_image_tensor(outputs, "save").numpy()
    d = np.abs(da - db).max(-1)
    t = d / d.max()
    want = np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], -1)
    assert heat.shape == (1, *a.shape[:2], 3) and np.abs(heat[0] - want).max() < 1e-5


def test_identical_images_and_sizes_that_differ(comfy, images):
    outputs = comfy.run(graph(H.INPUT_IMAGE), timeout=300)
    assert "PSNR: inf dB (the images are identical)" in outputs["cmp"]["text"][0]
    with pytest.raises(H.ComfyError, match=r"image_a is 128x128, 3 channels and image_b is 128x64, 3 channels"
                                           r"(.|\n)*Upscale Image"):
        comfy.run(graph(SMALL), timeout=300)


def test_model_loader_checks_the_sidecar(comfy, write_flux_model):
    model = write_flux_model(seed=3, name="klv_sidecar_model.safetensors")
    side = model.path.parent / (model.path.name + ".sha256")
    side.write_text("0" * 64 + f"  {model.path.name}\n")
    loader = H.node("LowVRAMModelLoader", model_name=model.name, compute_dtype="default", convert_on_load="none")
    try:
        with pytest.raises(H.ComfyError, match=r"klv_sidecar_model\.safetensors: its sha256 is [0-9a-f]{64}, but "
                                               r"klv_sidecar_model\.safetensors\.sha256 expects 0{64}(.|\n)*download"):
            comfy.run(H.kontext_edit_graph(loader, prefix="klv_sidecar_bad"), timeout=900)
        integrity.write_sidecar(model.path)  # the right digest: the same graph now loads and samples
        outputs = comfy.run(H.kontext_edit_graph(loader, prefix="klv_sidecar_ok"), timeout=900)
        assert comfy.saved_latent(outputs).abs().sum() > 0
        assert "klv_sidecar_model.safetensors matches its sha256 sidecar" in comfy.log_text()
    finally:
        side.unlink(missing_ok=True)
