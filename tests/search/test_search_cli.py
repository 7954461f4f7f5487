"""`nni-pipebd search` and `nni-pipebd finetune` end to end, and their error messages."""

import json

import pytest

from conftest import tiny_config
from nni_pipebd.cli import main
from nni_pipebd.executors.launch import train


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    train(tiny_config(root), root / "lib")
    return root / "lib"


@pytest.mark.slow  # runs long (over a second here)
def test_search_then_finetune(library, tmp_path, capsys):
    archs = tmp_path / "archs.json"
    assert main(["search", str(library), "--method", "dna", "--budget", "params=1M", "--top-k", "2",
                 "--latency-runs", "1", "--out", str(archs), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads(archs.read_text())
    assert printed == saved and saved["method"] == "dna" and saved["budget"] == "params=1e+06"
    assert len(saved["architectures"]) == 2
    assert saved["architectures"][0]["score"] <= saved["architectures"][1]["score"]
    assert (library / "scores.json").is_file()
    assert main(["finetune", str(library), "--arch", str(archs), "--epochs", "1", "--max-steps", "2",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sample"] == saved["architectures"][0]["sample"]
    assert (library / f"finetune_{result['id']}.json").is_file()
    assert 0 <= result["student"]["val_accuracy"] <= 1


@pytest.mark.slow  # runs long (over a second here)
def test_search_donna(library, tmp_path, capsys):
    assert main(["search", str(library), "--method", "donna", "--budget", "params=1M", "--predictor-archs", "3",
                 "--latency-runs", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "donna" and len(result["predictor"]["predictor"]["coef"]) == 4
    accs = [a["predicted_accuracy"] for a in result["architectures"]]
    assert accs and accs == sorted(accs, reverse=True)
    assert (library / "predictor.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["--budget", "params:5"], "is not METRIC=VALUE"),
    (["--budget", "speed=5"], "unknown metric 'speed'"),
    (["--budget", "params=10"], "raise the budget to at least params="),
    (["--budget", "params=1M", "--top-k", "0"], "top-k = 0"),
])
def test_search_errors_exit_2(library, caplog, args, message):
    assert main(["search", str(library), "--latency-runs", "0", *args]) == 2
    assert message in caplog.text


def test_finetune_errors_exit_2(library, tmp_path, caplog):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"s0_i0": "k3e2", "bogus": "k3e2"}))
    assert main(["finetune", str(library), "--arch", str(bad)]) == 2
    assert "unknown labels ['bogus']" in caplog.text and "missing labels ['s1_i0'" in caplog.text
    assert main(["finetune", str(library)]) == 2
    assert "give --arch ARCH.json" in caplog.text
    assert main(["finetune", str(tmp_path / "nowhere"), "--arch", str(bad)]) == 2
    assert "holds no library.json" in caplog.text
