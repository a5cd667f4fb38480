"""Key-name conventions shared by the readers and writers."""
from .flux2_layout import SHARED_MODULATIONS
from .flux_layout import TRANSFORMER_PREFIXES

# city96's GGUF convention (and ours for on-load conversion): quantize the big block linears, keep the
# small input/output projections and all 1-D tensors in full precision — they are tiny and precision-sensitive.
# FLUX.2's shared modulation layers (one per stream instead of one per block, each as big as a block's attention)
# count as block linears: city96's FLUX.2 files quantize them too.
QUANTIZED_BLOCKS = ("double_blocks.", "single_blocks.") + SHARED_MODULATIONS


def strip_prefix(keys):
    """The prefix every transformer key shares ('' when none), so it can be removed."""
    for p in TRANSFORMER_PREFIXES:
        if any(k.startswith(p) for k in keys):
            return p
    return ""


def should_quantize(key: str, shape) -> bool:
    return key.endswith(".weight") and len(shape) == 2 and key.startswith(QUANTIZED_BLOCKS)
