"""Model files in ComfyUI's model folders, listed and found the same way for every loader node."""
import os


def list_files(folders, extensions):
    """Every file with one of `extensions` below ComfyUI's `folders` (relative names with '/', sorted)."""
    import folder_paths
    names = set()
    for folder in folders:
        for root_dir in folder_paths.get_folder_paths(folder):
            if not os.path.isdir(root_dir):
                continue
            for dirpath, _, files in os.walk(root_dir, followlinks=True):
                for f in files:
                    if f.lower().endswith(extensions):
                        names.add(os.path.relpath(os.path.join(dirpath, f), root_dir).replace(os.sep, "/"))
    return sorted(names)


def find_file(folders, name, where):
    """The full path of `name` in the first of `folders` holding it; `where` names the folders in the error."""
    import folder_paths
    for folder in folders:
        for root_dir in folder_paths.get_folder_paths(folder):
            p = os.path.join(root_dir, name)
            if os.path.isfile(p):
                return p
    raise FileNotFoundError(f"{name}: not found in ComfyUI's {where} folders — "
                            "put the file there and press 'r' in the UI to refresh the list")
