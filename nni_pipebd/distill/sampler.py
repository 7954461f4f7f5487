"""Path sampler owned by one block, seeded from (seed, block index) — never from the global RNG."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping

import numpy as np

__all__ = ["PathSampler"]


class PathSampler:
    """Draws uniform random paths (one candidate per label) for one supernet block, SPOS/DNA style.

    Parameters
    ----------
    choices : mapping of str to list
        Label -> candidate values (names, ints, floats; empty for a fixed block: ``sample`` returns ``{}``).
    seed : int
        Run seed.
    block : int
        Block index; with ``seed`` it seeds the generator, so the paths of a block do not depend on
        which process holds it.
    """

    def __init__(self, choices: Mapping[str, List[str]], seed: int, block: int):
        self.choices = {label: list(names) for label, names in choices.items()}
        self._rng = np.random.default_rng([seed, block])

    def sample(self) -> Dict[str, Any]:
        """The next path (an NNI sample dict): label -> candidate value."""
        return {label: names[int(self._rng.integers(len(names)))] for label, names in self.choices.items()}

    def state_dict(self) -> Dict[str, Any]:
        """Generator state (plain data), for checkpoints."""
        return {"bit_generator": self._rng.bit_generator.state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`."""
        self._rng.bit_generator.state = state["bit_generator"]
