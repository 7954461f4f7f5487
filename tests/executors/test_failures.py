"""A dead worker stops the others within a bounded time and the error names rank, stage, blocks and cause."""

import time

import psutil
import pytest

from conftest import is_worker, tiny_config
from nni_pipebd.distill.trainer import NonFiniteLossError
from nni_pipebd.executors.faults import ENV
from nni_pipebd.executors.launch import WorkerError, train

pytestmark = pytest.mark.timeout(180)


def workers():
    """Live worker processes (not the fork server, nor multiprocessing's resource tracker)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and is_worker(p):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.mark.parametrize("kind,cause", [
    ("raise", r"failed: InjectedFault: injected fault at rank 1, step 2"),
    ("kill", r"died \(signal 9\) — killed, out of memory or crashed"),
])
@pytest.mark.slow
def test_dead_pipebd_stage_stops_everyone(tmp_path, monkeypatch, kind, cause):
    config = tiny_config(tmp_path, distill={"max_steps_per_epoch": 6},
                         execution={"executor": "pipebd", "workers": 2, "boundaries": [0, 3],
                                    "checkpoint_every": 2})
    before = set(p.pid for p in workers())
    monkeypatch.setenv(ENV, f"rank=1,step=2,kind={kind}")
    start = time.monotonic()
    with pytest.raises(WorkerError, match=rf"worker rank 1 of 2 \(stage 1: blocks 3-4\) {cause}.*stopped.*--resume"):
        train(config, tmp_path / "out")
    assert time.monotonic() - start < 60  # includes starting the workers; the stop itself takes seconds
    assert not (tmp_path / "out" / "library.json").exists()
    leftover = [p for p in workers() if p.pid not in before]
    assert leftover == [], f"orphan processes: {leftover}"


def test_nan_loss_stops_with_block_and_step(tmp_path):
    config = tiny_config(tmp_path, distill={"lr": 1e30, "max_steps_per_epoch": 6})
    with pytest.raises(NonFiniteLossError, match=r"block \d: loss is (nan|inf) at step \d"):
        train(config, tmp_path / "out")
    assert not (tmp_path / "out" / "library.json").exists()


def test_nan_loss_skip_option_keeps_training(tmp_path, caplog):
    config = tiny_config(tmp_path, distill={"lr": 1e30, "max_steps_per_epoch": 4, "on_nonfinite": "skip"})
    manifest = train(config, tmp_path / "out")
    assert "update skipped" in caplog.text
    assert manifest["num_blocks"] == 5


def test_wait_fault_blocks_until_its_file_exists(tmp_path, monkeypatch):
    """``kind=wait``: the named rank and step block until the file appears (a test writes it after its signal), and
    fail, naming the file, when it never does."""
    import threading

    from nni_pipebd.executors.faults import InjectedFault, inject

    go = tmp_path / "go"
    monkeypatch.setenv(ENV, f"rank=0,step=1,kind=wait,file={go},seconds=30")
    inject(0, 0)
    inject(1, 1)  # other steps and ranks go on at once
    threading.Timer(0.3, go.write_text, ("",)).start()
    start = time.monotonic()
    inject(0, 1)
    assert go.exists() and time.monotonic() - start >= 0.25
    monkeypatch.setenv(ENV, f"rank=0,step=1,kind=wait,file={tmp_path / 'never'},seconds=0.1")
    with pytest.raises(InjectedFault, match=r"injected wait at rank 0, step 1: .*never did not appear within 0.1 s"):
        inject(0, 1)
    monkeypatch.setenv(ENV, "rank=0,step=1,kind=wait")
    with pytest.raises(ValueError, match="kind=wait needs file=PATH"):
        inject(0, 1)
