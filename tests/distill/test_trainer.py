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


def make(config, steps=20):
    torch.manual_seed(0)
    block = BlockSupernet(DnaBlock(0, BlockGeometry(4, 4, 1, 2), kernels=(3,), expansions=(2, 3)), 0)
    return BlockTrainer(0, block, config, steps)


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
