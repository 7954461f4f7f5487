import pytest

from conftest import tiny_config
from nni_pipebd.executors.base import executor_names, get_executor
from nni_pipebd.executors.launch import train


def test_unknown_executor_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown executor 'gpipe'; valid: \['dp', 'ls', 'pipebd', 'reference'\]"):
        get_executor("gpipe")
    assert {"reference", "dp"} <= set(executor_names())


def test_reference_refuses_several_workers(tmp_path):
    with pytest.raises(ValueError, match="reference executor runs on 1 worker, not 2"):
        train(tiny_config(tmp_path, execution={"workers": 2}), tmp_path / "out")


def test_dp_refuses_more_workers_than_batch(tmp_path):
    config = tiny_config(tmp_path, data={"batch_size": 2}, execution={"executor": "dp", "workers": 3})
    with pytest.raises(ValueError, match="batch_size 2 < workers 3"):
        train(config, tmp_path / "out")


def test_existing_library_is_kept_unless_overwrite(tmp_path):
    config = tiny_config(tmp_path, distill={"max_steps_per_epoch": 1})
    out = tmp_path / "lib"
    first = train(config, out)
    assert sorted(p.name for p in out.iterdir()) == ["block_0.pt", "block_1.pt", "block_2.pt", "block_3.pt",
                                                     "block_4.pt", "library.json", "logs"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        train(config, out)
    second = train(config, out, overwrite=True)
    assert second["blocks"] == first["blocks"]


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_dp_under_torchrun_matches_spawn(tmp_path):
    """env:// rendezvous as torchrun sets it up (multi-node capable); same library as local spawn."""
    import subprocess
    import sys

    import yaml

    from conftest import assert_same_blocks

    config = tiny_config(tmp_path, execution={"executor": "dp", "workers": 2})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    train(config, tmp_path / "spawned")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "nni_pipebd.cli", "train", str(path), "--out", str(tmp_path / "torchrun")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_blocks(tmp_path / "spawned", tmp_path / "torchrun", 5, exact=True)


def test_pipebd_and_ls_refuse_more_workers_than_blocks(tmp_path):
    for name in ("pipebd", "ls"):
        config = tiny_config(tmp_path, execution={"executor": name, "workers": 6})
        with pytest.raises(ValueError, match=f"{name} .*6 workers > 5 blocks"):
            train(config, tmp_path / name)
        assert not (tmp_path / name / "library.json").exists()


def test_pipebd_bad_boundaries_named(tmp_path):
    config = tiny_config(tmp_path, execution={"executor": "pipebd", "workers": 2, "boundaries": [0, 7]})
    with pytest.raises(ValueError, match=r"boundaries \[0, 7\] must start at 0.*below the 5 blocks"):
        train(config, tmp_path / "out")


def test_port_in_use_is_named(tmp_path, monkeypatch):
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        config = tiny_config(tmp_path, execution={"executor": "dp", "timeout_s": 20})
        with pytest.raises(RuntimeError, match=rf"could not join the process group at 127.0.0.1:{port}.*in use"):
            train(config, tmp_path / "out")
        assert not (tmp_path / "out" / "library.json").exists()
    finally:
        holder.close()


def test_one_thread_rule_wherever_a_worker_runs(tmp_path, monkeypatch):
    """threads_per_worker when set, else the machine's cores shared by its workers: in the lead (the in-process
    reference) as in spawned, forked and torchrun workers."""
    import os

    import torch

    from nni_pipebd.executors import launch
    from nni_pipebd.executors.processes import worker_threads

    cores = os.cpu_count() or 1
    assert worker_threads(tiny_config(tmp_path, execution={"threads_per_worker": 3}), 2) == 3
    assert worker_threads(tiny_config(tmp_path, execution={"threads_per_worker": None}), 2) == max(1, cores // 2)
    assert worker_threads(tiny_config(tmp_path, execution={"threads_per_worker": None}), 64) == 1
    seen = []
    build = launch.build_job
    monkeypatch.setattr(launch, "build_job", lambda config: seen.append(torch.get_num_threads()) or build(config))
    before = torch.get_num_threads()
    train(tiny_config(tmp_path, execution={"threads_per_worker": None}), tmp_path / "ref")
    assert seen == [cores] and torch.get_num_threads() == before  # the reference ran on all cores, then gave back
