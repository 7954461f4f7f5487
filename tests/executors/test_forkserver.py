"""Workers fork from a warm server: reused across runs, with each run's environment, and computing alike."""

import os
import signal
from pathlib import Path

import psutil
import pytest

from conftest import assert_same_blocks, tiny_config
from nni_pipebd.executors.forkserver import ENV, server_pid, start_method, start_server
from nni_pipebd.executors.launch import train
from nni_pipebd.executors.processes import run_processes

pytestmark = pytest.mark.timeout(240)


def _report(rank, world, folder):
    """A worker: write what it inherited (its parent, an environment variable, its signal dispositions)."""
    Path(folder, f"rank{rank}.json").write_text(repr({
        "parent": os.getppid(), "marker": os.environ.get("NNI_PIPEBD_TEST_MARKER"),
        "sigint": signal.getsignal(signal.SIGINT) == signal.SIG_IGN,
        "sigterm": signal.getsignal(signal.SIGTERM) == signal.SIG_IGN}))


@pytest.mark.slow
def test_workers_fork_from_one_server_with_the_environment_of_their_run(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert start_method() == "forkserver"
    server = start_server()
    assert server == server_pid() and psutil.Process(server).parent().pid == os.getpid()
    for run, marker in enumerate(("first", "second")):
        folder = tmp_path / str(run)
        folder.mkdir()
        monkeypatch.setenv("NNI_PIPEBD_TEST_MARKER", marker)  # set after the server started
        run_processes(_report, 2, (str(folder),), str(folder))
        for rank in range(2):
            seen = eval(Path(folder, f"rank{rank}.json").read_text())
            assert seen["parent"] == server, "the worker was not forked by the server"
            assert seen["marker"] == marker, "the worker did not get the environment of its run"
            assert seen["sigint"] and seen["sigterm"], "the worker must start with SIGINT / SIGTERM ignored"
    assert start_server() == server  # one server for every run of this process


@pytest.mark.slow
def test_spawned_and_forked_workers_train_the_same_weights(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, execution={"executor": "pipebd", "workers": 2})
    train(config, tmp_path / "forked")
    monkeypatch.setenv(ENV, "spawn")
    train(config, tmp_path / "spawned")
    assert_same_blocks(tmp_path / "forked", tmp_path / "spawned", 5, exact=True)


def test_unknown_start_method_is_named(monkeypatch):
    monkeypatch.setenv(ENV, "fork")
    with pytest.raises(ValueError, match=r"NNI_PIPEBD_START_METHOD = 'fork' is not valid; choose one of "
                                         r"\['forkserver', 'spawn'\]"):
        start_method()


def test_the_server_starts_only_for_runs_with_worker_processes(monkeypatch):
    from nni_pipebd.executors import forkserver

    started = []
    monkeypatch.setattr(forkserver, "start_server", lambda: started.append(True))
    for executor, workers, expected in (("reference", 1, False), ("pipebd", 1, True), ("dp", 2, True),
                                        ("ls", 3, True)):
        started.clear()
        forkserver.start_server_for(executor, workers)
        assert bool(started) is expected, (executor, workers)
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29500")):
        monkeypatch.setenv(key, value)
    started.clear()
    forkserver.start_server_for("pipebd", 2)  # a torchrun rank: its workers are torchrun's
    assert not started
