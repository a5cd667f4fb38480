"""The planner and its memory model: answers that fit the card by the model's own numbers, that grow with the
work, and a clear 'does not fit' with the smallest setup that would."""
import pytest

from kontext_lowvram.cli import main
from kontext_lowvram.loaders.flux_layout import FLUX_DEV, FluxConfig
from kontext_lowvram.optimizations import memory_model as mm
from kontext_lowvram.optimizations.planner import Request, format_plan, plan, usable_vram

TIERS = (8, 12, 16, 24, 32)


def test_weight_bytes_come_from_the_real_shapes():
    blocks, rest = mm.flux_parameters()
    assert blocks + rest == FLUX_DEV.num_params
    assert 11.8e9 < blocks + rest < 12.0e9  # FLUX.1's 11.9 B
    assert mm.weight_gib(mm.FORMAT_BY_NAME["bf16"]) * mm.GIB == pytest.approx((blocks + rest) * 2)
    assert mm.weight_gib(mm.FORMAT_BY_NAME["Q8_0"]) * mm.GIB == pytest.approx(blocks * 34 / 32 + rest * 2)


def test_the_weight_estimate_is_a_function_of_the_config():
    """FLUX.1 [dev] by default, any FluxConfig on request (tests/test_memory_model_measured.py holds small ones to
    the bytes their loaded files take)."""
    h = FLUX_DEV.hidden_size
    assert mm.flux_parameters(FLUX_DEV) == mm.flux_parameters()
    assert mm.flux_parameters()[0] == (19 * 36 + 38 * 15) * h * h  # a double block's linears 36 h², a single's 15 h²
    small = FluxConfig(hidden_size=512, num_heads=4, depth=2, depth_single_blocks=2)
    blocks, rest = mm.flux_parameters(small)
    assert blocks == (2 * 36 + 2 * 15) * 512 ** 2 and blocks + rest == small.num_params
    for fmt in mm.FORMATS:
        assert mm.weight_gib(fmt, cfg=FLUX_DEV) == mm.weight_gib(fmt)
        assert mm.weight_bytes(fmt, cfg=small) == blocks * fmt.bits / 8 + rest * 2
        assert mm.weight_gib(fmt, 4.5, small) * mm.GIB == pytest.approx(blocks * 4.5 / 8 + rest * 2)


def test_the_measured_peaks_are_reproduced_at_their_token_count():
    for family, (bits, peak) in mm.MEASURED_PEAKS.items():
        fmt = next(f for f in mm.FORMATS if f.family == family)
        got = mm.weight_gib(fmt, bits) + mm.activation_gib(mm.MEASURED_TOKENS) + mm.fixed_gib(family)
        assert got == pytest.approx(peak)
        assert mm.fixed_gib(family) > 0  # a peak below weights + activations would mean a wrong model


@pytest.mark.parametrize("fmt", mm.FORMATS, ids=lambda f: f.name)
def test_estimates_grow_with_tokens_references_and_resolution(fmt):
    assert mm.tokens(1024, 1024, 1) == 4096 + 4096 + 512
    sizes = [mm.tokens(512, 512, 1), mm.tokens(1024, 1024, 0), mm.tokens(1024, 1024, 1), mm.tokens(1024, 1024, 2),
             mm.tokens(1536, 1024, 2), mm.tokens(2048, 2048, 1)]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    for est in (mm.denoise_gib, mm.streaming_denoise_gib):
        values = [est(fmt, t) for t in sizes]
        assert values == sorted(values) and len(set(values)) == len(values)
    assert mm.streaming_denoise_gib(fmt, sizes[2]) < mm.denoise_gib(fmt, sizes[2])
    assert mm.vae_decode_gib(512, 512) < mm.vae_decode_gib(1024, 1024) < mm.vae_decode_gib(2048, 2048)
    assert mm.vae_decode_gib(2048, 2048, budget_gib=1.0) < mm.vae_decode_gib(2048, 2048)


@pytest.mark.parametrize("vram", TIERS)
def test_each_tier_fits_its_card_by_the_models_numbers(vram):
    p = plan(Request(vram_gib=vram, ram_gib=32))
    assert p.fits and not p.problems and p.model_format is not None
    room = usable_vram(p.request)
    for phase in p.phases:
        assert phase.vram_gib <= room, (phase, room)
        assert phase.ram_gib <= 32
    assert [ph.name for ph in p.phases] == ["load", "text encode", "denoise", "VAE decode"]
    text = format_plan(p)
    assert p.model_format.file in text and p.text_encoder.file in text and "--reserve-vram" in text


def test_more_vram_never_gives_a_worse_model():
    ranks = [mm.FORMATS.index(plan(Request(vram_gib=v)).model_format) for v in (6, 8, 10, 12, 16, 20, 24, 32, 48)]
    assert ranks == sorted(ranks, reverse=True)
    assert plan(Request(vram_gib=80)).model_format.name == "bf16"
    big = plan(Request(vram_gib=48))
    assert big.weights == "resident" and big.vae_budget_mb == 0


def test_more_tokens_never_give_a_better_model():
    ranks = [mm.FORMATS.index(plan(Request(vram_gib=16, width=w, height=w, references=r)).model_format)
             for w, r in ((512, 1), (1024, 1), (1024, 2), (1536, 2))]
    assert ranks == sorted(ranks)


def test_weights_stream_when_nothing_fits_resident():
    p = plan(Request(vram_gib=8))
    assert p.weights == "streamed" and p.fits
    assert mm.denoise_gib(p.model_format, mm.tokens(1024, 1024, 1)) > usable_vram(p.request)
    assert any(opt.startswith("--lowvram") for opt, _ in p.launch_options)
    assert any(opt == "--preview-method none" for opt, _ in p.launch_options)


def test_an_impossible_request_says_what_does_not_fit_and_what_would():
    p = plan(Request(vram_gib=4, ram_gib=8))
    assert not p.fits and p.model_format is None
    vram_msg, ram_msg = p.problems
    assert "4 GB of VRAM is too little" in vram_msg and "at least" in vram_msg
    assert "8 GB of RAM is too little" in ram_msg and "of RAM would do" in ram_msg
    assert "DOES NOT FIT" in format_plan(p)
    need_vram = float(vram_msg.split("at least ")[1].split(" GB")[0])
    need_ram = float(ram_msg.split("; ")[-1].split(" GB")[0])
    assert plan(Request(vram_gib=need_vram + 0.1, ram_gib=need_ram)).fits  # what it says would do, does
    assert not plan(Request(vram_gib=need_vram - 0.2)).fits


def test_too_little_ram_on_a_big_card_is_a_ram_problem_only():
    p = plan(Request(vram_gib=24, ram_gib=6))
    assert not p.fits and len(p.problems) == 1 and "6 GB of RAM is too little" in p.problems[0]


def test_a_headless_card_keeps_less_back():
    assert usable_vram(Request(vram_gib=12, desktop=False)) > usable_vram(Request(vram_gib=12))
    assert not any(o.startswith("--reserve-vram") for o, _ in plan(Request(vram_gib=12, desktop=False)).launch_options)


@pytest.mark.parametrize("bad", [dict(vram_gib=0), dict(vram_gib=8, ram_gib=-1), dict(vram_gib=8, width=8),
                                 dict(vram_gib=8, references=-1), dict(vram_gib=8, model="sdxl")])
def test_bad_requests_are_refused(bad):
    with pytest.raises(ValueError):
        Request(**bad)


def test_cli_plan(capsys):
    assert main(["plan", "--vram", "12", "--ram", "32", "--resolution", "1024x768", "--references", "2"]) == 0
    out = capsys.readouterr().out
    assert "12 GB VRAM / 32 GB RAM, 1024x768, 2 reference(s)" in out and "denoise" in out
    assert main(["plan", "--vram", "4", "--ram", "8"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    for argv in (["plan"], ["plan", "--vram", "x"], ["plan", "--vram", "8", "--resolution", "1024"],
                 ["plan", "--vram", "8", "--references", "9"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2


def test_readme_table_is_the_planners_answer():
    """README's "Which files for my GPU" rows are what plan() says for each tier."""
    import pathlib
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for vram in TIERS:
        p = plan(Request(vram_gib=vram, ram_gib=32))
        row = next(line for line in readme.splitlines() if line.startswith(f"| {vram} GB |"))
        assert f"`{p.model_format.file}`" in row and f"`{p.text_encoder.file}`" in row and p.weights in row
        workflow = row.split("|")[2].split("`")[1]
        assert workflow == f"kontext_edit_{vram}gb" + ("_plus" if vram >= 32 else "")
        assert (pathlib.Path(__file__).resolve().parents[1] / "workflows" / f"{workflow}.json").exists()
        assert " / ".join(f"{ph.vram_gib:.1f}" for ph in p.phases) in row
