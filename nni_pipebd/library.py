"""The block library on disk: ``library.json`` (config, per-block losses, counters) and ``block_{i}.pt``.

Reading and checking ``library.json`` needs no torch (the CLI checks a library folder before importing it); torch
loads where a tensor file is written or read.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, Optional, Tuple, Union

from .config import Config

if TYPE_CHECKING:
    import torch

__all__ = ["FORMAT", "LibraryError", "atomic_save", "block_path", "write_manifest", "load_manifest", "read_library",
           "random_teacher_warning", "save_object_file", "load_object_file",
           "load_block"]

FORMAT = "nni_pipebd.library/1"
MANIFEST = "library.json"


class LibraryError(RuntimeError):
    """A block library is missing, incomplete or unreadable."""


def block_path(directory: Union[str, Path], index: int) -> Path:
    """Where block ``index``'s student weights live."""
    return Path(directory) / f"block_{index}.pt"


def atomic_save(obj: Any, path: Union[str, Path]) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if path.suffix == ".json":
            with open(tmp, "w") as f:
                json.dump(obj, f, indent=2, sort_keys=False)
                f.write("\n")
        else:
            import torch

            torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_manifest(directory: Union[str, Path], manifest: Dict[str, Any]) -> Path:
    """Write ``library.json`` last, atomically: its presence marks a complete library."""
    missing = [i for i in range(manifest["num_blocks"]) if not block_path(directory, i).is_file()]
    if missing:
        raise LibraryError(f"{directory}: blocks {missing} were not written; the library is incomplete")
    path = Path(directory) / MANIFEST
    atomic_save({"format": FORMAT, **manifest}, path)
    return path


_TEACHER_TRAINING = {"train_precision": "32-true", "train_devices": 1, "train_strategy": "auto"}


def load_manifest(directory: Union[str, Path]) -> Dict[str, Any]:
    """Read and check ``library.json`` of a library folder."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise LibraryError(f"{directory} holds no {MANIFEST}: not a block library, or its training did not finish; "
                           "run `nni-pipebd train CONFIG --out DIR` first")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LibraryError(f"{path} is not valid JSON ({err}); the library is corrupt, train it again") from err
    if manifest.get("format") != FORMAT:
        raise LibraryError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    teacher = manifest.get("config", {}).get("model", {}).get("teacher", {})
    if "pretrained" not in teacher:  # written before the key existed: say what it had
        teacher["pretrained"] = any(teacher.get(key) is not None for key in ("module", "checkpoint", "weights"))
    for key, default in _TEACHER_TRAINING.items():  # written before these keys existed: their defaults (no change)
        teacher.setdefault(key, default)
    return manifest


def read_library(directory: Union[str, Path]) -> Tuple[Dict[str, Any], Config]:
    """``library.json`` of ``directory`` and the job it was trained with, both checked; no torch needed.

    Raises
    ------
    LibraryError
        The folder holds no finished library, or its ``library.json`` is unreadable.
    nni_pipebd.config.ConfigError
        The library's config is not valid (e.g. written by a version with other keys).
    """
    manifest = load_manifest(directory)
    return manifest, Config.from_dict(manifest["config"], manifest["base_dir"])


def random_teacher_warning(manifest: Dict[str, Any]) -> Optional[str]:
    """A warning when the library was distilled from a randomly initialised teacher (``pretrained: false``)."""
    if manifest["config"]["model"]["teacher"].get("pretrained", True):
        return None
    return ("this block library was distilled from a randomly initialised teacher (model.teacher.pretrained: "
            "false): its scores and architectures say nothing about a real task")


def load_block(directory: Union[str, Path], index: int) -> Dict[str, torch.Tensor]:
    """The student ``state_dict`` of block ``index``."""
    import torch

    path = block_path(directory, index)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise LibraryError(f"{path} is missing; the library in {directory} is incomplete") from None
    except Exception as err:  # torch raises several types for truncated/corrupt files
        raise LibraryError(f"{path} cannot be read ({type(err).__name__}: {err}); it is corrupt or truncated") from err


def remove_stale(directory: Union[str, Path], indices: Iterable[int]) -> None:
    """Delete a previous library's manifest and blocks (the manifest first, so nothing looks complete)."""
    directory = Path(directory)
    (directory / MANIFEST).unlink(missing_ok=True)
    for i in indices:
        block_path(directory, i).unlink(missing_ok=True)


def save_object_file(obj: Any, folder: Union[str, Path], stem: str) -> Path:
    """Pickle ``obj`` (a model, a space) for other processes as ``folder/<stem>-<hash>.pt`` (the hash of its bytes).

    Spawned workers, torchrun ranks and NNI trials load it with :func:`load_object_file`, so its classes must be
    importable there; its state (weights, buffers) travels in the file. A changed object gets another name, so a
    library trained with it never passes for one of the old object.

    Raises
    ------
    ValueError
        ``obj`` cannot be pickled (e.g. a class defined inside a function, or a lambda attribute).
    """
    import hashlib
    import io

    import torch

    buffer = io.BytesIO()
    try:
        torch.save(obj, buffer)
    except Exception as exc:  # pickling raises PicklingError, AttributeError, TypeError
        raise ValueError(f"cannot save the {stem} {type(obj).__name__} for the worker processes "
                         f"({type(exc).__name__}: {exc}); define its classes at module level of an importable "
                         "module") from exc
    data = buffer.getvalue()
    path = Path(folder) / f"{stem}-{hashlib.sha1(data).hexdigest()[:12]}.pt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return path


def load_object_file(path: Union[str, Path], what: str) -> Any:
    """What :func:`save_object_file` (or ``torch.save(obj, path)``) wrote; ``what`` names it in errors.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        The file cannot be unpickled (e.g. a class that is not importable here).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist; write it with torch.save(obj, path)")
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # unpickling raises many types: a missing class is AttributeError/ModuleNotFoundError
        raise ValueError(f"cannot load {what} file {str(path)!r} ({type(exc).__name__}: {exc}); its classes must be "
                         "importable where it is loaded (install their package or add their folder to PYTHONPATH)"
                         ) from exc
