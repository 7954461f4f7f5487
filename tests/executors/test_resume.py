"""Checkpoints: an interrupted run resumed ends with weights bitwise-equal to an uninterrupted one."""

import json
import os

import pytest

from conftest import assert_same_blocks, tiny_config
from nni_pipebd.executors.checkpoint import CheckpointError, common_step, load_checkpoint
from nni_pipebd.executors.faults import ENV, InjectedFault
from nni_pipebd.executors.launch import WorkerError, train

pytestmark = pytest.mark.timeout(300)

CASES = [
    ("reference", 1),
    ("dp", 2),
    ("pipebd", 2),
]


def config(tmp_path, executor, workers):
    return tiny_config(tmp_path, distill={"epochs": 2, "max_steps_per_epoch": 3},
                       execution={"executor": executor, "workers": workers, "checkpoint_every": 2})


@pytest.mark.parametrize("executor,workers", CASES)
@pytest.mark.slow
def test_resume_mid_epoch_is_bitwise(tmp_path, monkeypatch, executor, workers):
    whole = train(config(tmp_path, executor, workers), tmp_path / "whole")
    run = tmp_path / "run"
    monkeypatch.setenv(ENV, f"rank={workers - 1},step=4")   # mid epoch 2 (3 steps per epoch); dp: block 1
    with pytest.raises((InjectedFault, WorkerError), match="injected fault at rank"):
        train(config(tmp_path, executor, workers), run)
    assert not (run / "library.json").exists()
    assert any(name.endswith(".pt") for name in os.listdir(run / "checkpoints"))
    monkeypatch.delenv(ENV)
    resumed = train(config(tmp_path, executor, workers), run, resume=True)
    assert_same_blocks(tmp_path / "whole", run, 5, exact=True)
    assert [b["losses"] for b in resumed["blocks"]] == [b["losses"] for b in whole["blocks"]]
    assert resumed["counters"] == whole["counters"]
    assert not (run / "checkpoints").exists()


def test_resume_refuses_changed_config_and_missing_checkpoints(tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv(ENV, "rank=0,step=3")
    with pytest.raises(InjectedFault):
        train(config(tmp_path, "reference", 1), run)
    monkeypatch.delenv(ENV)
    changed = tiny_config(tmp_path, distill={"epochs": 2, "max_steps_per_epoch": 3, "lr": 0.5},
                          execution={"checkpoint_every": 2})
    with pytest.raises(CheckpointError, match=r"changed config: distill\.lr \(0\.05 -> 0\.5\)"):
        train(changed, run, resume=True)
    saved = json.loads((run / "checkpoints" / "config.json").read_text())
    del saved["execution"]["grad_sync"]  # a run interrupted before the setting existed: it takes its default
    saved["distill"]["lr"] = 0.7
    (run / "checkpoints" / "config.json").write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match=r"changed config: distill\.lr \(0\.7 -> 0\.5\); resume"):
        train(changed, run, resume=True)
    with pytest.raises(FileExistsError, match="interrupted run"):
        train(config(tmp_path, "reference", 1), run)
    with pytest.raises(CheckpointError, match="holds no checkpoints"):
        train(config(tmp_path, "reference", 1), tmp_path / "fresh", resume=True)


def test_corrupt_checkpoint_is_named(tmp_path, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv(ENV, "rank=0,step=5")
    with pytest.raises(InjectedFault):
        train(config(tmp_path, "reference", 1), run)
    monkeypatch.delenv(ENV)
    latest = sorted((run / "checkpoints").glob("reference_step*.pt"))[-1]
    latest.write_bytes(latest.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{latest.name} cannot be read .* corrupt"):
        train(config(tmp_path, "reference", 1), run, resume=True)


# --- resume on a user's NNI block space (examples/custom/custom_space.py), trained as NNI one-shot supernets

from conftest import user_config  # noqa: E402

USER_SPACE = {"student": {"class_path": "custom_space:block_space"}}


def user_space_config(executor, workers):
    return user_config(model=USER_SPACE, distill={"epochs": 2, "max_steps_per_epoch": 3},
                       execution={"executor": executor, "workers": workers, "checkpoint_every": 2})


@pytest.mark.parametrize("executor,workers", [("reference", 1), ("pipebd", 2)])
@pytest.mark.slow
def test_resume_on_a_user_block_space_is_bitwise(tmp_path, monkeypatch, executor, workers):
    whole = train(user_space_config(executor, workers), tmp_path / "whole")
    run = tmp_path / "run"
    monkeypatch.setenv(ENV, f"rank={workers - 1},step=4")
    with pytest.raises((InjectedFault, WorkerError), match="injected fault at rank"):
        train(user_space_config(executor, workers), run)
    monkeypatch.delenv(ENV)
    resumed = train(user_space_config(executor, workers), run, resume=True)
    assert_same_blocks(tmp_path / "whole", run, 4, exact=True)
    assert [b["losses"] for b in resumed["blocks"]] == [b["losses"] for b in whole["blocks"]]


@pytest.mark.gpu
def test_fp16_resume_on_cuda_keeps_the_loss_scaler(tmp_path, monkeypatch):
    """The fp16 loss scaler is part of the checkpoint: a resumed run scales as the uninterrupted one did."""
    def fp16():
        return tiny_config(tmp_path, distill={"epochs": 2, "max_steps_per_epoch": 3},
                           execution={"device": "cuda", "precision": "fp16", "deterministic": True,
                                      "checkpoint_every": 2})

    whole = train(fp16(), tmp_path / "whole")
    run = tmp_path / "run"
    monkeypatch.setenv(ENV, "rank=0,step=4")
    with pytest.raises((InjectedFault, WorkerError), match="injected fault at rank"):
        train(fp16(), run)
    state = load_checkpoint(run, "rank0", common_step(run, ["rank0"]))
    scalers = [trainer["scaler"] for trainer in state["trainers"].values()]
    assert scalers and all(s is not None and s["scale"] > 0 for s in scalers)
    monkeypatch.delenv(ENV)
    resumed = train(fp16(), run, resume=True)
    assert_same_blocks(tmp_path / "whole", run, 5, exact=True)
    assert [b["losses"] for b in resumed["blocks"]] == [b["losses"] for b in whole["blocks"]]
