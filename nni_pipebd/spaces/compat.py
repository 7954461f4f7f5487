"""NNI 3.0 one-shot supernet workarounds: a mutable ``Repeat`` that may be sampled at depth 0."""

from __future__ import annotations

from typing import Any, Callable, List

from nni.nas.oneshot.pytorch.supermodule.sampling import PathSamplingRepeat

__all__ = ["ZeroDepthPathSamplingRepeat", "supernet_hooks"]


class ZeroDepthPathSamplingRepeat(PathSamplingRepeat):
    """NNI's path-sampling ``Repeat``, also at depth 0 (the identity, as ``Repeat.freeze`` gives ``Sequential()``).

    NNI 3.0's ``PathSamplingRepeat.forward`` runs the first block even when the sampled depth is 0, then fails in
    ``_expression_utils.weighted_sum`` with an ``AssertionError`` (nothing to sum). Here depth 0 returns the input
    untouched and no block runs, so no BatchNorm statistics of an unused block move either. Every other depth (and a
    list of depths, summed as NNI does) is NNI's own forward.
    """

    def forward(self, x: Any) -> Any:
        sampled = self._sampled
        if sampled is None:
            raise RuntimeError(f"Repeat {self.label!r}: no depth sampled; call resample(memo) (or the block's "
                               "set_path(sample)) before forward")
        depths = sampled if isinstance(sampled, list) else [sampled]
        if 0 not in depths:
            return super().forward(x)
        others = [d for d in depths if d != 0]
        if not others:
            return x
        self._sampled = others  # several depths summed, one of them the identity
        try:
            return x + super().forward(x)
        finally:
            self._sampled = sampled

def supernet_hooks() -> List[Callable[..., Any]]:
    """Mutation hooks that go before NNI's defaults in ``RandomOneShot(mutation_hooks=...)``."""
    return [ZeroDepthPathSamplingRepeat.mutate]
