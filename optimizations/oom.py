"""Recovering from running out of memory (plain Python + torch): try again once after freeing, or with smaller tiles.

Two things make a retry after an out-of-memory error work at all:
* the retry runs *after* the ``except`` block, never inside it: while the exception is being handled it holds its
  traceback, and the traceback holds every frame of the failed attempt with its tensors;
* those frames are cleared (``traceback.clear_frames``) before anything is freed, so a final error, which keeps the
  last failure as its cause, does not keep the failed attempt's tensors alive either.
"""
import traceback

import torch

#: torch >= 2.5 raises torch.OutOfMemoryError (torch.cuda.OutOfMemoryError is the same class there); older torch
#: has only torch.cuda.OutOfMemoryError.
OOM_ERROR = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


class StillOutOfMemory(OOM_ERROR):
    """Out of memory after every recovery was tried. Still an OutOfMemoryError, so the host's own handling of
    one (ComfyUI unloads its models and shows its tips) goes on; the message says what to change."""


def drop_frames(exc: BaseException) -> str:
    """Release the tensors that the frames of `exc` (and of the exceptions chained to it) still reference; -> a
    one-line description of it for logs and reports."""
    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        e = e.__cause__ or e.__context__
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first[:160]}" if first else type(exc).__name__


def retry_once(attempt, *, free, on_retry, advice):
    """attempt(); after an out-of-memory error free() and attempt() once more. on_retry(description) is called
    before the retry; a second out-of-memory error raises StillOutOfMemory(advice), caused by it."""
    failure = None
    try:
        return attempt()
    except StillOutOfMemory:
        raise  # a recovery further in already did what it could
    except OOM_ERROR as e:
        failure = drop_frames(e)
    # outside the except block: the failed attempt's frames are gone before anything is freed or run again
    free()
    on_retry(failure)
    try:
        return attempt()
    except StillOutOfMemory:
        raise
    except OOM_ERROR as e:
        second = drop_frames(e)
        raise StillOutOfMemory(f"{advice} (out of memory again after recovering: {second})") from e


def retry_smaller_tiles(attempt, first_tile: int, *, floor: int, free, on_retry, advice):
    """attempt(None) runs the planned tiles; after an out-of-memory error attempt(side) runs again with half the
    tile side (image pixels) of the last try, down to `floor`. on_retry(description, old side, new side) is called
    before each retry; out of memory at the floor raises StillOutOfMemory(advice), caused by the last error."""
    tile, failure = None, None
    side = max(1, int(first_tile))
    while True:
        try:
            return attempt(tile)
        except StillOutOfMemory:
            raise
        except OOM_ERROR as e:
            failure = drop_frames(e)
            if side // 2 < floor:
                raise StillOutOfMemory(f"{advice} (out of memory with {side}-px tiles: {failure})") from e
        free()
        on_retry(failure, side, side // 2)
        side //= 2
        tile = side
