"""The KLV_* environment switches, all read one way. Each is off unless set to 1 / true / yes / on
(case-insensitive); README's "Switches" table lists them."""
import os

SWITCHES = {
    "KLV_NO_TRITON": "every Triton kernel off: the torch reference code runs everywhere",
    "KLV_NO_FP8_MATMUL": "fp8 e4m3 weights always upcast instead of multiplying in fp8 (torch._scaled_mm)",
    "KLV_FUSED_MATMUL": "opt-in: activations of up to 4 rows multiply straight from the quantized bytes",
    "KLV_FUSED_LORA": "opt-in: LoRA merged into the weight inside the dequant kernel",
    "KLV_FP8_ROWWISE": "opt-in: one fp8 activation scale per token row (bf16 activations)",
}
_ON = ("1", "true", "yes", "on")


def switch(name: str) -> bool:
    """Whether the environment turns the switch `name` (one of SWITCHES) on."""
    if name not in SWITCHES:
        raise KeyError(f"unknown switch {name!r}; known: {', '.join(SWITCHES)}")
    return os.environ.get(name, "").strip().lower() in _ON
