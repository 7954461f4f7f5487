"""Imports by name: a user's callable by dotted path (as LightningCLI does), and a package's names on first use."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

__all__ = ["import_object", "ImportPathError", "lazy_names"]


class ImportPathError(ValueError):
    """A ``class_path`` does not name an importable callable."""


def import_object(path: str, key: str, base_dir: Optional[Union[str, Path]] = None) -> Callable[..., Any]:
    """The object a dotted path names.

    Parameters
    ----------
    path : str
        ``package.module:attr`` (``attr`` may be dotted) or ``package.module.Attr``.
    key : str
        The config key that holds ``path`` (named in errors).
    base_dir : str or Path, optional
        The config file's folder: a module beside the config file is importable too (the folder is added to
        ``sys.path``, so spawned workers and pickled objects find it as well).

    Raises
    ------
    ImportPathError
        Malformed path, module not found, attribute missing, or not callable.
    """
    if not isinstance(path, str) or not path or path.startswith((".", ":")) or path.count(":") > 1:
        raise ImportPathError(f"{key} = {path!r} is not an import path; write 'package.module:function' or "
                              "'package.module.Class'")
    if ":" in path:
        module_name, attr = path.split(":")
    elif "." in path:
        module_name, attr = path.rsplit(".", 1)
    else:
        raise ImportPathError(f"{key} = {path!r} names no module; write 'module:function' or 'package.module.Class'")
    module = _import_module(module_name, key, path, base_dir)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = sorted(name for name in dir(module) if not name.startswith("_"))[:12]
            raise ImportPathError(f"{key} = {path!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) "
                                  f"has no attribute {attr!r}; it defines {public}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ImportPathError(f"{key} = {path!r} names a {type(obj).__name__}, not a class or function")
    return obj


def _import_module(name: str, key: str, path: str, base_dir: Optional[Union[str, Path]]) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        top = name.split(".")[0]
        if err.name != top and not name.startswith(f"{err.name}."):
            raise  # the user's module itself imports something missing: show that error as it is
        folder = None if base_dir is None else str(Path(base_dir).resolve())
        if folder is None or not Path(folder, top).exists() and not Path(folder, f"{top}.py").exists():
            where = f" or in the config's folder {folder}" if folder else ""
            raise ImportPathError(f"{key} = {path!r}: no module named {name!r} on the Python path{where}; install "
                                  "the package, add its folder to PYTHONPATH or put the module beside the config "
                                  "file") from None
        if folder not in sys.path:
            sys.path.insert(0, folder)
        return importlib.import_module(name)


def lazy_names(package: str, homes: Mapping[str, str], namespace: Dict[str, Any]
               ) -> Tuple[Callable[[str], Any], Callable[[], List[str]]]:
    """A package's ``__getattr__`` and ``__dir__`` (PEP 562) for names that load on first use.

    Parameters
    ----------
    package : str
        The package's ``__name__``.
    homes : mapping
        Each public name to the submodule (relative to ``package``) that defines it.
    namespace : dict
        The package's ``globals()``: a loaded name is kept there, so it loads once.
    """
    def __getattr__(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{homes[name]}", package), name)
        namespace[name] = value
        return value

    def __dir__() -> List[str]:
        return sorted(set(namespace) | set(homes))

    return __getattr__, __dir__
