"""Errors shared by the quant families (gguf, fp8, nf4)."""


class UnsupportedQuantType(ValueError):
    """A quant type id/name we cannot dequantize. The message says which types are supported."""


class QuantDataError(ValueError):
    """Quantized bytes whose size or geometry does not fit the quant type (truncated or corrupt data)."""
