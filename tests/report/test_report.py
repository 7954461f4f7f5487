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


@pytest.mark.slow
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


@pytest.mark.slow
def test_demo_end_to_end_on_tiny_job(tmp_path, capsys):
    raw = tiny_config(tmp_path).to_dict()
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["-q", "demo", "--config", str(path), "--out", str(tmp_path / "demo"), "--finetune-epochs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "Pipe-BD vs DNA's dp on 2 workers, same work (1 epoch per block, until: epochs" in printed
    assert "searched architecture" in printed and "x the teacher's**" in printed and "logs:" in printed
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["speed"]["teacher_block_forwards_per_sample"] == {"pipebd": 5, "dp": 15}
    student, teacher = summary["student"], summary["teacher"]
    assert 0 <= student["accuracy"] <= 1 and summary["architecture"]
    assert student["fraction_of_teacher_from_library"] == pytest.approx(
        student["accuracy_from_library"] / teacher["accuracy"])
    assert student["accuracy_gap_points"] == pytest.approx(100 * (teacher["accuracy"] - student["accuracy"]))
    assert student["params_ratio"] == pytest.approx(student["params"] / teacher["params"])
    assert [s["block"] for s in summary["library"]["stops"]] == list(range(5))
    assert set(summary["times_s"]) == {"teacher", "library", "speed", "ranking", "search", "finetune", "report"}
    for run in ("library", "speed/pipebd", "speed/dp"):
        assert (tmp_path / "demo" / run / "library.json").is_file()
    assert (tmp_path / "demo" / "report" / "search.png").is_file()
