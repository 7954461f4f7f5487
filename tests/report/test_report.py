import json

import pytest
import yaml

from conftest import tiny_config
from nni_pipebd.cli import main
from nni_pipebd.executors.launch import train
from nni_pipebd.report.progress import ProgressBars, ProgressWriter

pytestmark = pytest.mark.timeout(300)


def test_progress_files_and_bars(tmp_path, capsys):
    writer = ProgressWriter(str(tmp_path), rank=1, interval=0.0)
    writer.update(3, 10, "stage 1")
    assert (tmp_path / "rank1.progress").read_text() == "3 10 stage 1"
    with ProgressBars(str(tmp_path), world=2, interval=0.05) as bars:
        writer.update(10, 10, "stage 1")
    assert bars.ranks_seen == [1]
    assert "rank 1 stage 1" in capsys.readouterr().err
    ProgressWriter(None, 0).update(1, 2)  # a worker without a progress folder writes nothing


def test_report_from_a_pipebd_run(tmp_path):
    config = tiny_config(tmp_path, execution={"executor": "pipebd", "workers": 2, "boundaries": [0, 2]})
    out = tmp_path / "lib"
    train(config, out, trace=out / "trace.json", progress=True)
    from nni_pipebd.plan.plan import Plan
    Plan.from_boundaries([0, 2], 5).save(out / "plan.json")
    assert main(["report", str(out)]) == 0
    text = (out / "report" / "report.md").read_text()
    assert "pipebd" in text and "![timeline](timeline.png)" in text and "## Plan" in text
    assert "**Warning**: this block library was distilled from a randomly initialised teacher" in text
    for png in ("losses.png", "timeline.png"):
        data = (out / "report" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_demo_end_to_end_on_tiny_job(tmp_path, capsys):
    raw = tiny_config(tmp_path).to_dict()
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["-q", "demo", "--config", str(path), "--out", str(tmp_path / "demo"), "--finetune-epochs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "Pipe-BD vs DNA's dp on 2 workers" in printed and "searched architecture" in printed
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["speed"]["teacher_block_forwards_per_sample"] == {"pipebd": 5, "dp": 15}
    assert 0 <= summary["student"]["accuracy"] <= 1 and summary["architecture"]
    assert (tmp_path / "demo" / "report" / "search.png").is_file()
