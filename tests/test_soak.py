"""Short soak: resident memory of Pipe-BD workers stays flat over epochs (benchmarks/soak.py runs it long)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from soak import soak  # noqa: E402


@pytest.mark.timeout(240)
@pytest.mark.slow
def test_rss_does_not_grow_over_epochs():
    result = soak(epochs=10, workers=2, steps=4)
    assert len(result["ranks"]) == 2
    for rank in result["ranks"]:
        assert len(rank["rss_mb_per_epoch"]) == 10
        assert rank["growth_after_epoch_1_mb"] < 30, rank
