"""PSNR / SSIM / mean |a-b| (optimizations/image_compare.py), the Compare Images node and `kontext-lowvram compare`,
against scikit-image's structural_similarity and peak_signal_noise_ratio."""
import math
import re

import numpy as np
import pytest
import torch

from kontext_lowvram.cli import main
from kontext_lowvram.nodes.compare import LowVRAMCompareImages
from kontext_lowvram.optimizations import image_compare as ic

skm = pytest.importorskip("skimage.metrics", reason="scikit-image is the reference: pip install -e '.[test]'")
skdata = pytest.importorskip("skimage.data")


def ref_ssim(a, b):
    kw = {"channel_axis": -1} if a.ndim == 3 else {}
    return skm.structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False, **kw)


def noisy(a, std, seed):
    return np.clip(a + std * np.random.default_rng(seed).standard_normal(a.shape), 0, 1)


def image_pairs():
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:64, 0:96] / 63.0
    gradient = np.stack([x / 1.5, y, 1 - 0.5 * (x / 1.5 + y)], -1)
    checker = ((np.indices((48, 40)).sum(0) // 4) % 2).astype(np.float64)
    camera = skdata.camera()[::4, ::4] / 255.0  # grayscale photo, 128 x 128
    astronaut = skdata.astronaut()[::4, ::4] / 255.0  # RGB photo
    return {
        "random rgb": (rng.random((40, 57, 3)), rng.random((40, 57, 3))),
        "random gray": (rng.random((33, 21)), rng.random((33, 21))),
        "gradient + noise": (gradient, noisy(gradient, 0.05, 1)),
        "checkerboard shifted": (checker, np.roll(checker, 1, axis=1)),
        "camera + noise (gray)": (camera, noisy(camera, 0.02, 2)),
        "astronaut, blurred (rgb)": (astronaut, (astronaut + np.roll(astronaut, 1, 0) + np.roll(astronaut, 1, 1)) / 3),
        "constant vs constant": (np.full((16, 16, 3), 0.25), np.full((16, 16, 3), 0.75)),
    }


@pytest.mark.parametrize("name", list(image_pairs()))
def test_psnr_ssim_and_mean_abs_match_the_references(name):
    a, b = image_pairs()[name]
    c = ic.compare(torch.from_numpy(a), torch.from_numpy(b))
    assert c.ssim == pytest.approx(ref_ssim(a, b), abs=1e-10)
    assert c.psnr == pytest.approx(skm.peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-9)
    assert c.mean_abs == pytest.approx(np.abs(a - b).mean(), abs=1e-12)
    assert c.max_abs == pytest.approx(np.abs(a - b).max(), abs=1e-12)


def test_float32_images_as_comfyui_holds_them():
    a, b = image_pairs()["astronaut, blurred (rgb)"]
    c = ic.compare(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    assert c.ssim == pytest.approx(ref_ssim(a.astype(np.float32).astype(np.float64),
                                            b.astype(np.float32).astype(np.float64)), abs=1e-9)


def test_identical_images():
    a = image_pairs()["camera + noise (gray)"][0]
    c = ic.compare(torch.from_numpy(a), torch.from_numpy(a.copy()))
    assert c.psnr == math.inf and c.ssim == pytest.approx(1.0, abs=1e-12) and c.mean_abs == 0 == c.max_abs
    assert ic.summary_lines(c)[0] == "PSNR: inf dB (the images are identical)"
    assert ic.heat_map(torch.from_numpy(a), torch.from_numpy(a), ic.auto_gain(0.0)).abs().max() == 0


def test_different_sizes_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"image a is 20x10, 3 channels and image b is 10x20, 3 channels.*same size.*"
                                         r"resize or crop"):
        ic.compare(torch.rand(10, 20, 3), torch.rand(20, 10, 3))
    with pytest.raises(ValueError, match="1 channel and"):
        ic.psnr(torch.rand(16, 16), torch.rand(16, 16, 3))
    with pytest.raises(ValueError, match="at least 11x11"):
        ic.ssim(torch.rand(10, 30), torch.rand(10, 30))


def test_heat_map_scale():
    a = torch.zeros(12, 12, 3)
    b = a.clone()
    b[3, 4] = torch.tensor([0.0, 0.5, 0.0])  # largest difference: white under the auto gain
    b[7, 8, 0] = 0.25  # half of it: t = 0.5 -> red 1, green 0.5, blue 0
    heat = ic.heat_map(a, b, ic.auto_gain(0.5))
    assert heat.shape == (12, 12, 3) and heat.dtype == torch.float32
    assert heat[3, 4].tolist() == [1, 1, 1] and heat[7, 8].tolist() == pytest.approx([1, 0.5, 0])
    assert heat.sum() == pytest.approx(3 + 1.5)  # every other pixel black


def test_node_shows_the_numbers_and_returns_heat_map_and_summary():
    a, b = (torch.from_numpy(x).float().unsqueeze(0) for x in image_pairs()["astronaut, blurred (rgb)"])
    out = LowVRAMCompareImages().compare(a, b)
    heat, summary = out["result"]
    assert out["ui"]["text"] == [summary] and heat.shape == (1, *a.shape[1:3], 3)
    ref = ref_ssim(a[0].double().numpy(), b[0].double().numpy())
    assert f"SSIM: {ref:.5f}" in summary and "PSNR: " in summary and "size: 128x128, 3 channels" in summary
    assert heat.max() == 1.0  # auto gain: the largest difference is white
    fixed = LowVRAMCompareImages().compare(a, b, amplify=2.0)["result"][0]
    assert torch.allclose(fixed, ic.heat_map(a[0], b[0], 2.0).unsqueeze(0))


def test_node_compares_one_image_with_each_of_a_batch():
    a = torch.rand(1, 16, 16, 3)
    b = torch.stack([a[0], a[0] * 0.5])
    heat, summary = LowVRAMCompareImages().compare(a, b)["result"]
    assert heat.shape == (2, 16, 16, 3) and heat[0].max() == 0
    lines = summary.splitlines()
    assert lines[1].startswith("image 1: PSNR: inf dB") and lines[2].startswith("image 2: PSNR: ")
    assert lines[3].startswith("mean of 2: PSNR: inf dB")
    with pytest.raises(ValueError, match="batch of 2 images and image_b one of 3"):
        LowVRAMCompareImages().compare(torch.rand(2, 16, 16, 3), torch.rand(3, 16, 16, 3))


def test_node_refuses_different_sizes_naming_its_inputs_and_the_fix():
    with pytest.raises(ValueError, match=r"image_a is 64x32, 3 channels and image_b is 64x48, 3 channels.*"
                                         r"Upscale Image"):
        LowVRAMCompareImages().compare(torch.rand(1, 32, 64, 3), torch.rand(1, 48, 64, 3))


def _save_png(path, arr):
    from PIL import Image
    Image.fromarray(arr).save(path)
    return str(path)


def _number(out, label):
    return float(re.search(rf"^{label}: ([0-9.]+|inf)", out, re.M).group(1))


@pytest.mark.parametrize("rgb", [True, False])
def test_cli_compare_prints_the_reference_numbers(tmp_path, capsys, rgb):
    photo = skdata.astronaut()[::4, ::4] if rgb else skdata.camera()[::4, ::4]
    other = np.clip(photo.astype(int) + np.random.default_rng(3).integers(-20, 21, photo.shape), 0, 255).astype(np.uint8)
    pa, pb = _save_png(tmp_path / "a.png", photo), _save_png(tmp_path / "b.png", other)
    heat_path = tmp_path / "heat.png"
    assert main(["compare", pa, pb, "--heatmap", str(heat_path)]) == 0
    out = capsys.readouterr().out
    a, b = photo / 255.0, other / 255.0
    assert _number(out, "SSIM") == pytest.approx(ref_ssim(a, b), abs=1e-5)
    assert _number(out, "PSNR") == pytest.approx(skm.peak_signal_noise_ratio(a, b, data_range=1.0), abs=0.01)
    assert _number(out, "mean \\|a-b\\|") == pytest.approx(np.abs(a - b).mean(), abs=1e-5)
    assert f"size: 128x128, {3 if rgb else 1} channel" in out
    from PIL import Image
    heat = np.asarray(Image.open(heat_path))
    assert heat.shape == (128, 128, 3) and heat.max() == 255


def test_cli_compare_identical_and_refused(tmp_path, capsys):
    img = skdata.camera()[::8, ::8]
    pa, pb = _save_png(tmp_path / "a.png", img), _save_png(tmp_path / "b.png", img)
    assert main(["compare", pa, pb]) == 0
    out = capsys.readouterr().out
    assert "PSNR: inf dB (the images are identical)" in out and "SSIM: 1.00000" in out
    small = _save_png(tmp_path / "small.png", img[:32])
    assert main(["compare", pa, small]) == 2
    err = capsys.readouterr().err
    assert "a.png is 64x64, 1 channel and" in err and "small.png is 64x32" in err and "resize or crop" in err
    (tmp_path / "notes.png").write_text("not an image")
    assert main(["compare", pa, str(tmp_path / "notes.png")]) == 2
    assert "notes.png: not an image" in capsys.readouterr().err
    assert main(["compare", pa, str(tmp_path / "missing.png")]) == 2
    assert "missing.png: no such file" in capsys.readouterr().err
