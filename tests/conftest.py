"""Shared fixtures: tiny jobs that run in seconds on CPU."""

import subprocess
from multiprocessing.process import BaseProcess
from pathlib import Path

import pytest
import torch

from nni_pipebd.config import Config

# One intra-op thread in the test process: on a 2-core machine that also runs worker processes, two threads per
# process oversubscribe the cores and a tiny convolution waits for a time slice (62 ms instead of 0.7 ms, measured).
# Runs set their own threads (execution.threads_per_worker, or the cores shared by the workers: worker_threads).
torch.set_num_threads(1)


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# A user's own teacher and data (examples/custom, imported by class_path from the config's folder), made tiny.
USER_JOB = {
    "model": {"teacher": {"arch": None, "kwargs": {}, "class_path": "custom_teacher:build",
                          "init_args": {"num_classes": 10, "in_channels": 1, "width": 4}}},
    "data": {"name": None, "class_path": "custom_data:digits", "init_args": {"size": 16}},
}


def user_config(**sections) -> Config:
    """:func:`tiny_config` with the user teacher and data of ``examples/custom`` (the config's folder)."""
    merged = {key: dict(value) for key, value in USER_JOB.items()}
    for section, values in sections.items():
        merged[section] = {**merged.get(section, {}), **values}
    return tiny_config(EXAMPLES / "custom", **merged)


def tiny_config(tmp_path=None, **sections) -> Config:
    """A small synthetic job: digits_cnn teacher (random weights), 16x16 synthetic data, DNA student."""
    raw = {
        "model": {"teacher": {"arch": "digits_cnn", "num_classes": 10, "kwargs": {"width": 4}, "pretrained": False},
                  "student": {"kind": "dna", "kernels": [3, 5], "expansions": [2]}},
        "data": {"name": "synthetic", "image_size": 16, "channels": 3, "batch_size": 8, "num_samples": 32},
        "distill": {"optimizer": "sgd", "lr": 0.05, "epochs": 1, "max_steps_per_epoch": 3, "seed": 3},
        "execution": {"threads_per_worker": 1, "timeout_s": 60},
    }
    for section, values in sections.items():
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(raw[section].get(key), dict):
                raw[section][key] = {**raw[section][key], **value}
            else:
                raw[section][key] = value
    return Config.from_dict(raw, tmp_path or ".")


_STARTED: list = []
"""What the test running now started (its fixtures included, whatever their scope): see the hooks below."""


def pytest_configure(config):
    """Record every process this session starts (multiprocessing's and subprocess's), for the quick tier's guard."""
    start, popen = BaseProcess.start, subprocess.Popen.__init__

    def recorded_start(self, *args, **kwargs):
        _STARTED.append(f"a {type(self).__name__} running {getattr(self, '_target', None)!r}")
        return start(self, *args, **kwargs)

    def recorded_popen(self, args, *rest, **kwargs):
        _STARTED.append(f"the subprocess {str(args)[:120]}")
        return popen(self, args, *rest, **kwargs)

    BaseProcess.start, subprocess.Popen.__init__ = recorded_start, recorded_popen


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    """The quick tier (``pytest -m "not slow"``) stays quick: a test that starts a process (workers, the CLI, NNI,
    torchrun), itself or through a fixture of any scope, is marked ``slow``; one that is not fails here, naming
    what it started."""
    yield
    started, _STARTED[:] = list(_STARTED), []
    if started and item.get_closest_marker("slow") is None:
        pytest.fail(f"{item.nodeid} started {started[0]} (and {len(started) - 1} more) but is not marked slow: mark "
                    "it @pytest.mark.slow (pytest -m 'not slow' is the quick loop)", pytrace=False)


def pytest_runtest_setup(item):
    """``@pytest.mark.gpu`` (``devices=n``: at least n GPUs) skips cleanly where CUDA or the GPUs are missing;
    processes started from here on (fixtures included) count for ``item`` (:func:`pytest_runtest_teardown`)."""
    _STARTED.clear()
    marker = item.get_closest_marker("gpu")
    if marker is None:
        return
    needed = marker.kwargs.get("devices", 1)
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (marked gpu)")
    if torch.cuda.device_count() < needed:
        pytest.skip(f"needs {needed} GPUs, {torch.cuda.device_count()} visible (marked gpu)")


_FORKSERVER = "multiprocessing.forkserver import main"


def is_worker(proc) -> bool:
    """Whether ``proc`` (a ``psutil.Process``) is a worker process: spawned, or forked by the workers' fork server
    (not the server itself, nor multiprocessing's resource tracker)."""
    import psutil

    try:
        command = " ".join(proc.cmdline())
        if "spawn_main" in command:
            return True
        parent = proc.parent()
        return _FORKSERVER in command and parent is not None and _FORKSERVER in " ".join(parent.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


@pytest.fixture
def tiny():
    return tiny_config


def load_blocks(directory, n):
    return [torch.load(f"{directory}/block_{i}.pt") for i in range(n)]


FP64 = {"precision": "fp64"}
"""``execution`` of both sides of a comparison where a batch is split (or paths are shared) over devices. In float64
the summation order moved no weight by more than 7.7e-14 (the torchvision job; 2e-16 on the tiny ones), in float32 by
up to 1.7e-3 (0.26 relative): training amplifies rounding, so a float32 tolerance measured chaos, not correctness."""
FP64_CLOSE = {"exact": False, "rtol": 1e-9, "atol": 1e-11}
""":func:`assert_same_blocks` tolerances for float64 runs: over a hundred times the largest difference measured. Real
bugs fail them, named by block and weight: BatchNorm left unsynchronised in one data-parallel group (its first weight
off by 5e-9 to 7e-2), one rank's gradient off by a factor 1 + 1e-6 (1.7e-11 to 2.7e-8; float32's rtol 1e-4, atol 1e-5
let that pass)."""


def assert_same_blocks(a_dir, b_dir, n, exact=True, **tolerances):
    for i, (a, b) in enumerate(zip(load_blocks(a_dir, n), load_blocks(b_dir, n))):
        assert a.keys() == b.keys(), f"block {i}: different keys"
        for key in a:
            if exact:
                assert torch.equal(a[key], b[key]), f"block {i} {key}: not bitwise equal"
            else:
                torch.testing.assert_close(a[key], b[key], msg=lambda m, i=i, key=key: f"block {i} {key}: {m}",
                                           **tolerances)


def train_one_step(block, x, path, lr=0.1):
    """Run ``block`` on ``path`` and apply one plain SGD step of ``mean(out ** 2)``, leaving it in eval mode."""
    block.train()
    block.set_path(path)
    block(x).pow(2).mean().backward()
    with torch.no_grad():
        for p in block.parameters():
            if p.grad is not None:
                p.sub_(lr * p.grad)
    block.eval()
