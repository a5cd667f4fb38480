"""One error type for every bad model file, always naming the file and what to do."""
import os


class ModelFileError(ValueError):
    def __init__(self, path, problem: str, fix: str = ""):
        self.path = os.fspath(path) if path is not None else "<memory>"
        self.problem = problem
        self.fix = fix
        msg = f"{self.path}: {problem}"
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
