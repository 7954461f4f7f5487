import copy

import pytest
import torch
from torch import nn

from nni_pipebd.config import DistillConfig
from nni_pipebd.distill.loss import get_loss, mse, nmse
from nni_pipebd.distill.trainer import BlockTrainer, NonFiniteLossError
from nni_pipebd.spaces.dna import BlockGeometry, DnaBlock
from nni_pipebd.spaces.supernet import BlockSupernet


def test_losses_average_over_samples():
    s, t = torch.randn(6, 3, 2, 2), torch.randn(6, 3, 2, 2)
    for loss in (mse, nmse):  # a batch split in halves averages back exactly: executors rely on it
        torch.testing.assert_close(loss(s, t), (loss(s[:3], t[:3]) + loss(s[3:], t[3:])) / 2)
    torch.testing.assert_close(nmse(2 * t, t), torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"unknown loss 'kl'; valid: \['mse', 'nmse'\]"):
        get_loss("kl")


def make(config, steps=20, precision="fp32", device="cpu"):
    torch.manual_seed(0)
    block = BlockSupernet(DnaBlock(0, BlockGeometry(4, 4, 1, 2), kernels=(3,), expansions=(2, 3)), 0)
    return BlockTrainer(0, block.to(device), config, steps, precision)


def test_training_reduces_loss_and_samples_paths():
    torch.manual_seed(1)
    target_net = nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(16, 4, 6, 6)
    with torch.no_grad():
        y = target_net(x)
    trainer = make(DistillConfig(optimizer="adam", lr=0.02, paths_per_step=2), steps=60)
    losses = [trainer.step(x, y) for _ in range(60)]
    assert losses[-1] < 0.5 * losses[0]
    assert len(trainer.last_paths) == 2 and trainer.steps == 60
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine ran its course


def test_only_sampled_path_gets_gradients():
    trainer = make(DistillConfig(optimizer="sgd"))
    x = torch.randn(4, 4, 6, 6)
    trainer.forward_backward(x, torch.zeros_like(x))
    path = trainer.last_paths[0]
    with_grad = {name.split(".")[1] + "." + name.split(".")[2] for name, p in trainer.student.named_parameters()
                 if p.grad is not None}
    assert with_grad == {f"{i}.{path[f's0_i{i}']}" for i in range(2)}


def test_non_finite_loss_names_block_and_step():
    trainer = make(DistillConfig())
    x = torch.randn(4, 4, 6, 6)
    with pytest.raises(NonFiniteLossError, match="block 0: loss is nan at step 0"):
        trainer.step(x, torch.full_like(x, float("nan")))


def _target(seed=2):
    torch.manual_seed(seed)
    target_net = nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(16, 4, 6, 6)
    with torch.no_grad():
        return x, target_net(x)


def _flat(trainer):
    return torch.cat([p.detach().flatten() for p in trainer.student.parameters()])


def test_bf16_tracks_fp32_within_tolerance():
    """bf16 autocast changes the numbers, not the training: 5 SGD steps on the same paths. Measured here (seeds
    0-5): loss relative difference <= 8.9e-4, relative error of the whole weight update (||dw_bf16 - dw_fp32|| /
    ||dw_fp32||) <= 2.9e-2 (this seed: 8.9e-4 and 2.9e-2). Tolerances 5e-3 and 0.1 leave a margin of 5x and 3x."""
    x, y = _target()
    config = DistillConfig(optimizer="sgd", lr=0.05)
    fp32, bf16 = make(config), make(config, precision="bf16")
    start = _flat(fp32)
    losses = [(fp32.step(x, y), bf16.step(x, y)) for _ in range(5)]
    assert [p for p in fp32.last_paths] == [p for p in bf16.last_paths]
    for a, b in losses:
        assert b == pytest.approx(a, rel=5e-3)
    update32, update16 = _flat(fp32) - start, _flat(bf16) - start
    error = ((update16 - update32).norm() / update32.norm()).item()
    assert 1e-4 < error < 0.1, error  # autocast did run (not bitwise fp32), and it stayed close
    assert all(p.dtype == torch.float32 for p in bf16.student.parameters())  # fp32 master weights
    assert all(v.dtype == torch.float32 for v in bf16.optimizer.state_dict()["state"].get(0, {}).values()
               if isinstance(v, torch.Tensor))


def test_fp16_loss_scaler_skips_overflow_and_resumes_exactly():
    """The fp16 scaler (here on CPU autocast, which the trainer allows; the config asks for CUDA) skips a step whose
    scaled gradients overflow, halves its scale, and lives in full_state: a resumed trainer continues bitwise."""
    x, y = _target()
    config = DistillConfig(optimizer="sgd", lr=0.05)
    trainer = make(config, precision="fp16")
    assert trainer.scaler is not None and trainer.full_state()["scaler"]["scale"] == 2.0 ** 16
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 126)  # every scaled gradient overflows fp32
    before = _flat(trainer)
    trainer.step(x, y)
    assert torch.equal(_flat(trainer), before) and trainer.scaler.get_scale() == 2.0 ** 125
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=2)
    trainer.step(x, y)
    assert not torch.equal(_flat(trainer), before)
    state = copy.deepcopy(trainer.full_state())
    resumed = make(config, precision="fp16")
    resumed.load_full_state(state)
    assert resumed.scaler.get_scale() == trainer.scaler.get_scale() and state["scaler"]["_growth_tracker"] == 1
    for _ in range(3):  # the scale doubles after every second finite step, in both
        assert resumed.step(x, y) == trainer.step(x, y)
    assert resumed.scaler.get_scale() == trainer.scaler.get_scale() == 2.0 ** 10
    assert torch.equal(_flat(resumed), _flat(trainer))
    with pytest.raises(ValueError, match="block 0: the saved state has no fp16 loss scaler"):
        resumed.load_full_state(make(config).full_state())


def test_fp32_has_no_scaler_and_unknown_precision_is_named():
    assert make(DistillConfig()).full_state()["scaler"] is None
    with pytest.raises(ValueError, match=r"unknown precision 'fp8'; choose one of \['fp32', 'bf16', 'fp16', 'fp64'\]"):
        make(DistillConfig(), precision="fp8")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_amp_on_cuda_tracks_fp32(precision):
    """The CUDA autocast path (not measured on a GPU when written: the tolerances are the CPU test's, loosened 2x;
    the CUDA fp32 reference itself may use TF32)."""
    x, y = (t.cuda() for t in _target())
    config = DistillConfig(optimizer="sgd", lr=0.05)
    fp32, amp = make(config, device="cuda"), make(config, precision=precision, device="cuda")
    if precision == "fp16":
        assert amp.scaler is not None and amp.full_state()["scaler"]["scale"] == 2.0 ** 16
        amp.scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 8)  # no overflow: every step is applied
    else:
        assert amp.scaler is None
    start = _flat(fp32)
    for _ in range(5):
        a, b = fp32.step(x, y), amp.step(x, y)
        assert b == pytest.approx(a, rel=1e-2)
    error = ((_flat(amp) - start - (_flat(fp32) - start)).norm() / (_flat(fp32) - start).norm()).item()
    assert error < 0.2, error
    assert all(p.dtype == torch.float32 and p.is_cuda for p in amp.student.parameters())
