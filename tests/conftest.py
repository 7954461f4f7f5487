"""Shared fixtures: tiny jobs that run in seconds on CPU."""

from pathlib import Path

import pytest
import torch

from nni_pipebd.config import Config


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


def pytest_runtest_setup(item):
    """``@pytest.mark.gpu`` (``devices=n``: at least n GPUs) skips cleanly where CUDA or the GPUs are missing."""
    marker = item.get_closest_marker("gpu")
    if marker is None:
        return
    needed = marker.kwargs.get("devices", 1)
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (marked gpu)")
    if torch.cuda.device_count() < needed:
        pytest.skip(f"needs {needed} GPUs, {torch.cuda.device_count()} visible (marked gpu)")


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
