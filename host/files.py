"""Model files in ComfyUI's model folders, listed and found the same way for every loader node."""
import os

MODEL_FOLDERS = ("diffusion_models",)  # ComfyUI maps the legacy "unet" folder into this one
MODEL_EXTENSIONS = (".gguf", ".safetensors", ".sft")
TEXT_ENCODER_FOLDERS = ("text_encoders",)  # ComfyUI maps models/text_encoders and the legacy models/clip here
TEXT_ENCODER_EXTENSIONS = (".safetensors", ".sft", ".gguf")


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


def model_files():
    """Every loadable file under ComfyUI's diffusion_models/unet folders (relative names, sorted)."""
    return list_files(MODEL_FOLDERS, MODEL_EXTENSIONS)


def model_path(name):
    return find_file(MODEL_FOLDERS, name, "models/diffusion_models (or models/unet)")


def text_encoder_files():
    return list_files(TEXT_ENCODER_FOLDERS, TEXT_ENCODER_EXTENSIONS)


def text_encoder_path(name):
    return find_file(TEXT_ENCODER_FOLDERS, name, "models/text_encoders (or models/clip)")


def lora_files():
    import folder_paths
    return folder_paths.get_filename_list("loras")


def lora_path(name):
    import folder_paths
    return folder_paths.get_full_path_or_raise("loras", name)


def user_directory():
    import folder_paths
    return folder_paths.get_user_directory()
