"""NasExperiment with BlockwiseDNA / BlockwiseDONNA: in-process (sequential engine) and on NNI's training service."""

import pytest
import torch

from nni.nas.execution import SequentialExecutionEngine
from nni.nas.experiment import NasExperiment, NasExperimentConfig
from nni.nas.space import ModelStatus, RawFormatModelSpace

from conftest import tiny_config, user_config
from nni_helpers import RANKING, assert_released, free_port, isolate_nni, tiny_evaluator
from nni_pipebd.nni import (ArchitectureModel, BlockwiseDistillation, BlockwiseDNA, BlockwiseDONNA,
                            BudgetExhaustedError, SpaceMismatchError)
from nni_pipebd.nni.compat import json_comments_patched, unpatch_json_comments


def _sequential(tmp_path):
    config = NasExperimentConfig("sequential", "raw")
    config.experiment_working_directory = str(tmp_path / "experiments")
    return config


def _run(experiment, port=None):
    try:
        if port is None:
            experiment.run()
        else:
            experiment.run(port=port)
        return experiment.export_top_models(top_k=5, formatter="dict"), list(experiment.export_top_models(top_k=5))
    finally:
        experiment.stop()


def _check_exported(samples, models, space, top_k, channels=3):
    assert 1 <= len(samples) <= top_k and samples == [m.sample for m in models]
    metrics = [m.metric for m in models]
    assert metrics == sorted(metrics, reverse=True) and all(0.0 <= m <= 1.0 for m in metrics)
    x = torch.randn(3, channels, 16, 16)
    for sample, model in zip(samples, models):
        assert isinstance(model, ArchitectureModel) and model.status == ModelStatus.Trained
        assert len(model.metrics.intermediates) == 1  # one finetuning epoch
        net = space.freeze(sample)
        assert net(x).shape == (3, 10)
        assert model.executable_model()(x).shape == (3, 10)


@pytest.mark.timeout(300)
@pytest.mark.slow  # runs long (over a second here)
def test_dna_in_process(tmp_path, monkeypatch):
    isolate_nni(tmp_path, monkeypatch)
    evaluator = tiny_evaluator(tmp_path)
    space = evaluator.student_space()
    strategy = BlockwiseDNA("params=1M", top_k=2, ranking=RANKING)
    samples, models = _run(NasExperiment(space, evaluator, strategy, _sequential(tmp_path)))
    _check_exported(samples, models, space, 2)
    assert len(samples) == 2 and strategy.phase == "done"
    assert (evaluator.library_dir / "library.json").is_file() and (evaluator.library_dir / "nni_search.json").is_file()
    assert [m.search["score"] for m in models] != []

    resumed = BlockwiseDNA("params=1M", top_k=2, ranking=RANKING)
    engine = SequentialExecutionEngine()
    resumed.initialize(RawFormatModelSpace(space, evaluator), engine)
    resumed.load_state_dict(strategy.state_dict())
    stamp = (evaluator.library_dir / "block_0.pt").stat().st_mtime_ns
    resumed.run()
    assert list(engine.list_models()) == []  # nothing left to distil or evaluate
    assert [m.sample for m in resumed.list_models()] == samples
    assert (evaluator.library_dir / "block_0.pt").stat().st_mtime_ns == stamp


@pytest.mark.timeout(300)
@pytest.mark.slow  # runs long (over a second here)
def test_donna_in_process_with_user_teacher_data_and_space(tmp_path, monkeypatch):
    isolate_nni(tmp_path, monkeypatch)
    # examples/custom: the user's teacher, data and NNI block space (LayerChoice, Repeat from depth 0, width choice)
    evaluator = tiny_evaluator(tmp_path, user_config(model={"student": {"class_path": "custom_space:block_space"}}))
    space = evaluator.student_space()
    strategy = BlockwiseDONNA("params=1M", top_k=2, predictor_archs=3, ranking=RANKING, population=8, generations=3)
    samples, models = _run(NasExperiment(space, evaluator, strategy, _sequential(tmp_path)))
    _check_exported(samples, models, space, 2, channels=1)
    assert all("predicted_accuracy" in m.search for m in models)
    state = strategy.state_dict()
    assert len(state["predictor"]["accuracies"]) == 3 and state["phase"] == "done"
    assert sum(m["role"] == "predictor" for m in state["models"]) == 3


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dna_in_process_with_input_choices_and_expressions(tmp_path, monkeypatch):
    """examples/custom/cell_space.py through NasExperiment: samples carry an InputChoice's list of inputs, NNI's
    freeze of the space takes them, and the exported models run."""
    isolate_nni(tmp_path, monkeypatch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a loaded 2-core machine wait on each other (98 s here, not 30)
    try:
        evaluator = tiny_evaluator(tmp_path, user_config(model={"student": {"class_path": "cell_space:block_space"}}))
        space = evaluator.student_space()
        strategy = BlockwiseDNA("params=1M", top_k=2, ranking=RANKING)
        samples, models = _run(NasExperiment(space, evaluator, strategy, _sequential(tmp_path)))
        _check_exported(samples, models, space, 2, channels=1)
    finally:
        torch.set_num_threads(threads)
    assert all(len(s["c0_first"]) == 1 and len(s["c1_pair"]) == 2 for s in samples)


@pytest.mark.timeout(300)
@pytest.mark.slow  # runs long (over a second here)
def test_nni_random_strategy_evaluates_from_the_library(tmp_path, monkeypatch):
    from nni.nas.strategy import Random

    isolate_nni(tmp_path, monkeypatch)
    evaluator = tiny_evaluator(tmp_path)
    evaluator.distill()
    config = _sequential(tmp_path)
    config.max_trial_number = 2
    space = evaluator.student_space()
    experiment = NasExperiment(space, evaluator, Random(dedup=True), config)
    try:
        experiment.run()
        models = experiment.export_top_models(top_k=2)
    finally:
        experiment.stop()
    assert len(models) == 2 and all(0.0 <= m.metric <= 1.0 for m in models)
    assert space.freeze(models[0].sample)(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_space_and_budget_are_checked(tmp_path):
    evaluator = tiny_evaluator(tmp_path)
    other = BlockwiseDistillation(tiny_config(tmp_path, model={"student": {"kernels": [3, 7]}}), str(tmp_path / "x"))
    with pytest.raises(SpaceMismatchError, match=r"s0_i0: candidates \['k3e2', 'k7e2'\]"):
        BlockwiseDNA("params=1M").initialize(RawFormatModelSpace(other.student_space(), evaluator),
                                             SequentialExecutionEngine())
    with pytest.raises(TypeError, match="BlockwiseDistillation"):
        BlockwiseDNA("params=1M").initialize(RawFormatModelSpace(evaluator.student_space(), None),
                                             SequentialExecutionEngine())
    with pytest.raises(BudgetExhaustedError, match="raise it to 6"):
        BlockwiseDONNA("params=1M", top_k=2, predictor_archs=3).initialize(
            RawFormatModelSpace(evaluator.student_space(), evaluator), SequentialExecutionEngine(max_model_count=5))
    with pytest.raises(ValueError, match="budget"):
        BlockwiseDNA("params=lots")


@pytest.mark.timeout(420)
@pytest.mark.slow
def test_dna_on_the_training_service(tmp_path, monkeypatch):
    """The default NasExperiment config: NNI manager, local training service, trials in their own processes."""
    isolate_nni(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    unpatch_json_comments()
    evaluator = tiny_evaluator(tmp_path)
    space = evaluator.student_space()
    experiment = NasExperiment(space, evaluator, BlockwiseDNA("params=1M", top_k=2, ranking=RANKING))
    experiment.config.experiment_working_directory = str(tmp_path / "experiments")
    experiment.config.trial_concurrency = 2
    port = free_port()
    try:
        experiment.run(port=port)
        trials = experiment.list_trial_jobs()
        samples = experiment.export_top_models(top_k=5, formatter="dict")
        models = list(experiment.export_top_models(top_k=5))
    finally:
        experiment.stop()
    assert_released(port)
    assert json_comments_patched()  # the strategy patched the loader for the websocket channel
    assert len(trials) == 3 and all(t.status == "SUCCEEDED" for t in trials)
    _check_exported(samples, models, space, 2)
    assert len(samples) == 2


_CTRL_C_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from conftest import tiny_config
from nni.nas.experiment import NasExperiment
from nni_pipebd.nni import BlockwiseDistillation, BlockwiseDNA

config = tiny_config({root!r}, distill={{"epochs": 4, "max_steps_per_epoch": 6}},
                     execution={{"executor": "pipebd", "workers": 2}})
evaluator = BlockwiseDistillation(config, {lib!r}, finetune={{"epochs": 1, "max_steps_per_epoch": 1}})
experiment = NasExperiment(evaluator.student_space(), evaluator, BlockwiseDNA("params=1M", top_k=1))
experiment.config.experiment_working_directory = {experiments!r}
experiment.run(port={port})
print("run returned", flush=True)
"""


@pytest.mark.timeout(300)
@pytest.mark.slow
def test_ctrl_c_stops_the_experiment_its_trial_and_workers(tmp_path):
    """Ctrl-C (SIGINT to the foreground process group) during distillation on NNI's training service: the
    experiment stops (NNI manager gone, port free) and no process of the run is left — trial and workers included.
    Rank 0 waits before its second step for a file the test writes once the run's lead has taken the signal (its
    stop file is there) or the run is gone: the run cannot end before the signal, whatever the load."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import uuid
    from pathlib import Path

    import psutil

    from conftest import is_worker
    from nni_pipebd.executors.faults import ENV
    from nni_pipebd.executors.stopping import STOP_FILE

    port, mark, go = free_port(), uuid.uuid4().hex, tmp_path / "signalled"
    script = tmp_path / "run_nas.py"
    script.write_text(_CTRL_C_SCRIPT.format(tests=str(Path(__file__).resolve().parents[1]), root=str(tmp_path),
                                            lib=str(tmp_path / "lib"), experiments=str(tmp_path / "experiments"),
                                            port=port))
    (tmp_path / "home" / "nni-experiments").mkdir(parents=True)
    temp = tmp_path / "tmp"  # where the lead's spawn rendezvous (and its stop file) go
    temp.mkdir()
    env = {**os.environ, "HOME": str(tmp_path / "home"), "NNI_CONFIG_DIR": str(tmp_path / "nni-config"),
           "TMPDIR": str(temp),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "PYTHONWARNINGS": "ignore",
           ENV: f"rank=0,step=1,kind=wait,file={go}", "NNI_PIPEBD_TEST_MARK": mark}

    def workers():
        return sum(map(is_worker, of_the_run()))

    def of_the_run():
        found = []
        for proc in psutil.process_iter(["pid", "status"]):
            try:
                if proc.info["status"] != psutil.STATUS_ZOMBIE and proc.environ().get("NNI_PIPEBD_TEST_MARK") == mark:
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return found

    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and workers() < 2:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            time.sleep(0.5)
        assert time.monotonic() < deadline, "the distillation workers did not start"
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        deadline = time.monotonic() + 60
        while not list(temp.glob(f"*/{STOP_FILE}")) and workers() and time.monotonic() < deadline:
            time.sleep(0.2)
        go.write_text("")  # rank 0 may go on
        output, _ = proc.communicate(timeout=90)
        deadline = time.monotonic() + 20
        while of_the_run() and time.monotonic() < deadline:
            time.sleep(0.5)
        left = [(p.pid, " ".join(p.cmdline())[:80]) for p in of_the_run()]
    finally:
        for leftover in of_the_run():
            leftover.kill()
        if proc.poll() is None:
            proc.kill()
    assert "KeyboardInterrupt detected" in output, output[-3000:]
    assert left == [], left
    assert_released(port)
    assert not (tmp_path / "lib" / "library.json").exists()


@pytest.mark.timeout(300)
@pytest.mark.slow  # runs long (over a second here)
def test_the_space_given_to_nas_experiment_is_distilled(tmp_path, monkeypatch):
    from conftest import EXAMPLES

    isolate_nni(tmp_path, monkeypatch)
    monkeypatch.syspath_prepend(str(EXAMPLES / "custom"))
    import custom_space

    torch.manual_seed(0)
    space = custom_space.StudentSpace([custom_space.BlockSpace(0, 1, 4, 1), custom_space.BlockSpace(1, 4, 8, 2),
                                       custom_space.BlockSpace(2, 8, 16, 2)])
    evaluator = tiny_evaluator(tmp_path, user_config())  # its config names the DNA space: the given one wins
    strategy = BlockwiseDNA("params=1M", top_k=2, ranking=RANKING)
    samples, models = _run(NasExperiment(space, evaluator, strategy, _sequential(tmp_path)))
    assert evaluator.config.model.student.module is not None
    assert samples and all(set(sample) == {f"b{i}_{c}" for i in range(3) for c in ("width", "op", "depth")}
                           for sample in samples)
    assert all(isinstance(m, ArchitectureModel) and 0.0 <= m.metric <= 1.0 for m in models)
