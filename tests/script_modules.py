"""A script of tools/ or launch/ as a module, to call its main or helpers in this process (to stub or
spy on them) instead of starting a fresh interpreter."""
import importlib.util
from pathlib import Path


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(f"{path.stem}_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
