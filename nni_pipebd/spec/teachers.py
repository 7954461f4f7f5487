"""Teacher models: any torchvision classifier, a user's class_path or a saved module; weights offline; frozen blocks."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import urlparse

import torch
from torch import nn

from ..imports import ImportPathError, import_object
from ..library import load_object_file, save_object_file
from .split import SplitError, split_model

if TYPE_CHECKING:
    from ..config import TeacherConfig

__all__ = [
    "BUILTIN_ARCHS",
    "TeacherError",
    "TeacherWeightsNotFoundError",
    "torchvision_archs",
    "digits_cnn",
    "build_teacher_model",
    "load_teacher_weights",
    "build_teacher",
    "build_teacher_blocks",
    "load_teacher_module",
    "save_teacher_module",
]

_logger = logging.getLogger(__name__)

BUILTIN_ARCHS = ("digits_cnn",)
"""Teacher archs of this package (besides every torchvision classification model)."""

_MAX_LISTED_KEYS = 5


class TeacherError(ValueError):
    """A teacher architecture, its arguments, its weights or its block boundaries are invalid."""


class TeacherWeightsNotFoundError(FileNotFoundError):
    """A teacher checkpoint or a torchvision weights file is not present locally."""


# --------------------------------------------------------------------------------------------------
# Model construction
# --------------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def torchvision_archs() -> Tuple[str, ...]:
    """Every classification model ``torchvision.models`` lists (``list_models(module=torchvision.models)``)."""
    import torchvision.models as tvm

    return tuple(tvm.list_models(module=tvm))


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def digits_cnn(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> nn.Sequential:
    """A small CNN for 8x8..64x64 images: a stem, three stages that halve the resolution, a pooled linear head."""
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TeacherError(f"digits_cnn {name}={value!r} must be a positive integer")
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    modules["stem"] = _conv_bn_relu(in_channels, width, stride=1)
    channels = width
    for stage in range(1, 4):
        out_channels = width * 2 ** (stage - 1)
        modules[f"stage{stage}_down"] = _conv_bn_relu(channels, out_channels, stride=2)
        modules[f"stage{stage}_conv"] = _conv_bn_relu(out_channels, out_channels, stride=1)
        channels = out_channels
    modules["head"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(channels, num_classes))
    return nn.Sequential(modules)


def build_teacher_model(arch: Optional[str] = None, num_classes: int = 10, kwargs: Optional[dict] = None, *,
                        class_path: Optional[str] = None, init_args: Optional[dict] = None,
                        base_dir: Union[str, Path, None] = None) -> nn.Module:
    """Build a randomly initialised teacher: a torchvision model by name, ``digits_cnn``, or a user's callable.

    Parameters
    ----------
    arch : str, optional
        A name of :func:`torchvision_archs` (built with ``torchvision.models.get_model``) or ``digits_cnn``.
    num_classes : int
        Classes of the classifier head (``arch`` only; a ``class_path`` gets what ``init_args`` say).
    kwargs : dict, optional
        Further keyword arguments of the ``arch`` constructor (e.g. ``width_mult``).
    class_path : str, optional
        ``package.module:function`` or ``package.module.Class`` returning an ``nn.Module``; instead of ``arch``.
    init_args : dict, optional
        Keyword arguments of ``class_path``.
    base_dir : str or Path, optional
        The config's folder: a ``class_path`` module beside the config file is found there.

    Returns
    -------
    torch.nn.Module
        The model, never with pretrained weights (see :func:`load_teacher_weights`).

    Raises
    ------
    TeacherError
        Unknown ``arch``, invalid arguments, an import path that does not resolve, or a callable that does not
        return an ``nn.Module``.
    """
    if (arch is None) == (class_path is None):
        raise TeacherError(f"give exactly one of teacher.arch (got {arch!r}) and teacher.class_path "
                           f"(got {class_path!r})")
    if class_path is not None:
        try:
            factory = import_object(class_path, "model.teacher.class_path", base_dir)
        except ImportPathError as err:
            raise TeacherError(str(err)) from None
        try:
            model = factory(**dict(init_args or {}))
        except TypeError as err:
            raise TeacherError(f"model.teacher.class_path {class_path!r} rejects init_args "
                               f"{sorted(init_args or {})}: {err}") from err
        if not isinstance(model, nn.Module):
            raise TeacherError(f"model.teacher.class_path {class_path!r} returned a {type(model).__name__}, not a "
                               "torch.nn.Module")
        return model
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise TeacherError(f"teacher num_classes={num_classes!r} must be a positive integer")
    kwargs = dict(kwargs or {})
    for reserved in ("weights", "num_classes", "progress"):
        if reserved in kwargs:
            raise TeacherError(f"teacher kwargs must not contain {reserved!r} (got {kwargs[reserved]!r}); use "
                               "teacher.num_classes / teacher.weights instead")
    if arch == "digits_cnn":
        builder: Any = digits_cnn
    elif arch in torchvision_archs():
        import torchvision.models as tvm

        builder = lambda **kw: tvm.get_model(arch, weights=None, **kw)  # noqa: E731
    else:
        import difflib

        valid = BUILTIN_ARCHS + torchvision_archs()
        close = difflib.get_close_matches(str(arch), valid, n=4)
        raise TeacherError(f"unknown teacher arch {arch!r}{f'; did you mean {close}' if close else ''}; valid: "
                           f"{', '.join(BUILTIN_ARCHS)} and every torchvision classification model "
                           f"({len(torchvision_archs())}: torchvision.models.list_models()); or set "
                           "teacher.class_path to your own model")
    try:
        return builder(num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise TeacherError(f"invalid kwargs {sorted(kwargs)} for teacher arch {arch!r}: {exc}; see its "
                           "constructor's documentation for accepted arguments") from exc


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------

def _first(keys: Sequence[str]) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    more = f", ... ({len(keys) - _MAX_LISTED_KEYS} more)" if len(keys) > _MAX_LISTED_KEYS else ""
    return f"[{shown}{more}]"


def _read_state_dict(path: Path, hint: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for bad files
        raise TeacherError(
            f"cannot read teacher weights file {str(path)!r} (corrupt, truncated or not a torch state_dict: "
            f"{type(exc).__name__}: {exc}); {hint}"
        ) from exc
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise TeacherError(
            f"teacher weights file {str(path)!r} holds a {type(obj).__name__}, not a state_dict "
            f"(nor a dict with key 'state_dict' or 'model'); {hint}"
        )
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor], path: Path, hint: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys {_first(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys {_first(unexpected)}")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches {_first(mismatched)}")
        raise TeacherError(
            f"teacher weights file {str(path)!r} does not match the {type(model).__name__} model: "
            f"{'; '.join(problems)}; {hint}"
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise TeacherError(f"cannot load teacher weights file {str(path)!r}: {exc}; {hint}") from exc


def _torchvision_weights_file(arch: str, weights: str) -> tuple[Path, str]:
    if arch not in torchvision_archs():
        raise TeacherError(
            f"teacher {arch or 'class_path'!r} has no torchvision weights (got weights={weights!r}); torchvision "
            f"weights exist for torchvision archs only; use teacher.checkpoint instead"
        )
    import torchvision.models as tvm

    enum_cls = tvm.get_model_weights(arch)
    name = weights.split(".", 1)[1] if weights.startswith(enum_cls.__name__ + ".") else weights
    valid = list(enum_cls.__members__)
    if name not in enum_cls.__members__:
        raise TeacherError(
            f"unknown weights {weights!r} for teacher arch {arch!r}; valid names are {', '.join(valid)}"
        )
    url = enum_cls[name].url
    filename = os.path.basename(urlparse(url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename, url


def load_teacher_weights(
    model: nn.Module, checkpoint: str | os.PathLike | None, weights: str | None, arch: Optional[str] = None
) -> None:
    """Load teacher weights from local files only; never downloads.

    Parameters
    ----------
    model : torch.nn.Module
        The teacher built by :func:`build_teacher_model`; loaded in place.
    checkpoint : path-like, optional
        A local file holding a ``state_dict`` (or a dict with key ``"state_dict"`` or ``"model"``).
        Takes precedence over ``weights`` when both are given.
    weights : str, optional
        Name of a torchvision weights enum member of ``arch`` (e.g. ``"IMAGENET1K_V1"``); the file
        is read from the local torch hub cache ``torch.hub.get_dir()/checkpoints/``.
    arch : str, optional
        The torchvision architecture (needed for ``weights`` only).

    Raises
    ------
    TeacherWeightsNotFoundError
        The checkpoint or the torchvision weights file is absent.
    TeacherError
        Unreadable file, key or shape mismatch, or unknown weights name.

    Notes
    -----
    With both ``checkpoint`` and ``weights`` None the model keeps its random initialisation.
    """
    arch_name = arch or type(model).__name__
    if checkpoint is not None:
        if weights is not None:
            _logger.info("teacher checkpoint %s given; ignoring torchvision weights %r", checkpoint, weights)
        path = Path(checkpoint)
        hint = (
            "save a trained teacher with torch.save(model.state_dict(), path) using the same arch, "
            "num_classes and kwargs"
        )
        if not path.exists():
            raise TeacherWeightsNotFoundError(
                f"teacher checkpoint {str(path)!r} does not exist; create it by training the teacher and "
                f"saving torch.save(model.state_dict(), {str(path)!r}), set teacher.train_if_missing: true "
                f"to train and cache it there, or point teacher.checkpoint at an existing file"
            )
        if not path.is_file():
            raise TeacherError(f"teacher checkpoint {str(path)!r} is not a regular file; {hint}")
        _apply_state_dict(model, _read_state_dict(path, hint), path, hint)
        _logger.info("loaded %s teacher weights from %s", arch_name, path)
        return
    if weights is None:
        _logger.debug("no teacher weights given; %s keeps its random initialisation", arch_name)
        return
    path, url = _torchvision_weights_file(arch, weights)
    if not path.is_file():
        raise TeacherWeightsNotFoundError(
            f"torchvision weights {weights!r} for {arch} not found in the local torch hub cache: place the "
            f"file {str(path)!r} there (downloaded elsewhere from {url}); weights are never downloaded"
        )
    hint = (
        f"torchvision {weights!r} weights expect num_classes and kwargs of the pretrained model "
        f"(usually num_classes: 1000 and default kwargs); re-fetch {url} if the file is damaged"
    )
    _apply_state_dict(model, _read_state_dict(path, hint), path, hint)
    _logger.info("loaded %s teacher weights %s from %s", arch, weights, path)


# --------------------------------------------------------------------------------------------------
# All together
# --------------------------------------------------------------------------------------------------

def load_teacher_module(path: Union[str, os.PathLike]) -> nn.Module:
    """A whole teacher saved with ``torch.save(model, path)`` (its class must be importable).

    Raises
    ------
    TeacherWeightsNotFoundError
        No such file.
    TeacherError
        The file cannot be unpickled or holds no ``nn.Module``.
    """
    try:
        model = load_object_file(path, "teacher module")
    except FileNotFoundError as err:
        raise TeacherWeightsNotFoundError(f"{err} or pass the model to train(teacher=model)") from None
    except ValueError as err:
        raise TeacherError(str(err)) from None
    if not isinstance(model, nn.Module):
        raise TeacherError(f"teacher module file {str(path)!r} holds a {type(model).__name__}, not an nn.Module; "
                           "for a state_dict use teacher.checkpoint with teacher.arch or teacher.class_path")
    return model


def save_teacher_module(model: nn.Module, folder: Union[str, Path]) -> Path:
    """Save a whole teacher instance for the worker processes: ``folder/teacher-<hash>.pt`` (see
    :func:`~nni_pipebd.library.save_object_file`).

    Raises
    ------
    TeacherError
        The model cannot be pickled (e.g. a class defined inside a function or a lambda attribute).
    """
    try:
        return save_object_file(model, folder, "teacher")
    except ValueError as err:
        raise TeacherError(str(err)) from None


def build_teacher(config: "TeacherConfig", base_dir: Union[str, Path] = ".") -> nn.Module:
    """The teacher a config describes, its weights loaded (``arch``/``class_path`` + weights, or a ``module`` file).

    Relative paths resolve against ``base_dir`` (the config file's folder).
    """
    def resolve(path: Optional[str]) -> Optional[Path]:
        if path is None:
            return None
        path = Path(path).expanduser()
        return path if path.is_absolute() else Path(base_dir) / path

    if config.module is not None:
        return load_teacher_module(resolve(config.module))
    arch = None if config.class_path is not None else (config.arch or "mobilenet_v2")
    model = build_teacher_model(arch, config.num_classes, config.kwargs, class_path=config.class_path,
                                init_args=config.init_args, base_dir=base_dir)
    load_teacher_weights(model, resolve(config.checkpoint), config.weights, arch)
    return model


def build_teacher_blocks(model: nn.Module, sample: torch.Tensor,
                         boundaries: Optional[Sequence[Union[int, str]]] = None, *,
                         leaf_modules: Sequence[Any] = (),
                         autowrap_functions: Sequence[Any] = ()) -> Tuple[List[nn.Module], List[str]]:
    """Split a teacher into frozen blocks whose composition equals the model exactly.

    Parameters
    ----------
    model : torch.nn.Module
        The teacher (see :func:`build_teacher`); set to eval mode and ``requires_grad_(False)``.
    sample : torch.Tensor
        A small input batch (shapes only).
    boundaries : sequence of str or int, optional
        The first module of blocks 1..N-1 (names as in ``named_modules()``, functional ops as listed by
        ``nni-pipebd blocks``, or indices of direct children); default: where the resolution drops, and the head.
    leaf_modules, autowrap_functions : sequence
        Module classes tracing must not enter and functions it records as one call (``model.teacher.leaf_modules``
        / ``autowrap_functions``; see :func:`~nni_pipebd.spec.split.trace_model`).

    Returns
    -------
    blocks : list of torch.nn.Module
        The blocks, in eval mode with ``requires_grad`` False on every parameter.
    names : list of str
        Where blocks 1..N-1 start.

    Raises
    ------
    TeacherError
        The model cannot be traced or split there (the message names the module, the reason and valid names).
    """
    model.eval()
    model.requires_grad_(False)
    try:
        blocks, names = split_model(model, sample, boundaries, leaf_modules, autowrap_functions)
    except SplitError as err:
        raise TeacherError(str(err)) from None
    for block in blocks:
        block.eval()
        block.requires_grad_(False)
    _logger.info("%s teacher split into %d blocks at %s", type(model).__name__, len(blocks), names)
    return blocks, names
