import sys
from pathlib import Path

import pytest
import torch

from kontext_lowvram.loaders.flux_layout import FluxConfig

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # --import-mode=importlib does not put test dirs on sys.path: shared helpers (fixtures/, t5_files)
    sys.path.insert(0, _HERE)

from fixtures.flux import random_flux_state_dict  # noqa: E402

# Small but real FLUX layout; widths are multiples of 256 so every GGUF block type fits.
TINY = FluxConfig(hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1, context_in_dim=256, vec_in_dim=256)


@pytest.fixture(scope="session")
def tiny_cfg():
    return TINY


@pytest.fixture(scope="session")
def tiny_sd():
    return random_flux_state_dict(TINY, seed=0, dtype=torch.bfloat16)
