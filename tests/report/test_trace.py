import json

import pytest

from conftest import tiny_config
from nni_pipebd.executors.launch import train
from nni_pipebd.report.trace import Tracer, busy_fraction, write_chrome_trace


def test_tracer_records_and_disabled_costs_nothing():
    tracer = Tracer()
    with tracer.span("teacher"):
        pass
    assert [kind for _, _, kind in tracer.spans] == ["teacher"]
    off = Tracer(enabled=False)
    with off.span("teacher"):
        pass
    assert off.spans == []
    assert busy_fraction([(0.0, 1.0, "teacher"), (1.0, 3.0, "recv")], 0.0, 4.0) == 0.25


def test_chrome_trace_format(tmp_path):
    path = write_chrome_trace(tmp_path / "t.json", {0: [(10.0, 10.5, "data")], 1: [(10.2, 11.0, "recv")]},
                              {0: "stage 0", 1: "stage 1"})
    events = json.loads(path.read_text())["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M"}
    assert names == {0: "stage 0", 1: "stage 1"}
    spans = [e for e in events if e["ph"] == "X"]
    assert spans[0]["ts"] == 0 and spans[0]["dur"] == pytest.approx(5e5)
    assert spans[1]["ts"] == pytest.approx(2e5)


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_pipebd_trace_has_one_row_per_rank(tmp_path):
    config = tiny_config(tmp_path, execution={"executor": "pipebd", "workers": 2})
    manifest = train(config, tmp_path / "lib", trace=tmp_path / "trace.json")
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    rows = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M"}
    assert rows == {r["rank"]: r["label"] for r in manifest["ranks"]}
    assert rows[0].startswith("stage 0: blocks 0-") and rows[1].endswith("-4")
    kinds = {(e["tid"], e["name"]) for e in events if e["ph"] == "X"}
    assert {(0, "data"), (0, "teacher"), (0, "send"), (0, "student"), (1, "recv"), (1, "student")} <= kinds
    assert all(0 < r["busy_fraction"] <= 1 for r in manifest["ranks"])
