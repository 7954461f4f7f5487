"""DNA ranking: score every (or a seeded sample of every) block path by its distillation loss after BN recalibration."""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..distill.loss import get_loss
from ..library import atomic_save
from .costs import module_costs
from .inputs import RankingSettings
from .loaded import (LoadedLibrary, calib_batches, library_fingerprint, open_library, recalibrate_bn, relay,
                     resolve_device, val_batches)

__all__ = ["SCORES", "SCORES_FORMAT", "RankingSettings", "block_paths", "rank_library", "load_scores"]

_logger = logging.getLogger(__name__)

SCORES = "scores.json"
SCORES_FORMAT = "nni_pipebd.scores/1"


def block_paths(choices: Mapping[str, Sequence[str]], max_paths: int, seed: int,
                index: int) -> Tuple[List[Dict[str, Any]], int, bool]:
    """The paths of one block to score.

    Returns
    -------
    paths : list of dict
        Every path (in ``itertools.product`` order of the labels) when there are at most ``max_paths``, else
        ``max_paths`` distinct uniformly drawn paths (draw order), seeded by ``(seed, index)``.
    total : int
        How many paths the block has (1 for a block without choices: the empty path).
    exhaustive : bool
        Whether ``paths`` holds all of them.
    """
    labels = list(choices)
    total = math.prod(len(choices[label]) for label in labels)
    if total <= max_paths:
        return [dict(zip(labels, names)) for names in itertools.product(*(choices[l] for l in labels))], total, True
    rng = np.random.default_rng([seed, index])
    seen, paths = set(), []
    while len(paths) < max_paths:
        picks = tuple(int(rng.integers(len(choices[label]))) for label in labels)  # indices: values may be lists
        if picks not in seen:
            seen.add(picks)
            paths.append({label: choices[label][i] for label, i in zip(labels, picks)})
    return paths, total, False


def load_scores(directory: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """``scores.json`` of a library folder, or ``None`` when absent or unreadable."""
    path = Path(directory) / SCORES
    if not path.is_file():
        return None
    try:
        scores = json.loads(path.read_text())
    except json.JSONDecodeError:
        _logger.warning("%s is not valid JSON; it will be recomputed", path)
        return None
    return scores if scores.get("format") == SCORES_FORMAT else None


def rank_library(directory: Union[str, Path], settings: RankingSettings = RankingSettings(), *, force: bool = False,
                 device: str = "cpu", library: Optional[LoadedLibrary] = None) -> Dict[str, Any]:
    """Score the paths of every block of a library and write ``scores.json`` into it (atomically).

    For block ``i`` the teacher relays the validation batches (inputs x_i, targets T_i(x_i)) and
    ``calib_batches`` training batches. Each scored path gets fresh BatchNorm statistics from the calibration
    inputs, then, in eval mode: ``loss`` (the library's distillation loss, averaged over validation samples) and
    ``nsr`` (noise-to-signal ratio ``sum ||S - T||^2 / sum ||T||^2`` over the validation set, DONNA's block
    quality metric), plus its costs ``params``, ``flops`` (MACs of one sample) and ``latency_ms`` (CPU, batch
    1, median). Blocks without choices (the head, fixed blocks) get one entry with the empty path.

    Parameters
    ----------
    directory : str or Path
        The library folder.
    settings : RankingSettings
        Path sampling, data and latency settings.
    force : bool
        Recompute even when ``scores.json`` has the same settings and block files.
    device : str
        Where losses are computed (``cpu``, ``cuda``, ``auto``); latency is always measured on CPU.
    library : LoadedLibrary, optional
        The opened library, when the caller has it already (its weights are not modified).

    Returns
    -------
    dict
        The content of ``scores.json``: ``settings``, ``fingerprint``, ``loss`` and ``blocks`` (per block:
        ``index``, ``labels``, ``num_paths``, ``scored``, ``exhaustive``, ``paths``: list of ``{path, loss,
        nsr, params, flops, latency_ms}``).
    """
    directory = Path(directory)
    library = library or open_library(directory)
    fingerprint = library_fingerprint(directory, library.num_blocks)
    wanted = asdict(settings)
    cached = None if force else load_scores(directory)
    if cached is not None and cached.get("settings") == wanted and cached.get("fingerprint") == fingerprint:
        _logger.info("reusing %s (same settings and block files)", directory / SCORES)
        return cached
    start = time.perf_counter()
    dev = resolve_device(device)
    config, job = library.config, library.job
    loss_fn = get_loss(config.distill.loss)
    val_set = library.val_dataset()
    batch = config.data.batch_size
    val = val_batches(val_set, batch, settings.val_batches)
    calib = calib_batches(job.dataset, batch, settings.seed, settings.calib_batches)
    calib_relay = relay(job.spec.teacher, job.dataset, calib, dev)
    blocks = []
    for (i, inputs, targets), (_, calib_inputs, _) in zip(relay(job.spec.teacher, val_set, val, dev), calib_relay):
        block = copy.deepcopy(job.spec.student[i]).cpu()
        choices = getattr(block, "choices", {})
        paths, total, exhaustive = block_paths(choices, settings.max_paths, settings.seed, i)
        shape_in = job.spec.shapes[i][0]
        entries = []
        for path in paths:
            if choices:
                block.set_path(path)
            entries.append({"path": path, **module_costs(block, shape_in, settings.latency_runs)})
        block.to(dev)
        for entry in entries:
            if choices:
                block.set_path(entry["path"])
            recalibrate_bn(block, calib_inputs)
            entry["loss"], entry["nsr"] = _score(block, inputs, targets, loss_fn)
        _logger.info("block %d: scored %d of %d paths%s; loss %.4g..%.4g", i, len(entries), total,
                     " (all)" if exhaustive else f" (seeded sample, seed {settings.seed})",
                     min(e["loss"] for e in entries), max(e["loss"] for e in entries))
        blocks.append({"index": i, "labels": list(choices), "num_paths": total, "scored": len(entries),
                       "exhaustive": exhaustive,
                       "paths": [{key: entry[key] for key in ("path", "loss", "nsr", "params", "flops", "latency_ms")}
                                 for entry in entries]})
    scores = {
        "format": SCORES_FORMAT,
        "settings": wanted,
        "fingerprint": fingerprint,
        "loss": config.distill.loss,
        "val_samples": int(sum(len(b) for b in val)),
        "calib_samples": int(sum(len(b) for b in calib)),
        "latency_threads": 1,
        "threads": torch.get_num_threads(),
        "time_s": time.perf_counter() - start,
        "blocks": blocks,
    }
    atomic_save(scores, directory / SCORES)
    _logger.info("wrote %s (%.1f s)", directory / SCORES, scores["time_s"])
    return scores


@torch.no_grad()
def _score(block: torch.nn.Module, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
           loss_fn) -> Tuple[float, float]:
    loss_sum = err_sum = power_sum = 0.0
    count = 0
    for x, y in zip(inputs, targets):
        out = block(x)
        loss_sum += float(loss_fn(out, y)) * len(x)
        count += len(x)
        err_sum += float((out - y).double().pow(2).sum())
        power_sum += float(y.double().pow(2).sum())
    loss = loss_sum / max(count, 1)
    nsr = err_sum / max(power_sum, 1e-30)
    if not (math.isfinite(loss) and math.isfinite(nsr)):
        raise RuntimeError(f"path {getattr(block, 'path', {})} gives a non-finite score (loss {loss}, nsr {nsr}); "
                           "the library's block weights are broken — train it again")
    return loss, nsr
