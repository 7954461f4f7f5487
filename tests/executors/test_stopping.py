"""Real signals: SIGINT / SIGTERM stop a run with a checkpoint that resumes bitwise; a dead lead leaves no process."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import assert_same_blocks, tiny_config
from nni_pipebd.executors.faults import ENV
from nni_pipebd.executors.launch import train
from nni_pipebd.executors.stopping import RunStopped

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[2]
SLOW = "rank=0,step=0,kind=slow,seconds=0.4"  # rank 0 sleeps before every step: the run lasts long enough to signal


def job(tmp_path, executor="pipebd", workers=2, **execution):
    config = tiny_config(tmp_path, distill={"epochs": 2, "max_steps_per_epoch": 6},
                         execution={"executor": executor, "workers": workers, "checkpoint_every": 2, **execution})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return config, path


def start(args, tmp_path, fault=SLOW):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", ENV: fault}
    return subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def cli(*args):
    return [sys.executable, "-m", "nni_pipebd.cli", *args]


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def checkpointed(out, ranks):
    folder = Path(out) / "checkpoints"
    return lambda: folder.is_dir() and all(any(folder.glob(f"{r}_step*.pt")) for r in ranks)


def alive(session):
    """Running (not zombie) processes of the session ``session`` started."""
    found = []
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getsid(proc.pid) == session and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            pass
    return found


def finish(proc, timeout=30):
    """Wait for ``proc``; always kill what is left of its session. Returns (exit code, seconds, output)."""
    began = time.monotonic()
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, time.monotonic() - began, output
    finally:
        for leftover in alive(proc.pid):
            leftover.kill()


def assert_no_process(session, timeout=10):
    try:
        wait_for(lambda: not alive(session), timeout, "the run's processes to end")
    except AssertionError:
        raise AssertionError(f"processes left: {[(p.pid, p.cmdline()) for p in alive(session)]}") from None


def stopped_steps(out):
    names = os.listdir(Path(out) / "checkpoints")
    return {name.split("_step")[0]: max(int(n.split("_step")[1][:-3]) for n in names
                                        if n.startswith(name.split("_step")[0] + "_step"))
            for name in names if name.endswith(".pt")}


@pytest.mark.parametrize("how,sig,code", [("group", signal.SIGINT, 130), ("lead", signal.SIGTERM, 143)])
@pytest.mark.slow
def test_signal_stops_pipebd_with_checkpoint_and_resume_is_bitwise(tmp_path, how, sig, code):
    config, path = job(tmp_path)
    proc = start(cli("train", str(path), "--out", "run"), tmp_path)
    try:
        wait_for(checkpointed(tmp_path / "run", ["rank0", "rank1"]), 90, "the first checkpoints")
        os.killpg(proc.pid, sig) if how == "group" else os.kill(proc.pid, sig)
        returncode, seconds, output = finish(proc)
    finally:
        finish(proc)
    assert returncode == code, output[-3000:]
    assert seconds < 15
    assert_no_process(proc.pid)
    assert "Traceback" not in output
    assert f"stopped on {signal.Signals(sig).name} after step" in output and "--resume run" in output
    assert not (tmp_path / "run" / "library.json").exists()
    step = int(output.split("after step ")[1].split(";")[0])
    assert stopped_steps(tmp_path / "run") == {"rank0": step, "rank1": step}  # both ranks checkpointed that step

    command = output.split("continue with: ")[1].split()
    assert command[:3] == ["nni-pipebd", "train", str(path)] and command[-2:] == ["--resume", "run"]
    resumed = start(cli(*command[1:]), tmp_path, fault="")
    returncode, _, output = finish(resumed, timeout=120)
    assert returncode == 0, output[-3000:]
    train(config.replace(execution={"executor": "reference", "workers": 1}), tmp_path / "whole")
    assert_same_blocks(tmp_path / "whole", tmp_path / "run", 5, exact=True)


@pytest.mark.slow
def test_second_signal_stops_at_once(tmp_path):
    _, path = job(tmp_path, executor="dp")
    proc = start(cli("train", str(path), "--out", "run"), tmp_path, fault="rank=0,step=2,kind=slow,seconds=30")
    try:
        wait_for(checkpointed(tmp_path / "run", ["rank0", "rank1"]), 90, "the first checkpoints")
        time.sleep(1.0)  # rank 0 now sleeps inside a step: the first signal cannot be honoured soon
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(1.5)
        os.kill(proc.pid, signal.SIGTERM)
        returncode, seconds, output = finish(proc)
    finally:
        finish(proc)
    assert returncode == 143, output[-3000:]
    assert seconds < 10
    assert "stopping at once" in output and "nothing to resume" in output
    assert_no_process(proc.pid)
    assert not (tmp_path / "run" / "library.json").exists()


@pytest.mark.slow
def test_sigkill_of_the_lead_leaves_no_process(tmp_path):
    _, path = job(tmp_path)
    proc = start(cli("train", str(path), "--out", "run"), tmp_path)
    try:
        wait_for(checkpointed(tmp_path / "run", ["rank0", "rank1"]), 90, "the first checkpoints")
        assert len(alive(proc.pid)) >= 3  # the lead and two workers
        os.kill(proc.pid, signal.SIGKILL)
        began = time.monotonic()
        assert_no_process(proc.pid, timeout=10)
        assert time.monotonic() - began < 10
    finally:
        finish(proc)
    assert not (tmp_path / "run" / "library.json").exists()


@pytest.mark.slow
def test_torchrun_forwards_sigterm_and_spawn_resumes_bitwise(tmp_path):
    config, path = job(tmp_path, timeout_s=30)
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
            "nni_pipebd.cli", "train", str(path), "--out", "run"]
    proc = start(args, tmp_path)
    try:
        wait_for(checkpointed(tmp_path / "run", ["rank0", "rank1"]), 120, "the first checkpoints")
        os.kill(proc.pid, signal.SIGTERM)  # torchrun's agent forwards it to its workers
        returncode, seconds, output = finish(proc)
    finally:
        finish(proc)
    assert returncode != 0 and seconds < 25, output[-3000:]
    assert "stopped on SIGTERM after step" in output
    assert_no_process(proc.pid)
    step = int(output.split("after step ")[1].split(";")[0])
    assert stopped_steps(tmp_path / "run") == {"rank0": step, "rank1": step}
    train(config, tmp_path / "run", resume=True)
    train(config.replace(execution={"executor": "reference", "workers": 1}), tmp_path / "whole")
    assert_same_blocks(tmp_path / "whole", tmp_path / "run", 5, exact=True)


def test_in_process_reference_stops_on_sigterm_and_resumes_bitwise(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, distill={"epochs": 2, "max_steps_per_epoch": 3})  # no checkpoint_every

    def signal_at_step_2(rank, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr("nni_pipebd.executors.runtime.inject", signal_at_step_2)
    with pytest.raises(RunStopped, match="stopped on SIGTERM after step 4") as stopped:
        train(config, tmp_path / "run")
    assert stopped.value.exit_code == 143 and stopped.value.resumable
    assert not (tmp_path / "run" / "library.json").exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone with the run
    monkeypatch.undo()
    train(config, tmp_path / "run", resume=True)
    train(config, tmp_path / "whole")
    assert_same_blocks(tmp_path / "whole", tmp_path / "run", 5, exact=True)
