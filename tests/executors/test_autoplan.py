"""--plan auto: profile, solve, run hybrid stages; the result still matches the reference."""

import json
import logging

import pytest

from conftest import FP64, FP64_CLOSE, assert_same_blocks, tiny_config
from nni_pipebd.cli import main
from nni_pipebd.executors.autoplan import auto_plan, get_profile
from nni_pipebd.executors.launch import train
from nni_pipebd.plan.plan import Plan
from nni_pipebd.plan.solver import InfeasibleMemoryError

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NNI_PIPEBD_CACHE", str(tmp_path / "cache"))


@pytest.mark.slow
def test_profile_is_measured_once_then_reused(tmp_path, caplog):
    config = tiny_config(tmp_path, distill={"paths_per_step": 2})
    with caplog.at_level(logging.INFO, logger="nni_pipebd.executors.autoplan"):
        profile = get_profile(config, 2)
    assert "in 2 workers side by side" in caplog.text  # on CPU: under the load of the run's workers
    assert len(profile.blocks) == 5 and set(profile.blocks[0].teacher_s) == {1, 2}
    assert profile.paths_per_step == 2  # the student times are of 2-path steps; a path split needs every weight
    assert all(b.param_bytes >= b.grad_bytes > 0 for b in profile.blocks)
    assert all(b.student_s[1] > 0 and b.memory_mb[2] > 0 for b in profile.blocks)
    assert 2 in profile.allreduce and profile.p2p.s_per_byte > 0 and profile.p2p.latency_s >= 0
    files = list((tmp_path / "cache" / "profiles").iterdir())
    assert len(files) == 1
    assert get_profile(config, 2).to_dict() == profile.to_dict()  # same key: read back, not measured


@pytest.mark.parametrize("placement", ["free", "stages"])
@pytest.mark.slow
def test_train_plan_auto_matches_reference(tmp_path, placement):
    ref = train(tiny_config(tmp_path, execution=FP64), tmp_path / "ref")
    auto = train(tiny_config(tmp_path, execution={"executor": "pipebd", "workers": 2, "plan": "auto",
                                                  "placement": placement, **FP64}),
                 tmp_path / "auto")
    assert (tmp_path / "auto" / "plan.json").is_file()
    assert auto["config"]["execution"]["plan"].endswith("plan.json")
    assert_same_blocks(tmp_path / "ref", tmp_path / "auto", 5, **FP64_CLOSE)
    assert ref["num_blocks"] == auto["num_blocks"]


@pytest.mark.slow
def test_plan_cli_json_and_memory_errors(tmp_path, capsys, caplog):
    import yaml

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path).to_dict()))
    assert main(["plan", str(path), "--workers", "3", "--json", "--out", str(tmp_path / "plan.json")]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert Plan.from_dict(plan).validate(5, 3, 8).workers == 3  # free placement: stages or phases
    assert len(plan["predicted"]["rank_s"]) == 3 and plan["predicted"]["step_s"] == max(plan["predicted"]["rank_s"])
    assert Plan.load(tmp_path / "plan.json") == Plan.from_dict(plan)
    assert main(["plan", str(path), "--workers", "3", "--memory-limit", "0.001"]) == 2
    assert "smallest feasible limit is" in caplog.text
    with pytest.raises(InfeasibleMemoryError):
        auto_plan(tiny_config(tmp_path, execution={"memory_limit_mb": 0.001}), 3)


def test_link_fit_takes_latency_from_the_smallest_message_and_slope_across():
    from nni_pipebd.executors.autoplan import _fit

    points = [(4096, 0.0010), (4 * 1024 * 1024, 0.0050), (256 * 1024, 0.0012)]  # unsorted, as a worker may list
    model = _fit(points)
    assert model.latency_s == 0.0010  # not the least-squares intercept (0.00097)
    assert model.s_per_byte == pytest.approx(0.004 / (4 * 1024 * 1024 - 4096))
    assert _fit(points, latency_s=0.003).latency_s == 0.003  # measured in a running step
    assert _fit([(4096, 0.002), (4 * 1024 * 1024, 0.001)]).s_per_byte == 0.0  # noise: never a negative slope
