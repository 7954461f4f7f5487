"""Helpers of the NNI tests: tiny evaluators, an isolated NNI home, free ports, NNI manager clean-up checks."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from pathlib import Path

import psutil

from conftest import tiny_config
from nni_pipebd.nni import BlockwiseDistillation

FINETUNE = {"epochs": 1, "max_steps_per_epoch": 2, "calib_batches": 1}
RANKING = {"latency_runs": 0, "val_batches": 2, "calib_batches": 1}


def tiny_evaluator(root: Path, config=None, **kwargs) -> BlockwiseDistillation:
    """A BlockwiseDistillation over ``config`` (default: the tests' tiny job: synthetic data, digits_cnn teacher, 3
    steps per block)."""
    kwargs.setdefault("finetune", FINETUNE)
    return BlockwiseDistillation(config or tiny_config(root), str(root / "lib"), **kwargs)


def isolate_nni(tmp_path: Path, monkeypatch) -> Path:
    """Point NNI's home (experiment manifest), config dir and this process's manifest at ``tmp_path``."""
    from nni.tools.nnictl import config_utils

    home = tmp_path / "home"
    (home / "nni-experiments").mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NNI_CONFIG_DIR", str(tmp_path / "nni-config"))
    monkeypatch.setattr(config_utils.Experiments.__init__, "__defaults__", (str(home / "nni-experiments"),))
    return home


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_listening(port: int) -> bool:
    """Whether a process listens on ``port`` (connections left in TIME_WAIT do not count)."""
    return any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
               for c in psutil.net_connections(kind="tcp"))


def manager_processes(port: int) -> list:
    """NNI manager (node) processes serving ``port``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if "nni_node" in cmdline and f"--port {port}" in cmdline.replace("=", " "):
            found.append(proc)
    return found


def assert_released(port: int, timeout: float = 30.0) -> None:
    """The NNI manager of ``port`` is gone and the port is free (waits up to ``timeout``)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not manager_processes(port) and not port_listening(port):
            return
        time.sleep(0.5)
    raise AssertionError(f"port {port} still listened on or NNI manager still alive: {manager_processes(port)}")


def rest(port: int, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/nni{path}", timeout=10) as response:
        return json.loads(response.read().decode())


def final_metric(trial: dict):
    """The final metric of a trial as listed by the REST API (stored as JSON of a JSON string)."""
    data = trial["finalMetricData"][0]["data"]
    value = json.loads(data)
    return json.loads(value) if isinstance(value, str) else value
