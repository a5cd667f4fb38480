"""Out-of-memory recovery without ComfyUI (optimizations/oom.py): retry once after freeing, retry with smaller tiles,
and nothing of a failed attempt left held, counted with the report's own counters. The errors are injected: on the
CPU, torch raises no torch.OutOfMemoryError of its own."""
import pytest
import torch

from kontext_lowvram.loaders.flux_layout import FluxVAEConfig
from kontext_lowvram.optimizations import oom, tiling
from kontext_lowvram.optimizations.phase_report import Recorder
from fixtures.vae import make_vae

MIB = 2 ** 20
OOM = oom.OOM_ERROR


def failing(times, result="done", hold_mb=0, log=None):
    """An attempt that runs out of memory its first `times` calls, each after filling `hold_mb` MiB it keeps in
    its frame (as a half-done step keeps its activations)."""
    calls = []

    def attempt(*args):
        calls.append(args)
        if log is not None:
            log.append(("attempt",) + args)
        if len(calls) <= times:
            activations = torch.ones(hold_mb * MIB // 4) if hold_mb else None  # noqa: F841 (held by the frame)
            raise OOM("CUDA out of memory. Tried to allocate 2.00 GiB")
        return result
    attempt.calls = calls
    return attempt


def test_oom_error_is_torchs():
    assert oom.OOM_ERROR is torch.cuda.OutOfMemoryError
    assert issubclass(oom.StillOutOfMemory, torch.cuda.OutOfMemoryError)


def test_retry_once_frees_then_runs_again():
    log = []
    attempt = failing(1, log=log)
    got = oom.retry_once(attempt, free=lambda: log.append(("free",)), on_retry=lambda d: log.append(("retry", d)),
                         advice="use a smaller format")
    assert got == "done"
    assert log == [("attempt",), ("free",),
                   ("retry", "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"), ("attempt",)]


def test_a_second_oom_raises_the_advice_still_as_an_oom():
    attempt = failing(5)
    with pytest.raises(oom.StillOutOfMemory) as err:
        oom.retry_once(attempt, free=lambda: None, on_retry=lambda d: None,
                       advice="use a smaller format, or `kontext-lowvram plan --vram N`")
    assert len(attempt.calls) == 2
    assert str(err.value).startswith("use a smaller format, or `kontext-lowvram plan --vram N` (out of memory again")
    assert isinstance(err.value, torch.cuda.OutOfMemoryError) and isinstance(err.value.__cause__, OOM)


def test_other_errors_and_an_inner_give_up_are_not_retried():
    for error in (ValueError("bad input"), oom.StillOutOfMemory("inner recovery gave up")):
        calls = []

        def attempt():
            calls.append(1)
            raise error
        with pytest.raises(type(error)):
            oom.retry_once(attempt, free=lambda: pytest.fail("freed"), on_retry=lambda d: None, advice="")
        assert calls == [1]


def test_a_failed_run_leaves_no_memory_held():
    """A failing attempt fills 256 MiB twice; the final error is still alive (pytest holds it), and yet the
    phase's own counter says nothing is held after: the failed attempts' frames were cleared."""
    rec = Recorder()
    with pytest.raises(oom.StillOutOfMemory) as err:
        with rec.phase("denoise", device="cpu") as r:
            oom.retry_once(failing(5, hold_mb=256), free=lambda: None, on_retry=r.recovered, advice="give up")
    assert err.value.__cause__.__traceback__ is not None  # the error keeps its traceback ...
    assert r.error == "StillOutOfMemory" and r.recoveries == 1
    assert r.ram_held < 64 * MIB, r.ram_held / MIB  # ... but not the tensors of the attempts


def test_a_recovered_run_leaves_no_memory_held():
    rec = Recorder()
    with rec.phase("denoise", device="cpu") as r:
        assert oom.retry_once(failing(1, hold_mb=256), free=lambda: None, on_retry=r.recovered, advice="") == "done"
    assert r.recoveries == 1 and r.ram_held < 64 * MIB


def test_smaller_tiles_halve_down_to_the_floor():
    log = []
    attempt = failing(2, log=log)
    got = oom.retry_smaller_tiles(attempt, 512, floor=64, free=lambda: log.append(("free",)),
                                  on_retry=lambda d, a, b: log.append(("retry", a, b)), advice="")
    assert got == "done"
    assert log == [("attempt", None), ("free",), ("retry", 512, 256), ("attempt", 256), ("free",),
                   ("retry", 256, 128), ("attempt", 128)]


def test_out_of_memory_at_the_floor_gives_up_with_the_advice():
    attempt = failing(100)
    with pytest.raises(oom.StillOutOfMemory, match=r"^lower the resolution \(out of memory with 64-px tiles"):
        oom.retry_smaller_tiles(attempt, 512, floor=64, free=lambda: None, on_retry=lambda *a: None,
                                advice="lower the resolution")
    assert attempt.calls == [(None,), (256,), (128,), (64,)]
    attempt = failing(100)
    with pytest.raises(oom.StillOutOfMemory):  # already below twice the floor: nothing smaller to try
        oom.retry_smaller_tiles(attempt, 100, floor=64, free=lambda: None, on_retry=lambda *a: None, advice="")
    assert attempt.calls == [(None,)]


def test_plan_image_tile_is_what_a_retry_halves():
    ae = make_vae(FluxVAEConfig(ch=16, ch_mult=(1, 2, 2, 4)), 8)
    prog = tiling.decoder_program(ae.decoder, (1, 16, 24, 40))
    assert tiling.plan(prog, device="cpu", dtype=torch.float32).image_tile() == 320  # one tile: the image side
    for t in (256, 128, 64):
        assert tiling.plan(prog, device="cpu", dtype=torch.float32, tile_size=t).image_tile() == t
    auto = tiling.plan(prog, device="cpu", dtype=torch.float32, budget_bytes=4 * MIB)
    half = tiling.plan(prog, device="cpu", dtype=torch.float32, tile_size=auto.image_tile() // 2)
    assert half.est_tile_bytes < auto.est_tile_bytes / 2


@torch.no_grad()
def test_tiled_decode_recovers_from_oom_with_smaller_tiles_and_the_same_image():
    """A full-resolution decoder conv that 'runs out of memory' on inputs wider than 100 px: the planned tiles
    (the whole 128-px image) fail, the retry halves them to 64 px (65-px windows there), and the image equals the
    untiled decode."""
    ae = make_vae(FluxVAEConfig(ch=16, ch_mult=(1, 2, 2, 4)), 8)
    z = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    want = ae.decoder(z)
    prog = tiling.decoder_program(ae.decoder, z.shape)
    first = tiling.plan(prog, device="cpu", dtype=torch.float32)
    sides = []

    def too_big(module, args):
        if max(args[0].shape[-2:]) > 100:
            raise OOM("injected: tile too large")
    hook = ae.decoder.up[0].block[0].conv1.register_forward_pre_hook(too_big)
    try:
        def attempt(side):
            sides.append(side)
            pl = first if side is None else tiling.plan(prog, device="cpu", dtype=torch.float32, tile_size=side,
                                                        storage="cpu")
            return tiling.run(pl, z)
        got = oom.retry_smaller_tiles(attempt, first.image_tile(), floor=tiling.OOM_TILE_FLOOR, free=lambda: None,
                                      on_retry=lambda *a: None, advice="")
    finally:
        hook.remove()
    assert first.image_tile() == 128 and sides == [None, 64]
    assert (got - want).abs().max() < 1e-4
