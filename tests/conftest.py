import pytest
import torch

from kontext_lowvram.loaders.flux_layout import FluxConfig, random_flux_state_dict

# Small but real FLUX layout; widths are multiples of 256 so every GGUF block type fits.
TINY = FluxConfig(hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1, context_in_dim=256, vec_in_dim=256)


@pytest.fixture(scope="session")
def tiny_cfg():
    return TINY


@pytest.fixture(scope="session")
def tiny_sd():
    return random_flux_state_dict(TINY, seed=0, dtype=torch.bfloat16)
