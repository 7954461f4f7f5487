"""The job an NNI evaluator or tuner holds: YAML path, plain data or ``Config`` -> validated ``Config`` (no torch import)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

from ..config import Config, ConfigError, load_config

__all__ = ["IF_EXISTS", "METHODS", "resolve_config", "structure_config"]

METHODS = ("dna", "donna")
"""Search methods of the NNI flows."""

IF_EXISTS = ("reuse", "overwrite", "error")
"""What the distillation does when ``library_dir`` already holds a finished library."""


def _merge(base: Dict[str, Any], changes: Mapping[str, Any], where: str = "") -> Dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value, f"{where}{key}.")
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def resolve_config(config: Union[str, os.PathLike, Mapping[str, Any], Config], base_dir: Optional[str] = None,
                   overrides: Optional[Mapping[str, Any]] = None) -> Config:
    """A validated :class:`~nni_pipebd.config.Config` from a YAML path, plain data or a ``Config``.

    Parameters
    ----------
    config : str, Path, dict or Config
        The job: a YAML file (relative paths inside resolve against its folder), the same as plain data, or a
        ``Config``.
    base_dir : str, optional
        For plain data: the folder its relative paths resolve against (default: the working directory).
    overrides : dict, optional
        Changes merged key by key into the config's sections, e.g. ``{"distill": {"epochs": 1}}``.

    Raises
    ------
    ConfigError
        An unknown key, a wrong type or a value out of range (the message names the key).
    """
    if isinstance(config, Config):
        raw, base = config.to_dict(), config.base_dir
    elif isinstance(config, (str, os.PathLike)):
        loaded = load_config(Path(config).expanduser().resolve())
        raw, base = loaded.to_dict(), loaded.base_dir
    elif isinstance(config, Mapping):
        raw, base = copy.deepcopy(dict(config)), base_dir or os.getcwd()
    else:
        raise ConfigError(f"config must be a YAML path, a dict or a Config; got {type(config).__name__}")
    if overrides:
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"overrides must be a dict of config sections, e.g. {{'distill': {{'epochs': 1}}}}; "
                              f"got {overrides!r}")
        raw = _merge(raw, overrides)
    return Config.from_dict(raw, Path(base).expanduser().resolve())


def structure_config(config: Config) -> Config:
    """``config`` with what only shapes need: no teacher weights, a two-sample synthetic data set of the same size
    (a ``data.class_path`` factory is kept: it is code, and only it knows its images' shape).

    The student space depends on the teacher's block shapes alone, so its labels and candidates can be derived
    where neither the teacher checkpoint nor the data set is reachable (an NNI tuner, a strategy process).
    """
    raw = config.to_dict()
    if raw["model"]["teacher"]["module"] is None:
        raw["model"]["teacher"].update(checkpoint=None, weights=None, train_if_missing=False, pretrained=False)
    if raw["data"]["class_path"] is None:  # a user's data factory is code: it is reachable, and only it knows shapes
        raw["data"].update(name="synthetic", root=None, num_samples=2, batch_size=2, num_workers=0)
    raw["execution"].update(plan=None, boundaries=None)
    return Config.from_dict(raw, config.base_dir)
