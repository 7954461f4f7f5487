"""Two torchrun agents on this machine as two nodes (c10d rendezvous on 127.0.0.1) train the one-node library."""

import socket
import sys

import pytest
import yaml

from conftest import assert_same_blocks, tiny_config
from nni_pipebd.executors.launch import train

pytestmark = pytest.mark.timeout(300)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_train_the_library_of_one(tmp_path, executor="pipebd"):
    from test_stopping import finish, start

    config = tiny_config(tmp_path, execution={"executor": executor, "workers": 2, "timeout_s": 60})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    endpoint = f"127.0.0.1:{free_port()}"
    agents = []
    for node in range(2):
        args = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "nni-pipebd-test",
                "--rdzv-conf", f"is_host={node == 0},join_timeout=120", "--max-restarts", "0",
                "-m", "nni_pipebd.cli", "train", str(path), "--out", str(tmp_path / "nodes")]
        agents.append(start(args, tmp_path, fault=""))
    results = [finish(agent, timeout=240) for agent in agents]
    for returncode, _, output in results:
        assert returncode == 0, output[-3000:]
    manifest = yaml.safe_load((tmp_path / "nodes" / "library.json").read_text())
    assert manifest["workers"] == 2 and manifest["executor"] == executor
    train(config, tmp_path / "one")
    assert_same_blocks(tmp_path / "one", tmp_path / "nodes", 5, exact=True)
