"""``nnictl create`` on localhost with the registered BlockwiseTuner, and the shipped nnictl example configs."""

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from nni.experiment.config import ExperimentConfig

from conftest import EXAMPLES, user_config
from nni_helpers import FINETUNE, RANKING, assert_released, final_metric, free_port, rest
from nni_pipebd.nni import BlockwiseTuner, meta_path
from nni_pipebd.nni.compat import require_nnictl

NNICTL = [sys.executable, "-c", "from nni.tools.nnictl.nnictl import parse_args; parse_args()"]


def _nnictl(env, *args, check=True, timeout=120):
    done = subprocess.run(NNICTL + list(args), env=env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"nnictl {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done.stdout + done.stderr


def _logs(experiments: Path) -> str:
    """The dispatcher log and every trial's stderr, for a failure message."""
    parts = []
    for path in sorted(experiments.glob("*/log/dispatcher.log")) + sorted(experiments.glob("*/**/stderr")):
        parts.append(f"--- {path}\n{path.read_text()[-3000:]}")
    return "\n".join(parts)


# the user's teacher, data and NNI block space (examples/custom), as a YAML job names them
USER_JOB_WITH_SPACE = user_config(model={"student": {"class_path": "custom_space:block_space"}})


@pytest.mark.timeout(600)
@pytest.mark.slow
def test_nnictl_create_runs_distillation_search_and_evaluations(tmp_path):
    require_nnictl()
    home, experiments = tmp_path / "home", tmp_path / "experiments"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "NNI_CONFIG_DIR": str(tmp_path / "nni-config"),
           "PYTHONWARNINGS": "ignore"}
    assert "registered sucessfully" in _nnictl(env, "algo", "register", "--meta", str(meta_path()))
    assert "PipeBD" in _nnictl(env, "algo", "list")
    config = {
        "experimentName": "pipebd-test", "searchSpace": {}, "trialCodeDirectory": str(tmp_path),
        "trialCommand": f"{sys.executable} -m nni_pipebd.nni.trial", "trialConcurrency": 2, "maxTrialNumber": 3,
        "experimentWorkingDirectory": str(experiments), "trainingService": {"platform": "local"},
        "tuner": {"name": "PipeBD", "classArgs": {"config": USER_JOB_WITH_SPACE.to_dict(), "library_dir": "lib",
                                                  "budget": "params=1M", "top_k": 2, "finetune": FINETUNE,
                                                  "ranking": RANKING}},
    }
    for module in ("custom_teacher.py", "custom_data.py", "custom_space.py"):  # the user's code, in the trial folder
        shutil.copy(EXAMPLES / "custom" / module, tmp_path / module)
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    status, errors, trials = None, [], []
    try:
        _nnictl(env, "create", "--config", str(path), "--port", str(port))
        deadline = time.time() + 420
        while time.time() < deadline:
            check = rest(port, "/check-status")
            status, errors = check["status"], check.get("errors")
            if status in ("DONE", "ERROR"):
                break
            time.sleep(3)
        trials = rest(port, "/trial-jobs")
        experiment_id = rest(port, "/experiment")["id"]
        listed = _nnictl(env, "trial", "ls", experiment_id)
    finally:
        _nnictl(env, "stop", "--all", check=False)
        assert_released(port)
    assert status == "DONE", (f"experiment ended {status} {errors}; trials {[t['status'] for t in trials]}\n"
                              f"{_logs(experiments)}")
    assert len(trials) == 3 and all(t["status"] == "SUCCEEDED" for t in trials), _logs(experiments)
    assert all(t["trialJobId"] in listed for t in trials)
    by_task = {}
    for trial in trials:
        params = json.loads(trial["hyperParameters"][0])["parameters"]
        by_task.setdefault(params["task"], []).append((params, final_metric(trial)))
    (distill, metric), = by_task["distill"]
    assert metric["default"] < 0 and metric["default"] == pytest.approx(
        -statistics.fmean(v for k, v in metric.items() if k.startswith("block_")))
    assert sum(k.startswith("block_") for k in metric) == 4  # the user teacher: stem, stage1, stage2, head
    evaluations = sorted(by_task["evaluate"], key=lambda e: e[0]["rank"])
    labels = {f"b{i}_{choice}" for i in range(3) for choice in ("width", "op", "depth")}
    assert all(set(p["sample"]) == labels for p, _ in evaluations), evaluations  # the user space's own labels
    assert [p["rank"] for p, _ in evaluations] == [0, 1]
    assert all(0.0 <= m["default"] <= 1.0 and m["params"] > 0 for _, m in evaluations)
    assert (tmp_path / "lib" / "nni_results.json").is_file()


@pytest.mark.parametrize("example", ["digits", "cifar10", "imagenet", "custom"])
def test_example_configs_are_valid_nni_configs(example):
    path = EXAMPLES / example / "nni_config.yml"
    config = ExperimentConfig.load(str(path))
    config.tuner_gpu_indices = None  # the GPU examples name GPU 0 for the tuner; this machine may have none
    canonical = config.canonical_copy()
    tuner = canonical.tuner
    assert tuner.class_name == "nni_pipebd.nni.tuner.BlockwiseTuner" and Path(tuner.code_directory).is_dir()
    assert canonical.trial_command == "python3 -m nni_pipebd.nni.trial"
    built = BlockwiseTuner(**tuner.class_args, code_dir=canonical.trial_code_directory)
    built.update_search_space({})
    assert canonical.max_trial_number == built.required_trials
    execution = built.evaluator.config.execution
    if canonical.trial_gpu_number:  # GPUs: one per worker, from the trial's CUDA_VISIBLE_DEVICES
        assert execution.workers == canonical.trial_gpu_number and execution.device in ("cuda", "auto")
    else:  # the CPU: NNI hides every GPU from a trial with trialGpuNumber 0 (CUDA_VISIBLE_DEVICES='')
        assert execution.device in ("cpu", "auto") and built.evaluator.device in ("cpu", "auto")
    if example == "digits":  # the quick example runs Pipe-BD itself, on CPU worker processes
        assert (execution.executor, execution.workers, execution.device) == ("pipebd", 2, "cpu")
    assert Path(canonical.trial_code_directory) == path.parent
