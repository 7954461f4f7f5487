"""Fitting a classifier under Lightning: same seed, same result; quiet; logs and checkpoints; caller's state kept."""

import csv
import os
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from nni_pipebd.lightning import (ClassificationData, ClassifierModule, DivergedError, TrainerOptions, fit_classifier,
                                  validate_classifier)


def _data(seed=0):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 1, 4, 4, generator=g), torch.randint(0, 3, (48,), generator=g)
    return ClassificationData(TensorDataset(x[:32], y[:32]), TensorDataset(x[32:], y[32:]), 8, seed=seed,
                              max_steps_per_epoch=3)


def _net():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.2),
                             nn.Linear(16, 3))


def _fit(tmp_path, name, **kwargs):
    net, data = _net(), _data()
    module = ClassifierModule(net, lr=0.05, total_steps=2 * data.steps_per_epoch, **kwargs)
    return net, module, fit_classifier(module, data, epochs=2, seed=5, log_dir=tmp_path, name=name)


def test_same_seed_same_weights_and_accuracy_and_no_trace_left(tmp_path, capfd):
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    deterministic = torch.are_deterministic_algorithms_enabled()
    net_a, _, a = _fit(tmp_path, "a")
    net_b, _, b = _fit(tmp_path, "b")
    assert a.train_losses == b.train_losses and len(a.train_losses) == 2
    assert a.val_accuracies == b.val_accuracies and all(0 <= v <= 1 for v in a.val_accuracies)
    assert all(torch.equal(x, y) for x, y in zip(net_a.state_dict().values(), net_b.state_dict().values()))
    assert a.val_accuracy == validate_classifier(net_a, _data()) == a.val_accuracies[-1]
    # the caller's random states, flags and environment are as before
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    assert torch.are_deterministic_algorithms_enabled() == deterministic and "PL_GLOBAL_SEED" not in os.environ
    # CSV logs per epoch and the last epoch's checkpoint; nothing of Lightning's chatter on the console
    rows = list(csv.DictReader(open(os.path.join(a.log_dir, "metrics.csv"))))
    assert [float(r["train_loss"]) for r in rows if r["train_loss"]] == pytest.approx(a.train_losses)
    assert [float(r["val_acc"]) for r in rows if r["val_acc"]] == pytest.approx(a.val_accuracies)
    assert [p.name for p in (tmp_path / "a" / "version_0" / "checkpoints").iterdir()] == ["epoch=1-step=6.ckpt"]
    out, err = capfd.readouterr()
    assert "GPU available" not in out + err and "LOCAL_RANK" not in out + err and "Warning" not in out + err


def test_distillation_keeps_the_teacher_frozen_and_out_of_checkpoints(tmp_path):
    teacher = _net().eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    _, _, result = _fit(tmp_path, "kd", teacher=teacher, kd_weight=0.5, temperature=2.0)
    assert not teacher.training and all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    checkpoint = torch.load(next((tmp_path / "kd").rglob("*.ckpt")), weights_only=False)
    assert checkpoint["state_dict"] and not any(k.startswith("teacher.") for k in checkpoint["state_dict"])
    assert checkpoint["state_dict"]["_extra_state"]["train_losses"] == result.train_losses


def test_non_finite_loss_stops_with_the_step_and_a_hint():
    net = _net()
    with torch.no_grad():
        net[-1].weight.fill_(float("nan"))
    with pytest.raises(DivergedError, match=r"loss is nan at epoch 0, step 0; lower the learning rate \(lr = 0\.001\)"):
        fit_classifier(ClassifierModule(net), _data(), epochs=1)


def test_options_name_the_bad_value():
    with pytest.raises(ValueError, match=r"precision = 'fp8' is not valid; choose one of \['32-true'"):
        TrainerOptions(precision="fp8")
    with pytest.raises(ValueError, match="devices = 0 must be an int >= 1"):
        TrainerOptions(devices=0)
    with pytest.raises(ValueError, match=r"accelerator = 'tpu' is not valid; choose one of \['cpu', 'gpu'\]"):
        TrainerOptions(accelerator="tpu")
    assert TrainerOptions.for_device("cpu", precision="bf16-mixed") == TrainerOptions("cpu", 1, "bf16-mixed")
    if not torch.cuda.is_available():
        assert TrainerOptions.for_device("auto").accelerator == "cpu"
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            TrainerOptions.for_device("cuda")


def test_precision_is_passed_through(tmp_path):
    net, data = _net(), _data()
    module = ClassifierModule(net, teacher=_net(), total_steps=data.steps_per_epoch)
    result = fit_classifier(module, data, TrainerOptions(precision="bf16-mixed"), epochs=1, log_dir=tmp_path)
    logged = (tmp_path / "fit" / "version_0" / "metrics.csv").read_text()
    assert len(result.train_losses) == 1 and "train_loss" in logged
    assert module.trainer.precision == "bf16-mixed"  # CPU autocast to bfloat16
