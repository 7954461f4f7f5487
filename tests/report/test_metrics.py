"""Live metrics: every step's block losses in the library's logs, each epoch's losses reported while training runs."""

import pytest

from conftest import tiny_config
from nni_pipebd.executors.launch import train
from nni_pipebd.report.metrics import read_step_losses
from nni_pipebd.report.report import write_report

pytestmark = pytest.mark.timeout(240)


@pytest.mark.parametrize("execution", [{"executor": "reference", "workers": 1},
                                       {"executor": "pipebd", "workers": 2}])
@pytest.mark.slow
def test_epochs_reach_the_caller_while_training_runs_and_steps_are_logged(tmp_path, monkeypatch, execution):
    from nni_pipebd.executors.faults import ENV

    monkeypatch.setenv(ENV, "rank=0,step=0,kind=slow,seconds=0.4")  # about 1.2 s per epoch: the lead sees each end
    out = tmp_path / "run"
    calls = []

    def on_epoch(epoch, losses):
        calls.append((epoch, dict(losses), (out / "library.json").exists()))

    manifest = train(tiny_config(tmp_path, distill={"epochs": 3}, execution=execution), out, on_epoch=on_epoch)
    assert [epoch for epoch, _, _ in calls] == [1, 2, 3]
    assert not calls[0][2]  # the first epoch arrived before the library was written
    for epoch, losses, _ in calls:
        assert losses == {b["index"]: b["losses"][epoch - 1] for b in manifest["blocks"]}
    curves = read_step_losses(out)
    assert sorted(curves) == list(range(5))
    for block in manifest["blocks"]:
        points = curves[block["index"]]
        assert [s for s, _ in points] == list(range(1, block["steps"] + 1))
        first_epoch = [v for _, v in points[:3]]  # 3 steps per epoch
        assert sum(first_epoch) / 3 == pytest.approx(block["losses"][0], rel=1e-6)
    report = write_report(out)
    assert "step_losses.png" in report.read_text() and (report.parent / "step_losses.png").stat().st_size > 0


@pytest.mark.slow
def test_resumed_run_keeps_the_steps_before_the_stop(tmp_path, monkeypatch):
    from nni_pipebd.executors.faults import ENV, InjectedFault
    from nni_pipebd.executors.launch import WorkerError

    config = tiny_config(tmp_path, distill={"epochs": 2}, execution={"executor": "pipebd", "workers": 2,
                                                                     "checkpoint_every": 1})
    monkeypatch.setenv(ENV, "rank=1,step=4")
    with pytest.raises((InjectedFault, WorkerError)):
        train(config, tmp_path / "run")
    monkeypatch.delenv(ENV)
    manifest = train(config, tmp_path / "run", resume=True)
    curves = read_step_losses(tmp_path / "run")
    for block in manifest["blocks"]:  # every step once, whether logged before or after the stop
        assert sorted({s for s, _ in curves[block["index"]]}) == list(range(1, block["steps"] + 1))
