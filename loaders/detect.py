"""Which container a model file is, from its first bytes (never by trusting the extension)."""
from .errors import ModelFileError, check_file

GGUF_MAGIC = b"GGUF"
PICKLE_HINT = ("pickled .ckpt/.pt/.bin files are never loaded (they can run code): "
               "convert the model to .safetensors or .gguf")


def detect_container(path) -> str:
    """'gguf' or 'safetensors'; ModelFileError for anything else."""
    path = check_file(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == GGUF_MAGIC:
        return "gguf"
    # safetensors first: its first 8 bytes are the header length, whose low byte is 0x80 (a pickle's first byte)
    # in one file of 256
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        raise ModelFileError(path, "is a PyTorch pickle/zip checkpoint", PICKLE_HINT)
    raise ModelFileError(path, "is neither GGUF nor safetensors", "use a .gguf or .safetensors model; " + PICKLE_HINT)
