"""The nnictl trial entry point stopped as NNI stops it (SIGTERM to the trial's process tree), then resumed."""

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from conftest import assert_same_blocks, is_worker, tiny_config
from nni_pipebd.executors.launch import train
from nni_pipebd.nni import BlockwiseDistillation

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "executors"))
from test_stopping import alive, assert_no_process, checkpointed, finish, start, wait_for  # noqa: E402

pytestmark = pytest.mark.timeout(240)


def _progress(since):
    """Whether workers started after ``since`` took their roles (their rendezvous folder holds ``rank<r>.role``)."""
    import glob
    import tempfile

    roles = glob.glob(os.path.join(tempfile.gettempdir(), "nni_pipebd_rdzv_*", "rank*.role"))
    return len([r for r in roles if os.path.getmtime(r) > since]) >= 2


@pytest.mark.slow
def test_trial_stopped_by_sigterm_to_its_tree_resumes_with_reuse(tmp_path):
    config = tiny_config(tmp_path, distill={"epochs": 2, "max_steps_per_epoch": 6},
                         execution={"executor": "pipebd", "workers": 2})  # no checkpoint_every: the stop writes one
    evaluator = BlockwiseDistillation(config, str(tmp_path / "lib"), if_exists="reuse")
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"task": "distill", "evaluator": evaluator.settings()}))
    began = time.time()
    proc = start([sys.executable, "-m", "nni_pipebd.nni.trial", "--params", str(params)], tmp_path)
    try:
        wait_for(lambda: len([p for p in alive(proc.pid) if is_worker(p)]) == 2, 90,
                 "the two workers")
        wait_for(lambda: (tmp_path / "lib" / "trace.json").exists() or _progress(began), 90, "training to start")
        for p in alive(proc.pid):  # what NNI's tree-kill does on `nnictl stop` / a cancelled trial
            p.send_signal(signal.SIGTERM)
        returncode, seconds, output = finish(proc)
    finally:
        finish(proc)
    assert returncode == 143, output[-3000:]
    assert seconds < 15  # NNI SIGKILLs after 5 s: measured 2-4 s on an idle 2-core machine, up to 12 s when loaded
    assert_no_process(proc.pid)
    assert checkpointed(tmp_path / "lib", ["rank0", "rank1"])() and (tmp_path / "lib" / "checkpoints" / "config.json").is_file()
    assert not (tmp_path / "lib" / "library.json").exists()
    assert "an experiment with if_exists: reuse resumes it" in output

    evaluator.distill()  # the next experiment's distillation trial: resumes
    train(config.replace(execution={"executor": "reference", "workers": 1}), tmp_path / "whole")
    assert_same_blocks(tmp_path / "whole", tmp_path / "lib", 5, exact=True)
