"""Which package may import ComfyUI: host/ only. loaders/ and optimizations/ are plain torch, nodes/ reach the host
through host/, and so do the pack's registration and CLI. Read from each module's source, every import anywhere in
it (also inside functions, also importlib.import_module / __import__ of a literal name)."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST_MODULES = ("comfy", "folder_paths", "comfy_api", "comfyui_version")  # and every comfy_* (comfy_execution, ...)


def is_host_module(name):
    top = name.split(".")[0]
    return top in HOST_MODULES or top.startswith("comfy_")


def imported_names(path):
    """(line, module name) of every absolute import in the file at `path`."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.lineno, node.module
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and \
                isinstance(node.args[0].value, str) and \
                (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None) == "__import__"):
            yield node.lineno, node.args[0].value


def host_imports(*parts):
    """'file:line module' for each import of a ComfyUI module under ROOT/parts (a folder or one file)."""
    where = os.path.join(ROOT, *parts)
    files = [where] if where.endswith(".py") else [os.path.join(d, f) for d, _, fs in os.walk(where)
                                                     for f in fs if f.endswith(".py")]
    assert files, where
    return [f"{os.path.relpath(p, ROOT)}:{line} {name}" for p in sorted(files) for line, name in imported_names(p)
            if is_host_module(name)]


@pytest.mark.parametrize("package", ["loaders", "optimizations", "nodes", "__init__.py", "cli.py"])
def test_only_host_imports_comfyui(package):
    assert host_imports(package) == []


def test_host_is_where_comfyui_is_imported():
    found = host_imports("host")
    assert any(" comfy." in f for f in found) and any(" folder_paths" in f for f in found), found


def test_the_scan_sees_imports_inside_functions(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("def f():\n    import comfy.ops\n    from comfy_api.torch_helpers import x\n"
                   "    importlib.import_module('folder_paths')\n    from .comfy import y\n")
    assert [name for _, name in imported_names(str(src))] == ["comfy.ops", "comfy_api.torch_helpers", "folder_paths"]
