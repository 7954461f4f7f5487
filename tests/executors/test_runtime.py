"""The one runtime on plans beyond Pipe-BD's stages: students placed apart from their teacher blocks, split links."""

import os
import signal

import pytest

from conftest import FP64, FP64_CLOSE, assert_same_blocks, tiny_config
from nni_pipebd.executors.launch import train
from nni_pipebd.plan.plan import Phase, Placement, Plan, Relay

pytestmark = pytest.mark.timeout(240)

APART = Plan([Phase((Relay(0, 3, (0,)), Relay(3, 5, (1,))),  # no batch is split: bitwise
                    (Placement(0, (2,)), Placement(1, (1,)), Placement(2, (2,)), Placement(3, (0,)),
                     Placement(4, (1,))))])
SPLIT = Plan([Phase((Relay(0, 2, (0, 1)), Relay(2, 5, (2,))),  # a two-device first link that sends on
                    (Placement(0, (2,)), Placement(1, (0, 1)), Placement(2, (0,)), Placement(3, (1,)),
                     Placement(4, (0, 1))))])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "ref"
    return out, train(tiny_config(distill={"epochs": 2}), out)


@pytest.fixture(scope="module")
def reference64(tmp_path_factory):
    """The reference in float64, for runs that split a batch."""
    out = tmp_path_factory.mktemp("reference64") / "ref"
    return out, train(tiny_config(distill={"epochs": 2}, execution=FP64), out)


def run_plan(tmp_path, plan, **execution):
    path = plan.save(tmp_path / "plan.json")
    config = tiny_config(tmp_path, distill={"epochs": 2},
                         execution={"executor": "pipebd", "workers": plan.workers, "plan": str(path), **execution})
    return tmp_path / "run", train(config, tmp_path / "run", trace=tmp_path / "trace.json")


@pytest.mark.slow
def test_students_apart_from_their_teacher_blocks_are_bitwise_reference(tmp_path, reference):
    out, manifest = run_plan(tmp_path, APART)
    assert_same_blocks(reference[0], out, 5, exact=True)
    assert [b["losses"] for b in manifest["blocks"]] == [b["losses"] for b in reference[1]["blocks"]]
    # the teacher still runs once per sample (counted by hooks on the teacher modules), data loaded once
    assert manifest["counters"]["teacher_block_forwards_per_sample"] == 5
    assert manifest["counters"]["samples_loaded_per_sample"] == 1
    assert [r["label"] for r in manifest["ranks"]] == ["rank 0: teacher 0-2, students [3]",
                                                       "rank 1: teacher 3-4, students [1, 4]",
                                                       "rank 2: students [0, 2]"]


@pytest.mark.slow
def test_bf16_students_apart_are_bitwise_bf16_reference(tmp_path):
    """Feeds pack a block's input and output in the wider of their dtypes (block 0: fp32 data in, bf16 out) and
    unpack each in its own: the free plan stays bitwise equal to the reference within bf16."""
    reference = train(tiny_config(tmp_path, distill={"epochs": 2}, execution={"precision": "bf16"}), tmp_path / "ref")
    out, manifest = run_plan(tmp_path, APART, precision="bf16")
    assert_same_blocks(tmp_path / "ref", out, 5, exact=True)
    assert [b["losses"] for b in manifest["blocks"]] == [b["losses"] for b in reference["blocks"]]


@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.slow
def test_split_links_and_students_match_reference(tmp_path, reference64, decoupled):
    out, manifest = run_plan(tmp_path, SPLIT, decoupled=decoupled, **FP64)
    assert_same_blocks(reference64[0], out, 5, **FP64_CLOSE)
    for a, b in zip(reference64[1]["blocks"], manifest["blocks"]):
        assert a["losses"] == pytest.approx(b["losses"], rel=FP64_CLOSE["rtol"])
    assert manifest["counters"]["teacher_block_forwards_per_sample"] == 5
    assert manifest["counters"]["samples_loaded_per_sample"] == 1


@pytest.mark.parametrize("name,plan,steps,every", [("split", SPLIT, 3, 1), ("late", APART, 8, 4)])
@pytest.mark.slow
def test_stop_reaches_every_rank_of_a_free_plan_and_resume_matches(tmp_path, name, plan, steps, every):
    """The leader's decision travels to its fellow loading rank (which sends on) and with every relay and feed.
    ``late``: the stop falls between checkpoints, where rank 0 has a step of block 3 pending (its teacher block
    runs on rank 1, so rank 0 trains it one step late): it catches up before its checkpoint."""
    from test_stopping import checkpointed, cli, finish, start, stopped_steps, wait_for
    import yaml

    path = plan.save(tmp_path / "plan.json")
    sections = {"distill": {"epochs": 2, "max_steps_per_epoch": steps}, "data": {"num_samples": 8 * steps}}
    precision = FP64 if name == "split" else {}  # a split batch: both in float64
    config = tiny_config(tmp_path, **sections, execution={"executor": "pipebd", "workers": 3, "plan": str(path),
                                                          "checkpoint_every": every, **precision})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(config.to_dict()))
    proc = start(cli("train", str(tmp_path / "job.yaml"), "--out", "run"), tmp_path)
    try:
        wait_for(checkpointed(tmp_path / "run", ["rank0", "rank1", "rank2"]), 120, "the first checkpoints")
        os.kill(proc.pid, signal.SIGTERM)
        returncode, _, output = finish(proc)
    finally:
        finish(proc)
    assert returncode == 143, output[-3000:]
    step = int(output.split("after step ")[1].split(";")[0])
    assert step < 2 * steps and stopped_steps(tmp_path / "run") == {"rank0": step, "rank1": step, "rank2": step}
    if name == "late":
        assert step % every and step % steps, step  # neither a checkpoint nor an epoch end: a late step was due
    train(config, tmp_path / "run", resume=True)
    train(tiny_config(tmp_path, **sections, execution=precision), tmp_path / "ref")
    assert_same_blocks(tmp_path / "ref", tmp_path / "run", 5, **({"exact": True} if name == "late" else FP64_CLOSE))


@pytest.mark.slow
def test_late_students_catch_up_at_checkpoints_so_a_failed_run_resumes_bitwise(tmp_path, reference, monkeypatch):
    """Rank 0 trains block 3 one step late; its checkpoints (every 2 steps) hold block 3 caught up, so a run that
    fails between them resumes to the reference's weights bit for bit."""
    from nni_pipebd.executors.faults import ENV, InjectedFault
    from nni_pipebd.executors.launch import WorkerError

    monkeypatch.setenv(ENV, "rank=1,step=5")  # after the checkpoint of step 4; rank 0 trained block 3 late before it
    with pytest.raises((InjectedFault, WorkerError), match="injected fault at rank"):
        run_plan(tmp_path, APART, checkpoint_every=2)
    monkeypatch.delenv(ENV)
    path = APART.save(tmp_path / "plan.json")
    config = tiny_config(tmp_path, distill={"epochs": 2},
                         execution={"executor": "pipebd", "workers": 3, "plan": str(path), "checkpoint_every": 2})
    resumed = train(config, tmp_path / "run", resume=True)
    assert_same_blocks(reference[0], tmp_path / "run", 5, exact=True)
    assert [b["losses"] for b in resumed["blocks"]] == [b["losses"] for b in reference[1]["blocks"]]


@pytest.mark.slow
def test_decoupled_updates_remove_the_per_step_wait(tmp_path, monkeypatch):
    """Ranks slow by turns (rank 0 on even steps, rank 1 on odd ones): with a barrier before every update each step
    waits for the slower rank; decoupled, each rank runs at its own average pace (the trace shows where time went)."""
    import json

    from nni_pipebd.executors.faults import ENV

    monkeypatch.setenv(ENV, "rank=0,step=0,kind=slow,seconds=0.25,every=2;rank=1,step=1,kind=slow,seconds=0.25,every=2")
    blocked = {}
    for decoupled in (False, True):
        out = tmp_path / f"decoupled-{decoupled}"
        config = tiny_config(tmp_path, distill={"epochs": 2, "max_steps_per_epoch": 4},
                             execution={"executor": "pipebd", "workers": 2, "decoupled": decoupled})
        train(config, out, trace=out / "trace.json")  # the workers inherit the fault from the environment
        events = json.loads((out / "trace.json").read_text())["traceEvents"]
        waits = [e for e in events if e.get("name") in ("wait", "recv", "send") and e.get("ph") == "X"]
        blocked[decoupled] = sum(e["dur"] for e in waits) / 1e6
        assert any(e.get("name") == "wait" for e in events) == (not decoupled)  # the barrier is gone
    # 8 steps: with the barrier each rank waits out the other's 4 slow steps (about 2 x 4 x 0.25 s in all)
    assert blocked[False] > 1.2, blocked
    assert blocked[True] < blocked[False] / 2, blocked


PLATEAU = {"epochs": 6, "max_steps_per_epoch": 2, "until": "plateau", "patience": 1, "min_improvement": 0.05}


@pytest.mark.slow
def test_blocks_stop_on_their_own_plateau_alike_in_every_executor(tmp_path):
    """Each block stops when its loss stops improving (here blocks stop after 2, 3 and 6 epochs); every layout
    decides alike and trains the same weights — a free plan whose ranks run out of work idles them."""
    ref = train(tiny_config(tmp_path, distill=PLATEAU), tmp_path / "ref")
    stopped = [b["stopped"] for b in ref["blocks"]]
    assert {s["reason"] for s in stopped} == {"plateau"} and len({s["epoch"] for s in stopped}) >= 3, stopped
    assert [len(b["losses"]) for b in ref["blocks"]] == [s["epoch"] for s in stopped]
    assert ref["blocks"][2]["steps"] == 2 * stopped[2]["epoch"]
    plan = APART.save(tmp_path / "plan.json")
    for name, execution in (("apart", {"executor": "pipebd", "workers": 3, "plan": str(plan)}),
                            ("ls", {"executor": "ls", "workers": 2}),
                            ("dp", {"executor": "dp", "workers": 1})):
        other = train(tiny_config(tmp_path, distill=PLATEAU, execution=execution), tmp_path / name)
        assert [b["stopped"] for b in other["blocks"]] == stopped, name
        assert_same_blocks(tmp_path / "ref", tmp_path / name, 5, exact=True)


@pytest.mark.slow
def test_plateau_run_resumes_bitwise(tmp_path, monkeypatch):
    from nni_pipebd.executors.faults import ENV, InjectedFault
    from nni_pipebd.executors.launch import WorkerError

    config = tiny_config(tmp_path, distill=PLATEAU, execution={"executor": "pipebd", "workers": 2,
                                                               "checkpoint_every": 1})
    whole = train(config, tmp_path / "whole")
    monkeypatch.setenv(ENV, "rank=1,step=7")  # after blocks 2 and 3 stopped (block 3 lives on rank 1)
    with pytest.raises((InjectedFault, WorkerError), match="injected fault at rank"):
        train(config, tmp_path / "run")
    monkeypatch.delenv(ENV)
    resumed = train(config, tmp_path / "run", resume=True)
    assert [b["stopped"] for b in resumed["blocks"]] == [b["stopped"] for b in whole["blocks"]]
    assert_same_blocks(tmp_path / "whole", tmp_path / "run", 5, exact=True)
