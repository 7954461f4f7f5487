"""The profiler times blocks as training runs them: the teacher inside its chain, students over sampled paths."""

import math

import pytest
import torch

from conftest import tiny_config
from nni_pipebd.distill.trainer import BlockTrainer
from nni_pipebd.job import build_job
from nni_pipebd.plan import profiler
from nni_pipebd.plan.profiler import profile_job


@pytest.fixture
def clock(monkeypatch):
    """A fake clock the patched forwards and steps advance: timings become exact."""
    now = [0.0]
    monkeypatch.setattr(profiler, "_now", lambda device: now[0])
    return now


def test_teacher_is_timed_in_its_chain_on_a_fresh_batch_per_round(clock):
    job = build_job(tiny_config(data={"num_samples": 128}))
    seen = []  # (block, rows, first value of its input) per teacher forward

    def forward_hook(index):
        def hook(module, inputs, output):
            seen.append((index, len(inputs[0]), float(inputs[0].flatten()[0])))
            clock[0] += (index + 1) * len(inputs[0])  # block i costs (i + 1) s per row
        return hook

    for i, block in enumerate(job.spec.teacher):
        block.register_forward_hook(forward_hook(i))
    profile = profile_job(job, 2, repeats=3, warmup=1, paths=4)
    batch = job.config.data.batch_size
    for i, block in enumerate(profile.blocks):
        assert block.teacher_s == {g: (i + 1) * math.ceil(batch / g) for g in (1, 2)}
    n = len(profile.blocks)
    chain = [x for x in seen if x[0] == 0][:10]  # block 0's inputs over the chain's 5 rounds at 2 degrees
    assert [rows for _, rows, _ in chain] == [batch, batch // 2] * 5  # the degrees interleaved round by round
    assert len({value for _, _, value in chain}) == 10  # a batch of its own per round and degree
    assert [index for index, _, _ in seen[:2 * n]] == list(range(n)) * 2  # the whole chain, one after another


def test_student_step_is_the_mean_over_sampled_paths_scaled_per_degree(clock, monkeypatch):
    """``student_s[1]``: the mean over ``paths`` paths; ``student_s[g]``: scaled by how the first ``repeats`` of
    those paths ran at g (every degree's trainer samples the same paths)."""
    job = build_job(tiny_config())
    steps = []
    step = BlockTrainer.step

    def timed_step(self, x, target, *args, **kwargs):
        result = step(self, x, target, *args, **kwargs)
        steps.append((self.index, len(x), repr(self.sampler.state_dict())))
        clock[0] += len(steps)  # the k-th step of the whole profile costs k s
        return result

    monkeypatch.setattr(BlockTrainer, "step", timed_step)
    profile = profile_job(job, 2, repeats=2, warmup=1, paths=4)
    # block 0, the degrees interleaved on each of the first 1 + 2 paths: steps 1 (g = 1), 2 (g = 2) the warm-up,
    # then 3, 4; 5, 6; then g = 1 alone: 7, 8
    assert profile.blocks[0].student_s[1] == pytest.approx((3 + 5 + 7 + 8) / 4)
    assert profile.blocks[0].student_s[2] == pytest.approx(5.75 * (4 + 6) / (3 + 5))
    # block 1: steps 9..16 alike
    assert profile.blocks[1].student_s[1] == pytest.approx((11 + 13 + 15 + 16) / 4)
    assert profile.blocks[1].student_s[2] == pytest.approx(13.75 * (12 + 14) / (11 + 13))
    rows = job.config.data.batch_size
    assert [(i, n) for i, n, _ in steps[:8]] == [(0, rows), (0, rows // 2)] * 3 + [(0, rows)] * 2
    assert [s for _, n, s in steps[:6] if n < rows] == [s for _, n, s in steps[:6] if n == rows]  # same paths at g = 2
    assert len({s for _, n, s in steps[:8] if n == rows}) == 5  # a path of its own per step
    with pytest.raises(ValueError, match="paths = 2 must be >= repeats = 4"):
        profile_job(job, 1, repeats=4, paths=2)


def test_sync_comes_before_every_timed_loop(clock, monkeypatch):
    """Processes profiling side by side meet before each degree of the chain and each block at each degree: every
    loop each of them times runs while the others run the same loop."""
    job = build_job(tiny_config())
    events = []
    step = BlockTrainer.step
    for block in job.spec.teacher:
        block.register_forward_hook(lambda *_: events.append("teacher"))
    monkeypatch.setattr(BlockTrainer, "step",
                        lambda self, *a, **k: (events.append(f"student{self.index}"), step(self, *a, **k))[1])
    profile_job(job, 2, repeats=2, warmup=1, paths=3, sync=lambda: events.append("sync"))
    loops = [events[i + 1] for i, e in enumerate(events) if e == "sync"]
    n = len(job.spec.teacher)
    assert loops == ["teacher"] + [f"student{i}" for i in range(n)]  # the chain, then each block's steps
    chain = events[:events.index("sync", 1)]  # the chain: (warm-up + paths) rounds at 2 degrees, no sync inside
    assert chain == ["sync"] + ["teacher"] * n * 2 * 4 + ["teacher"]  # + block 0's target for its students
    block0 = events[events.index("sync", 1):events.index("sync", events.index("sync", 1) + 1)]
    assert block0.count("student0") == (1 + 2) * 2 + 1  # no sync between the degrees' interleaved steps


def test_mean_profile_averages_the_times_of_one_job():
    job = build_job(tiny_config())
    first = profile_job(job, 2, repeats=2, warmup=0, paths=2)
    second = profiler.Profile.from_dict(first.to_dict())
    for block in second.blocks:
        block.teacher_s = {g: 3 * t for g, t in block.teacher_s.items()}
        block.student_s = {g: t + 1.0 for g, t in block.student_s.items()}
        block.memory_mb = {g: 2 * m for g, m in block.memory_mb.items()}
    before = first.to_dict()
    mean = profiler.mean_profile([first, second])
    for a, m in zip(first.blocks, mean.blocks):
        assert m.teacher_s == pytest.approx({g: 2 * t for g, t in a.teacher_s.items()})
        assert m.student_s == pytest.approx({g: t + 0.5 for g, t in a.student_s.items()})
        assert m.memory_mb == a.memory_mb  # not a time: the first profile's
    assert first.to_dict() == before  # the inputs are left alone
    second.key = "another"
    with pytest.raises(ValueError, match="different jobs"):
        profiler.mean_profile([first, second])
    with pytest.raises(ValueError, match="at least one"):
        profiler.mean_profile([])


def test_batch_split_steps_run_on_the_student_as_the_runtime_prepares_it(clock, monkeypatch):
    """With ``split_student`` (group BatchNorm under ``sync_bn``), the steps at g >= 2 train the student it returns
    and those at g = 1 the block itself: a batch split costs what the runtime's split student costs."""
    from nni_pipebd.executors.syncbn import GroupBatchNorm2d, convert_sync_batchnorm

    job = build_job(tiny_config())
    seen = []
    step = BlockTrainer.step

    def recording_step(self, x, target, *args, **kwargs):
        group_bn = any(isinstance(m, GroupBatchNorm2d) for m in self.student.modules())
        plain_bn = any(type(m) is torch.nn.BatchNorm2d for m in self.student.modules())
        seen.append((len(x), group_bn, plain_bn))
        return step(self, x, target, *args, **kwargs)

    monkeypatch.setattr(BlockTrainer, "step", recording_step)
    profile_job(job, 2, repeats=2, warmup=1, paths=2, split_student=lambda s: convert_sync_batchnorm(s, None, "cpu"))
    rows = job.config.data.batch_size
    assert {(n, g, p) for n, g, p in seen if p or g} == {(rows, False, True), (rows // 2, True, False)}
    assert any(n == rows // 2 for n, _, _ in seen) and all(
        not isinstance(m, GroupBatchNorm2d) for s in job.spec.student for m in s.modules())  # the job's own untouched
