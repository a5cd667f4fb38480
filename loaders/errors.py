"""One error type for every bad model file, always naming the file and what to do."""
import os


def printable(text) -> str:
    """`text` (a path or name, str or bytes) safe for any UTF-8 log or JSON: a file name that is not UTF-8 comes
    from the OS as lone surrogates (or bytes), which would make printing the error raise UnicodeEncodeError."""
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    text = str(text)
    try:  # the file name's own bytes (os.fsdecode's escapes), shown as \xNN where they are not UTF-8
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # other lone surrogates: shown as \udNNN
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class ModelFileError(ValueError):
    def __init__(self, path, problem: str, fix: str = ""):
        self.path = os.fspath(path) if path is not None else "<memory>"
        self.problem = printable(problem)
        self.fix = fix
        msg = f"{printable(self.path)}: {self.problem}"
        if fix:
            msg += f" — {fix}"
        super().__init__(msg)


REDOWNLOAD = "the file looks truncated or corrupt: download it again (compare its size with the source)"


def check_file(path) -> str:
    """A readable regular file, or ModelFileError saying what it is instead."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise ModelFileError(p, "no such file", "check the path / put the model in ComfyUI's models/diffusion_models")
    if os.path.isdir(p):
        raise ModelFileError(p, "is a directory, not a model file", "pick the .gguf / .safetensors file inside it")
    if os.path.getsize(p) == 0:
        raise ModelFileError(p, "is empty (0 bytes)", REDOWNLOAD)
    return p
