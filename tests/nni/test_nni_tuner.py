"""BlockwiseTuner's flow driven like NNI's dispatcher drives it, and the trial entry point."""

import base64
import json

import pytest

from conftest import tiny_config
from nni_helpers import FINETUNE, RANKING
from nni_pipebd.nni import BlockwiseTuner, SpaceMismatchError
from nni_pipebd.nni.trial import main as trial_main, run_trial
from nni_pipebd.nni.tuner import NNI_RESULTS, experiment_params


def _tuner(tmp_path, **kwargs):
    kwargs.setdefault("finetune", FINETUNE)
    kwargs.setdefault("ranking", RANKING)
    return BlockwiseTuner(tiny_config(tmp_path).to_dict(), "lib", "params=1M", code_dir=str(tmp_path), **kwargs)


class Dispatcher:
    """What NNI's MsgDispatcher does with a tuner: ask for ids, collect late answers through the callback."""

    def __init__(self, tuner):
        self.tuner, self.next_id, self.late = tuner, 0, []

    def request(self, count):
        ids = list(range(self.next_id, self.next_id + count))
        self.next_id += count
        return list(zip(ids, self.tuner.generate_multiple_parameters(
            ids, st_callback=lambda i, params: self.late.append((i, params)))))


def test_dna_flow_answers_waiting_requests(tmp_path):
    tuner = _tuner(tmp_path, top_k=2)
    assert tuner.required_trials == 3
    nni = Dispatcher(tuner)
    first = nni.request(2)  # trialConcurrency 2: only the distillation is ready
    assert [p["task"] for _, p in first] == ["distill"] and nni.late == []
    run_trial(first[0][1])  # the distillation, in this process
    assert (tmp_path / "lib" / "library.json").is_file()
    tuner.receive_trial_result(0, first[0][1], {"default": -1.0})
    tuner.trial_end(0, True)  # -> DNA search; the waiting id 1 gets the best architecture
    assert tuner.phase == "evaluate" and [(i, p["rank"]) for i, p in nni.late] == [(1, 0)]
    second = nni.request(2)  # the distillation's slot: the second architecture, then nothing more
    assert [(i, p["task"], p["rank"]) for i, p in second] == [(2, "evaluate", 1)]
    assert all(p["role"] == "candidate" and "score" in p["search"] for _, p in nni.late + second)
    for i, accuracy in ((1, 0.25), (2, 0.5)):
        tuner.trial_end(i, True)
        tuner.receive_trial_result(i, None, {"default": accuracy, "params": 1.0})
    assert tuner.phase == "done"
    results = json.loads((tmp_path / "lib" / NNI_RESULTS).read_text())
    assert [(r["parameter_id"], r["metric"]["default"]) for r in results["architectures"]] == [(2, 0.5), (1, 0.25)]
    assert nni.request(1) == []


def test_donna_flow_fits_the_predictor_on_trial_results(tmp_path):
    tuner = _tuner(tmp_path, method="donna", top_k=2, predictor_archs=3, population=8, generations=3)
    assert tuner.required_trials == 6
    nni = Dispatcher(tuner)
    (_, distill), = nni.request(1)
    run_trial(distill)
    tuner.trial_end(0, True)
    assert tuner.phase == "predict"
    predictors = nni.request(4)  # three predictor trials are ready; the fourth request waits for the search
    assert [p["role"] for _, p in predictors] == ["predictor"] * 3
    for (i, params), accuracy in zip(predictors, (0.2, 0.4, 0.3)):
        tuner.receive_trial_result(i, params, accuracy)
        tuner.trial_end(i, True)
    assert tuner.phase == "evaluate" and [p["role"] for _, p in nni.late] == ["candidate"]
    assert "predicted_accuracy" in nni.late[0][1]["search"]
    assert [p["rank"] for _, p in nni.request(3)] == [1]


def test_failed_distillation_stops_the_flow(tmp_path):
    tuner = _tuner(tmp_path)
    Dispatcher(tuner).request(1)
    with pytest.raises(RuntimeError, match="distillation trial .* failed"):
        tuner.trial_end(0, False)


def test_experiment_config_is_read_and_checked(tmp_path, monkeypatch):
    params = {"trialCodeDirectory": str(tmp_path), "maxTrialNumber": 2}
    argv = ["nni", "--exp_params", base64.b64encode(json.dumps(params).encode()).decode()]
    assert experiment_params(argv) == params
    assert experiment_params(["nni"]) == {}
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(ValueError, match="method"):
        BlockwiseTuner(tiny_config(tmp_path).to_dict(), "lib", "params=1M", method="random")
    with pytest.raises(ValueError, match="set maxTrialNumber: 4"):
        BlockwiseTuner(tiny_config(tmp_path).to_dict(), "lib", "params=1M", top_k=3)
    params["maxTrialNumber"] = 4
    monkeypatch.setattr("sys.argv", ["nni", f"--exp_params={base64.b64encode(json.dumps(params).encode()).decode()}"])
    tuner = BlockwiseTuner(tiny_config(tmp_path).to_dict(), "lib", "params=1M", top_k=3)
    assert tuner.evaluator is None  # torch-heavy parts wait for NNI's first command
    tuner.update_search_space({})
    assert tuner.evaluator.library_dir == tmp_path / "lib"  # relative to trialCodeDirectory


def test_search_space_must_match(tmp_path):
    tuner = _tuner(tmp_path)
    tuner.update_search_space({})
    space = {f"s{b}_i{i}": {"_type": "choice", "_value": ["k3e2", "k5e2"]} for b, i in
             ((0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1))}
    tuner.update_search_space(space)
    space["s3_i2"] = space.pop("s3_i1")
    with pytest.raises(SpaceMismatchError, match="s3_i2"):
        tuner.update_search_space(space)


def test_trial_entry_point(tmp_path):
    with pytest.raises(ValueError, match="'task'"):
        run_trial({"task": "dance"})
    tuner = _tuner(tmp_path)
    (_, params), = Dispatcher(tuner).request(1)
    path = tmp_path / "params.json"
    path.write_text(json.dumps(params))
    assert trial_main(["--params", str(path)]) == 0
    assert (tmp_path / "lib" / "library.json").is_file()
    with pytest.raises(ValueError, match="sample"):
        run_trial({**params, "task": "evaluate"})
