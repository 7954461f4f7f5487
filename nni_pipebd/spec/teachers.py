"""Teacher models: build, load weights offline, flatten into layers and split into frozen blocks."""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlparse

import torch
from torch import nn

__all__ = [
    "TEACHER_ARCHS",
    "TeacherError",
    "TeacherWeightsNotFoundError",
    "build_teacher_model",
    "teacher_layers",
    "default_boundaries",
    "split_layers",
    "split_sequential",
    "load_teacher_weights",
    "build_teacher_blocks",
]

_logger = logging.getLogger(__name__)

TEACHER_ARCHS = ("mobilenet_v2", "efficientnet_b0", "resnet18", "digits_cnn")

_TORCHVISION_ARCHS = ("mobilenet_v2", "efficientnet_b0", "resnet18")
_DIGITS_CNN_KWARGS = ("in_channels", "width")
_MAX_LISTED_KEYS = 5


class TeacherError(ValueError):
    """A teacher architecture, its arguments, its weights or its block boundaries are invalid."""


class TeacherWeightsNotFoundError(FileNotFoundError):
    """A teacher checkpoint or a torchvision weights file is not present locally."""


# --------------------------------------------------------------------------------------------------
# Model construction
# --------------------------------------------------------------------------------------------------

def _check_arch(arch: str) -> None:
    if arch not in TEACHER_ARCHS:
        raise TeacherError(
            f"unknown teacher arch {arch!r}; valid archs are {', '.join(TEACHER_ARCHS)} "
            f"(set teacher.arch to one of them, or split your own nn.Sequential with split_sequential)"
        )


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TeacherError(f"digits_cnn kwarg {name}={value!r} must be a positive integer")
    return value


def _build_digits_cnn(num_classes: int, kwargs: Mapping[str, Any]) -> nn.Sequential:
    unknown = sorted(set(kwargs) - set(_DIGITS_CNN_KWARGS))
    if unknown:
        raise TeacherError(
            f"unknown digits_cnn kwargs {unknown}; accepted kwargs are {list(_DIGITS_CNN_KWARGS)}"
        )
    in_channels = _positive_int("in_channels", kwargs.get("in_channels", 3))
    width = _positive_int("width", kwargs.get("width", 16))
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    modules["stem"] = _conv_bn_relu(in_channels, width, stride=1)
    channels = width
    for stage in range(1, 4):
        out_channels = width * 2 ** (stage - 1)
        modules[f"stage{stage}_down"] = _conv_bn_relu(channels, out_channels, stride=2)
        modules[f"stage{stage}_conv"] = _conv_bn_relu(out_channels, out_channels, stride=1)
        channels = out_channels
    modules["head"] = nn.Sequential(
        nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(channels, num_classes)
    )
    return nn.Sequential(modules)


def build_teacher_model(arch: str, num_classes: int, kwargs: dict | None = None) -> nn.Module:
    """Build a randomly initialised teacher model.

    Parameters
    ----------
    arch : str
        One of :data:`TEACHER_ARCHS`.
    num_classes : int
        Number of classes of the classifier head.
    kwargs : dict, optional
        Extra keyword arguments: for torchvision archs those of the torchvision constructor
        (e.g. ``width_mult`` for ``mobilenet_v2``); for ``digits_cnn`` ``in_channels`` (default 3)
        and ``width`` (default 16).

    Returns
    -------
    torch.nn.Module
        The model, never with pretrained weights (see :func:`load_teacher_weights`).

    Raises
    ------
    TeacherError
        Unknown ``arch``, invalid ``num_classes`` or invalid ``kwargs``.
    """
    _check_arch(arch)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise TeacherError(f"teacher num_classes={num_classes!r} must be a positive integer")
    kwargs = dict(kwargs or {})
    if arch == "digits_cnn":
        return _build_digits_cnn(num_classes, kwargs)
    for reserved in ("weights", "num_classes", "progress"):
        if reserved in kwargs:
            raise TeacherError(
                f"teacher kwargs must not contain {reserved!r} (got {kwargs[reserved]!r}); "
                f"use teacher.num_classes / teacher.weights instead"
            )
    import torchvision.models as tvm

    builder = getattr(tvm, arch)
    try:
        return builder(weights=None, num_classes=num_classes, **kwargs)
    except TypeError as exc:
        raise TeacherError(
            f"invalid kwargs {sorted(kwargs)} for torchvision.models.{arch}: {exc}; "
            f"see the torchvision documentation of {arch} for accepted arguments"
        ) from exc


# --------------------------------------------------------------------------------------------------
# Flattening and splitting
# --------------------------------------------------------------------------------------------------

def _require_attrs(arch: str, model: nn.Module, names: Sequence[str]) -> None:
    missing = [n for n in names if not hasattr(model, n)]
    if missing:
        raise TeacherError(
            f"model of type {type(model).__name__} lacks {missing} expected of a {arch} teacher; "
            f"pass the model built by build_teacher_model({arch!r}, ...)"
        )


def teacher_layers(arch: str, model: nn.Module) -> tuple[list[nn.Module], int]:
    """Flatten a teacher into layers whose sequential composition reproduces ``model(x)``.

    Parameters
    ----------
    arch : str
        One of :data:`TEACHER_ARCHS`; the architecture ``model`` was built with.
    model : torch.nn.Module
        The teacher, as built by :func:`build_teacher_model`.

    Returns
    -------
    layers : list of torch.nn.Module
        The layers; they are (or wrap) the model's own submodules, not copies.
    head_index : int
        Index of the classifier head, always the last layer.

    Raises
    ------
    TeacherError
        Unknown ``arch`` or a model that does not have the structure of ``arch``.
    """
    _check_arch(arch)
    if arch in ("mobilenet_v2", "efficientnet_b0"):
        _require_attrs(arch, model, ("features", "classifier"))
        features = list(model.features)
        if len(features) < 2:
            raise TeacherError(f"{arch} model has only {len(features)} feature layers; expected at least 2")
        pool = nn.AdaptiveAvgPool2d(1) if arch == "mobilenet_v2" else model.avgpool
        head = nn.Sequential(features[-1], pool, nn.Flatten(1), model.classifier)
        layers = features[:-1] + [head]
    elif arch == "resnet18":
        names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc")
        _require_attrs(arch, model, names)
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        head = nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)
        layers = [stem, model.layer1, model.layer2, model.layer3, model.layer4, head]
    else:  # digits_cnn
        if not isinstance(model, nn.Sequential) or len(model) < 2:
            raise TeacherError(
                f"digits_cnn teacher must be an nn.Sequential with at least 2 children, got "
                f"{type(model).__name__}; pass the model built by build_teacher_model('digits_cnn', ...)"
            )
        layers = list(model.children())
    return layers, len(layers) - 1


def _spatial_size(tensor: torch.Tensor, where: str) -> int:
    if not isinstance(tensor, torch.Tensor) or tensor.dim() < 3:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise TeacherError(
            f"{where} is {shape}, not a tensor with spatial dimensions (N, C, H, W); "
            f"give explicit boundaries instead of relying on default_boundaries"
        )
    size = 1
    for dim in tensor.shape[2:]:
        size *= int(dim)
    return size


def default_boundaries(layers: list[nn.Module], head_index: int, sample: torch.Tensor) -> list[int]:
    """Default block boundaries: a new block at every resolution-reducing layer, and the head.

    Parameters
    ----------
    layers : list of torch.nn.Module
        The teacher's layers (see :func:`teacher_layers`).
    head_index : int
        Index of the classifier head in ``layers``; it becomes its own last block.
    sample : torch.Tensor
        A small input batch of shape (N, C, H, W) used to trace the spatial resolutions; it is run
        in eval mode without gradients and the layers' training flags are restored afterwards.

    Returns
    -------
    list of int
        Start indices of blocks 1..N-1, suitable for :func:`split_layers`.

    Raises
    ------
    TeacherError
        ``head_index`` out of range, or a layer output without spatial dimensions.
    """
    if isinstance(head_index, bool) or not isinstance(head_index, int) or not 1 <= head_index < len(layers):
        raise TeacherError(
            f"head_index={head_index!r} must be an integer in 1..{len(layers) - 1} for {len(layers)} layers "
            f"(the head must be preceded by at least one layer)"
        )
    modules = [m for layer in layers[:head_index] for m in layer.modules()]
    training = [m.training for m in modules]
    boundaries: list[int] = []
    try:
        for module in modules:
            module.training = False
        with torch.no_grad():
            x = sample
            size = _spatial_size(x, "the sample")
            for index, layer in enumerate(layers[:head_index]):
                x = layer(x)
                new_size = _spatial_size(x, f"the output of layer {index} ({type(layer).__name__})")
                if index > 0 and new_size < size:
                    boundaries.append(index)
                size = new_size
    finally:
        for module, flag in zip(modules, training):
            module.training = flag
    boundaries.append(head_index)
    return boundaries


def split_layers(layers: list[nn.Module], boundaries: Sequence[int]) -> list[nn.Sequential]:
    """Split layers into consecutive blocks.

    Parameters
    ----------
    layers : list of torch.nn.Module
        The layers, in forward order.
    boundaries : sequence of int
        Start indices of blocks 1..N-1: strictly increasing integers in ``1..len(layers)-1``.
        An empty sequence gives a single block.

    Returns
    -------
    list of torch.nn.Sequential
        Block ``i`` is ``nn.Sequential(*layers[b_i:b_{i+1}])`` (with ``b_0 = 0`` and
        ``b_N = len(layers)``); the layers are shared, not copied.

    Raises
    ------
    TeacherError
        Invalid ``boundaries``.
    """
    layers = list(layers)
    bounds = list(boundaries)
    rule = (
        f"boundaries must be strictly increasing integers in 1..{len(layers) - 1} "
        f"(start indices of blocks 1..N-1 into the {len(layers)} teacher layers)"
    )
    if not layers:
        raise TeacherError("cannot split an empty list of layers; the teacher has no layers")
    bad_type = [b for b in bounds if isinstance(b, bool) or not isinstance(b, int)]
    if bad_type:
        raise TeacherError(f"invalid boundaries {bounds}: {bad_type} are not integers; {rule}")
    out_of_range = [b for b in bounds if not 1 <= b <= len(layers) - 1]
    if out_of_range:
        raise TeacherError(f"invalid boundaries {bounds}: {out_of_range} out of range; {rule}")
    if any(b >= c for b, c in zip(bounds, bounds[1:])):
        raise TeacherError(f"invalid boundaries {bounds}: not strictly increasing; {rule}")
    starts = [0] + bounds
    ends = bounds + [len(layers)]
    return [nn.Sequential(*layers[s:e]) for s, e in zip(starts, ends)]


def split_sequential(model: nn.Sequential, boundaries: Sequence[int]) -> list[nn.Sequential]:
    """Split a user's own ``nn.Sequential`` teacher into blocks.

    Parameters
    ----------
    model : torch.nn.Sequential
        The teacher; its children are the layers.
    boundaries : sequence of int
        Start indices of blocks 1..N-1 (see :func:`split_layers`).

    Returns
    -------
    list of torch.nn.Sequential
        The blocks, sharing the model's modules.

    Raises
    ------
    TeacherError
        ``model`` is not an ``nn.Sequential`` or ``boundaries`` are invalid.
    """
    if not isinstance(model, nn.Sequential):
        raise TeacherError(
            f"split_sequential needs an nn.Sequential, got {type(model).__name__}; "
            f"flatten your model with teacher_layers or wrap its layers in nn.Sequential"
        )
    return split_layers(list(model), boundaries)


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
    if arch not in _TORCHVISION_ARCHS:
        raise TeacherError(
            f"teacher arch {arch!r} has no torchvision weights (got weights={weights!r}); "
            f"torchvision weights exist for {', '.join(_TORCHVISION_ARCHS)}; use teacher.checkpoint instead"
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
    model: nn.Module, checkpoint: str | os.PathLike | None, weights: str | None, arch: str
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
    arch : str
        The teacher architecture, one of :data:`TEACHER_ARCHS`.

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
    _check_arch(arch)
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
        _logger.info("loaded %s teacher weights from %s", arch, path)
        return
    if weights is None:
        _logger.debug("no teacher weights given; %s keeps its random initialisation", arch)
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

def build_teacher_blocks(
    arch: str,
    num_classes: int,
    kwargs: dict | None = None,
    checkpoint: str | os.PathLike | None = None,
    weights: str | None = None,
    boundaries: Sequence[int] | None = None,
    sample: torch.Tensor | None = None,
) -> list[nn.Module]:
    """Build a teacher, load its weights and split it into frozen blocks.

    Parameters
    ----------
    arch, num_classes, kwargs
        See :func:`build_teacher_model`.
    checkpoint, weights
        See :func:`load_teacher_weights`.
    boundaries : sequence of int, optional
        Start indices of blocks 1..N-1 into :func:`teacher_layers`; default :func:`default_boundaries`.
    sample : torch.Tensor, optional
        Input batch for :func:`default_boundaries`; default zeros of shape (1, C, 64, 64) with C the
        model's input channels (``kwargs["in_channels"]`` for ``digits_cnn``, else 3).

    Returns
    -------
    list of torch.nn.Module
        The blocks (``nn.Sequential``), in eval mode with ``requires_grad`` False on every parameter;
        their composition equals the teacher's forward.

    Raises
    ------
    TeacherError, TeacherWeightsNotFoundError
        As raised by the functions above.
    """
    model = build_teacher_model(arch, num_classes, kwargs)
    load_teacher_weights(model, checkpoint, weights, arch)
    layers, head_index = teacher_layers(arch, model)
    if boundaries is None:
        if sample is None:
            channels = (kwargs or {}).get("in_channels", 3) if arch == "digits_cnn" else 3
            sample = torch.zeros(1, channels, 64, 64)
        boundaries = default_boundaries(layers, head_index, sample)
    blocks = split_layers(layers, boundaries)
    for block in blocks:
        block.eval()
        block.requires_grad_(False)
    _logger.info("%s teacher split into %d blocks at layer boundaries %s", arch, len(blocks), list(boundaries))
    return list(blocks)
