"""Per-block convergence: a plateau of the epoch loss, decided alike from the same losses."""

import pytest

from nni_pipebd.distill.convergence import plateaued


@pytest.mark.parametrize("losses, patience, threshold, expected", [
    ([1.0], 1, 0.01, False),                        # nothing to compare with yet
    ([1.0, 0.995], 1, 0.01, True),                  # 0.5% better: not an improvement at 1%
    ([1.0, 0.98], 1, 0.01, False),                  # 2% better
    ([1.0, 0.5, 0.6, 0.49], 2, 0.01, False),        # the last epoch improves on the best before the window
    ([1.0, 0.5, 0.6, 0.499], 2, 0.01, True),
    ([1.0, 0.5, 0.6, 0.499], 3, 0.01, False),       # patience not yet exhausted
    ([1.0, 1.0, 1.0], 2, 0.0, True),                # equal is no improvement, even at threshold 0
])
def test_plateau(losses, patience, threshold, expected):
    assert plateaued(losses, patience, threshold) is expected
