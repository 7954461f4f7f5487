"""Tests of GroupBatchNorm2d: a batch split over gloo ranks matches one process on the whole batch."""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from nni_pipebd.executors.forkserver import warm_start
from nni_pipebd.executors.syncbn import (
    GroupBatchNorm2d,
    convert_group_batchnorm,
    convert_sync_batchnorm,
)

__all__: list[str] = []

WORLD = 2
BATCH = 8
STEPS = 2
# name -> (per-rank batch sizes, momentum, dtype); every split sums to BATCH.  float64 checks the math
# with assert_close's default (tight) tolerances; float32 is checked relative to each tensor's scale,
# since the single-process reference itself is only that accurate in float32.
SCENARIOS = {
    "even": ((4, 4), 0.1, torch.float64),
    "uneven": ((5, 3), 0.1, torch.float64),
    "momentum_none": ((4, 4), None, torch.float64),
    "empty_shard": ((8, 0), 0.1, torch.float64),
    "even_float32": ((4, 4), 0.1, torch.float32),
}
F32_REL = 1e-5
# per-rank subgroups of size 1 (explicit ``group`` argument)
SUBGROUP_SPLIT = (4, 4)
TIMEOUT = datetime.timedelta(seconds=60)


def _make_net(momentum: float | None) -> nn.Sequential:
    """Conv -> BN -> ReLU -> Conv -> BN with plain ``nn.BatchNorm2d`` layers."""
    return nn.Sequential(
        nn.Conv2d(4, 6, 3, padding=1),
        nn.BatchNorm2d(6, momentum=momentum),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1),
        nn.BatchNorm2d(5, momentum=momentum),
    )


def _build(data: dict, momentum: float | None, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """The seeded net (plain BatchNorm2d) with ``momentum``, cast to ``dtype``."""
    net = _make_net(momentum)
    net.load_state_dict(data["state"])
    return net.to(dtype)


def _make_inputs() -> dict:
    """Seeded net state, two training batches (with a non-zero mean) and a fixed loss weighting."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = _make_net(0.1)
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1.0 + 0.5 * torch.randn(m.num_features, generator=gen))
                m.bias.copy_(0.5 * torch.randn(m.num_features, generator=gen))
    offset = torch.arange(4, dtype=torch.float32).view(1, 4, 1, 1)
    batches = [torch.randn(BATCH, 4, 5, 5, generator=gen) * 2.0 + offset for _ in range(STEPS)]
    weighting = torch.randn(BATCH, 5, 5, 5, generator=gen)
    return {"state": net.state_dict(), "batches": batches, "weighting": weighting}


def _bn_state(net: nn.Module) -> list[dict]:
    """Running statistics of every BatchNorm layer of ``net``."""
    return [
        {"running_mean": m.running_mean.clone(), "running_var": m.running_var.clone(),
         "num_batches_tracked": m.num_batches_tracked.clone()}
        for m in net.modules() if isinstance(m, nn.BatchNorm2d)
    ]


def _train(net: nn.Module, batches: list, weighting: torch.Tensor, lo: int, hi: int,
           reduce_grads: bool) -> dict:
    """Run the training steps on rows ``lo:hi`` of each batch; record outputs and gradients per step."""
    net.train()
    steps = []
    dtype = next(net.parameters()).dtype
    for x_full in batches:
        net.zero_grad(set_to_none=True)
        x = x_full[lo:hi].to(dtype).requires_grad_(True)
        out = net(x)
        loss = (out * weighting[lo:hi].to(dtype)).sum()
        loss.backward()
        grads = {}
        for name, p in net.named_parameters():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            if reduce_grads:
                dist.all_reduce(g, op=dist.ReduceOp.SUM)
            grads[name] = g.clone()
        steps.append({"out": out.detach().clone(), "x_grad": x.grad.clone(), "param_grads": grads})
    return {"steps": steps, "bn": _bn_state(net)}


def _bounds(split: tuple, rank: int) -> tuple[int, int]:
    """Contiguous row range of ``rank`` in a batch split as ``split``."""
    lo = sum(split[:rank])
    return lo, lo + split[rank]


def _worker(rank: int, world_size: int, tmp_dir: str) -> None:
    """One gloo rank: run every scenario on its shard and save the results to ``rank{rank}.pt``."""
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    tmp = Path(tmp_dir)
    dist.init_process_group("gloo", init_method=f"file://{tmp / 'store'}", rank=rank,
                            world_size=world_size, timeout=TIMEOUT)
    try:
        data = torch.load(tmp / "inputs.pt")
        results = {}
        for name, (split, momentum, dtype) in SCENARIOS.items():
            net = convert_group_batchnorm(_build(data, momentum, dtype))
            lo, hi = _bounds(split, rank)
            with mock.patch.object(dist, "all_reduce", wraps=dist.all_reduce) as spy:
                net.train()
                out = net(data["batches"][0][lo:hi].to(dtype).requires_grad_(True))
                out.sum().backward()
                train_calls = spy.call_count
            net = convert_group_batchnorm(_build(data, momentum, dtype))  # fresh net: drop that probe step
            res = _train(net, data["batches"], data["weighting"], lo, hi, reduce_grads=True)
            net.eval()
            with mock.patch.object(dist, "all_reduce", wraps=dist.all_reduce) as spy, torch.no_grad():
                res["eval_out"] = net(data["batches"][0][lo:hi].to(dtype))
                res["eval_calls"] = spy.call_count
            res["train_calls"] = train_calls
            results[name] = res

        subgroups = [dist.new_group([r]) for r in range(world_size)]  # every rank creates every group
        net = convert_group_batchnorm(_build(data, 0.1), group=subgroups[rank])
        lo, hi = _bounds(SUBGROUP_SPLIT, rank)
        results["subgroup"] = _train(net, data["batches"], data["weighting"], lo, hi, reduce_grads=False)
        torch.save(results, tmp / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _reference(data: dict, momentum: float | None, lo: int = 0, hi: int = BATCH,
               dtype: torch.dtype = torch.float64) -> tuple[dict, nn.Module]:
    """Plain ``nn.BatchNorm2d`` net in this process on rows ``lo:hi`` of every batch."""
    net = _build(data, momentum, dtype)
    return _train(net, data["batches"], data["weighting"], lo, hi, reduce_grads=False), net


def _close(got: torch.Tensor, want: torch.Tensor, what: str, scale: float | None = None) -> None:
    """assert_close with default tolerances, or ones relative to ``scale`` (default: ``want``'s) for float32."""
    tol = {}
    if want.dtype == torch.float32:
        scale = want.abs().max().item() if scale is None else scale
        tol = {"rtol": F32_REL, "atol": F32_REL * max(1.0, scale)}
    torch.testing.assert_close(got, want, **tol, msg=lambda m: f"{what}: {m}")


def _assert_steps_close(got: list, want: list) -> None:
    """Compare recorded outputs, input gradients and parameter gradients step by step."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        _close(g["out"], w["out"], f"step {i} output")
        _close(g["x_grad"], w["x_grad"], f"step {i} input grad")
        assert g["param_grads"].keys() == w["param_grads"].keys()
        # e.g. a conv bias before BN has a zero gradient up to rounding of the other gradients' size
        scale = max(t.abs().max().item() for t in w["param_grads"].values())
        for name in w["param_grads"]:
            _close(g["param_grads"][name], w["param_grads"][name], f"step {i} grad of {name}", scale)


def _assert_bn_close(got: list, want: list) -> None:
    """Compare running statistics and ``num_batches_tracked``."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        _close(g["running_mean"], w["running_mean"], "running_mean")
        _close(g["running_var"], w["running_var"], "running_var")
        assert int(g["num_batches_tracked"]) == int(w["num_batches_tracked"]) == STEPS


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list]:
    """Run all distributed scenarios once in a 2-process gloo world; return inputs and per-rank results."""
    tmp = tmp_path_factory.mktemp("syncbn")
    data = _make_inputs()
    torch.save(data, tmp / "inputs.pt")
    mp.start_processes(_worker, args=(WORLD, str(tmp)), nprocs=WORLD, join=True, start_method=warm_start())
    return data, [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def _concat_rank_steps(per_rank: list) -> list:
    """Rebuild full-batch outputs and input gradients from the per-rank shards (grads are already summed)."""
    steps = []
    for i in range(STEPS):
        shards = [r["steps"][i] for r in per_rank]
        for s in shards[1:]:
            for name, g in s["param_grads"].items():
                torch.testing.assert_close(g, shards[0]["param_grads"][name])  # all-reduced on every rank
        steps.append({
            "out": torch.cat([s["out"] for s in shards]),
            "x_grad": torch.cat([s["x_grad"] for s in shards]),
            "param_grads": shards[0]["param_grads"],
        })
    return steps


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.slow  # its fixture starts the gloo workers
def test_split_batch_matches_full_batch(gloo_results: tuple, scenario: str) -> None:
    data, ranks = gloo_results
    split, momentum, dtype = SCENARIOS[scenario]
    want, _ = _reference(data, momentum, dtype=dtype)
    per_rank = [r[scenario] for r in ranks]
    _assert_steps_close(_concat_rank_steps(per_rank), want["steps"])
    for r in per_rank:  # running stats identical on every rank and equal to the full-batch ones
        _assert_bn_close(r["bn"], want["bn"])
    for r, n in zip(per_rank, split):
        assert r["steps"][0]["out"].shape[0] == n


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.slow  # its fixture starts the gloo workers
def test_one_all_reduce_per_layer_and_pass(gloo_results: tuple, scenario: str) -> None:
    _, ranks = gloo_results
    for r in ranks:
        assert r[scenario]["train_calls"] == 2 * 2  # 2 BN layers x (forward + backward)
        assert r[scenario]["eval_calls"] == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.slow  # its fixture starts the gloo workers
def test_eval_matches_plain_bn(gloo_results: tuple, scenario: str) -> None:
    data, ranks = gloo_results
    _, momentum, dtype = SCENARIOS[scenario]
    _, ref_net = _reference(data, momentum, dtype=dtype)
    ref_net.eval()
    with torch.no_grad():
        want = ref_net(data["batches"][0].to(dtype))
    got = torch.cat([r[scenario]["eval_out"] for r in ranks])
    _close(got, want, "eval output")


@pytest.mark.timeout(120)
@pytest.mark.slow  # its fixture starts the gloo workers
def test_size_one_subgroups_match_plain_bn_on_shard(gloo_results: tuple) -> None:
    data, ranks = gloo_results
    for rank, r in enumerate(ranks):
        lo, hi = _bounds(SUBGROUP_SPLIT, rank)
        want, _ = _reference(data, 0.1, lo, hi)
        _assert_steps_close(r["subgroup"]["steps"], want["steps"])
        _assert_bn_close(r["subgroup"]["bn"], want["bn"])


@pytest.mark.timeout(120)
def test_single_process_world_matches_plain_bn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not dist.is_initialized()
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
    data = _make_inputs()
    want, _ = _reference(data, None)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=TIMEOUT)
    try:
        net = convert_group_batchnorm(_build(data, None))
        with mock.patch.object(dist, "all_reduce", wraps=dist.all_reduce) as spy:
            got = _train(net, data["batches"], data["weighting"], 0, BATCH, reduce_grads=False)
        assert spy.call_count == STEPS * 2 * 2
    finally:
        dist.destroy_process_group()
    _assert_steps_close(got["steps"], want["steps"])
    _assert_bn_close(got["bn"], want["bn"])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_without_process_group_uses_local_stats(momentum: float | None) -> None:
    assert not dist.is_initialized()
    data = _make_inputs()
    want, _ = _reference(data, momentum)
    got = _train(convert_group_batchnorm(_build(data, momentum)), data["batches"], data["weighting"], 0, BATCH,
                 reduce_grads=False)
    _assert_steps_close(got["steps"], want["steps"])
    _assert_bn_close(got["bn"], want["bn"])


@pytest.mark.timeout(120)
def test_large_mean_variance_is_accurate() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 4, 4, generator=gen, dtype=torch.float64) + 1000.0
    ref, bn = nn.BatchNorm2d(3).double(), GroupBatchNorm2d(3).double()
    torch.testing.assert_close(bn(x), ref(x))
    torch.testing.assert_close(bn.running_var, ref.running_var)


def test_conversion_keeps_parameters_and_state() -> None:
    torch.manual_seed(0)
    net = _make_net(None)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1.0, 1.0)
                m.running_mean.uniform_(-1.0, 1.0)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    net[4].eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    params = {name: p for name, p in net.named_parameters()}
    old_bn = [net[1], net[4]]

    out = convert_group_batchnorm(net)
    assert out is net
    for i, old in zip((1, 4), old_bn):
        new = out[i]
        assert type(new) is GroupBatchNorm2d
        assert new.momentum is None and new.eps == old.eps and new.affine and new.track_running_stats
        assert new.training == old.training
        assert new.group is None
    assert [type(m) for m in out] == [nn.Conv2d, GroupBatchNorm2d, nn.ReLU, nn.Conv2d, GroupBatchNorm2d]
    for name, p in out.named_parameters():
        assert p is params[name]
    after = out.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, msg=lambda m, n=k: f"{n}: {m}")

    # already converted layers are kept; a BN root is replaced
    assert convert_group_batchnorm(out)[1] is out[1]
    root = nn.BatchNorm2d(3, affine=False, track_running_stats=False)
    new_root = convert_group_batchnorm(root)
    assert type(new_root) is GroupBatchNorm2d and new_root.weight is None and new_root.running_mean is None
    nested = nn.Sequential(nn.Sequential(nn.BatchNorm2d(2)), nn.BatchNorm1d(2))
    convert_group_batchnorm(nested)
    assert type(nested[0][0]) is GroupBatchNorm2d and type(nested[1]) is nn.BatchNorm1d


def test_convert_sync_batchnorm_dispatch() -> None:
    assert type(convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(2)))[0]) is GroupBatchNorm2d
    assert type(convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(2)), device_type="cuda")[0]) \
        is nn.SyncBatchNorm
    with pytest.raises(ValueError, match="device_type"):
        convert_sync_batchnorm(nn.BatchNorm2d(2), device_type="not-a-device")


def test_input_errors() -> None:
    bn = GroupBatchNorm2d(3)
    with pytest.raises(ValueError, match="4D"):
        bn(torch.randn(4, 3))
    with pytest.raises(ValueError, match="3 channels"):
        bn(torch.randn(4, 2, 2, 2))
    with pytest.raises(ValueError, match="more than 1 value"):
        bn(torch.randn(1, 3, 1, 1))
    assert int(bn.num_batches_tracked) == 0
    with pytest.raises(TypeError, match="ProcessGroup"):
        GroupBatchNorm2d(3, group="world")
    bn.eval()
    torch.testing.assert_close(bn(torch.ones(1, 3, 1, 1)), torch.ones(1, 3, 1, 1) / (1 + bn.eps) ** 0.5)
    with pytest.raises(TypeError, match="nn.Module"):
        convert_group_batchnorm({"weight": torch.ones(2)})  # type: ignore[arg-type]


def test_sliced_batchnorm_of_a_supernet_matches_nni_mixed_batchnorm() -> None:
    """A width-sliced MixedBatchNorm2d (NNI one-shot) converts to a sliced GroupBatchNorm2d with the same math."""
    import copy

    import nni
    from nni.nas.nn.pytorch import ModelSpace, MutableBatchNorm2d, MutableConv2d

    from nni_pipebd.executors.syncbn import is_sliced_batchnorm
    from nni_pipebd.spaces.supernet import BlockSupernet

    class Space(ModelSpace):
        def __init__(self):
            super().__init__()
            width = nni.choice("w", [2, 4])
            self.conv = MutableConv2d(3, width, 3, padding=1)
            self.bn = MutableBatchNorm2d(width)

        def forward(self, x):
            return self.bn(self.conv(x))

    torch.manual_seed(0)
    mixed = BlockSupernet(Space(), 0)
    group = convert_group_batchnorm(copy.deepcopy(mixed))
    assert is_sliced_batchnorm(mixed.bn) and type(group.bn) is GroupBatchNorm2d and group.bn.sliced
    x = torch.randn(6, 3, 5, 5)
    for width in (2, 4, 2):
        outs = []
        for net in (mixed, group):
            net.train()
            net.set_path({"w": width})
            net.zero_grad()
            outs.append(net(x))
            outs[-1].pow(3).mean().backward()
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
        for (name, a), b in zip(mixed.named_parameters(), group.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=name)
        for (name, a), b in zip(mixed.named_buffers(), group.buffers()):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert int(group.bn.num_batches_tracked) == int(mixed.bn.num_batches_tracked) == 3  # counted as nn.BatchNorm2d
    for net in (mixed, group):
        net.eval()
    torch.testing.assert_close(group(x), mixed(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="expects at most 4 channels"):
        group.bn(torch.randn(2, 5, 3, 3))


@pytest.mark.gpu(devices=2)
def test_cuda_sync_bn_in_a_two_rank_group_matches_one_device(tmp_path: Path) -> None:
    """The CUDA path (torch.nn.SyncBatchNorm over NCCL): dp on two GPUs, each half the batch, trains what one GPU
    trains on the whole batch (in float64: no TF32, and the reduction order's rounding stays far below the
    tolerance)."""
    from conftest import FP64, FP64_CLOSE, assert_same_blocks, tiny_config
    from nni_pipebd.executors.launch import train

    for workers in (1, 2):
        train(tiny_config(tmp_path, execution={"executor": "dp", "workers": workers, "device": "cuda",
                                               "deterministic": True, **FP64}), tmp_path / f"dp{workers}")
    assert_same_blocks(tmp_path / "dp1", tmp_path / "dp2", 5, **FP64_CLOSE)
