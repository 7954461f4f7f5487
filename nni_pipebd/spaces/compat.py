"""NNI 3.0 workarounds: ``Repeat`` sampled at depth 0, mixed operators frozen without a bias, mixed BatchNorm
following its module's momentum, mixed LayerNorm sliced as torch wants, mutables that survive pickling."""

from __future__ import annotations

from typing import Any, Callable, List

from nni.mutable import mutable as mutable_module
from nni.nas.oneshot.pytorch.supermodule import operation
from nni.nas.oneshot.pytorch.supermodule.sampling import PathSamplingRepeat

__all__ = ["ZeroDepthPathSamplingRepeat", "MixedLinear", "MixedConv2d", "MixedBatchNorm2d", "MixedLayerNorm",
           "MixedMultiHeadAttention", "supernet_hooks"]


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

class _FreezeWithoutNone:
    """NNI's ``MixedOperation.freeze`` without the entries ``freeze_weight`` gives as ``None``.

    NNI 3.0 loads ``freeze_weight``'s dict into the frozen operator, ``None`` included, so an operator built without
    a bias (``MutableConv2d(..., bias=False)``, the usual conv before a BatchNorm) or without affine weights fails
    with ``Unexpected key(s) in state_dict: "bias"``. The frozen operator lacks those parameters anyway.
    """

    def freeze(self, sample: Any) -> Any:
        arguments = {**self.init_arguments}
        for name, mutable in self.mutable_arguments.items():
            arguments[name] = mutable.freeze(sample)
        frozen = self.bound_type(**arguments)
        frozen.load_state_dict({k: v for k, v in self.freeze_weight(**arguments).items() if v is not None})
        return frozen


class MixedLinear(_FreezeWithoutNone, operation.MixedLinear):
    """NNI's ``MixedLinear``; frozen also without a bias."""


class MixedConv2d(_FreezeWithoutNone, operation.MixedConv2d):
    """NNI's ``MixedConv2d``; frozen also without a bias."""


class MixedBatchNorm2d(_FreezeWithoutNone, operation.MixedBatchNorm2d):
    """NNI's ``MixedBatchNorm2d``; also without affine weights or running statistics (NNI slices ``None``), and
    updating its statistics as ``nn.BatchNorm2d`` does.

    NNI 3.0 passes the constructor's momentum to ``F.batch_norm`` and never counts ``num_batches_tracked``, so
    setting ``momentum = None`` (a cumulative average, as BN recalibration before ranking does) still gives an
    exponential average that starts from the reset statistics. Here, like ``nn.BatchNorm2d``, a training forward
    counts the batch and uses ``self.momentum``, or ``1 / num_batches_tracked`` when it is ``None``; with the
    momentum unchanged the arithmetic is NNI's.
    """

    def forward_with_args(self, num_features: Any, eps: float, momentum: Any, inputs: Any) -> Any:
        if isinstance(momentum, dict):
            return super().forward_with_args(num_features, eps, momentum, inputs)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        return super().forward_with_args(num_features, eps, factor, inputs)

    def freeze_weight(self, num_features: Any, **kwargs: Any) -> Any:
        width = self.num_features if isinstance(num_features, dict) else num_features
        return {name: None if tensor is None else tensor[:width]
                for name, tensor in (("weight", self.weight), ("bias", self.bias),
                                     ("running_mean", self.running_mean), ("running_var", self.running_var))}


class MixedLayerNorm(_FreezeWithoutNone, operation.MixedLayerNorm):
    """NNI's ``MixedLayerNorm``; frozen also without affine weights, and sliced with a tuple of slices.

    NNI 3.0 indexes its weight with a *list* of slices (``self.weight[[slice(0, n)]]``), which torch deprecates (a
    warning on every forward; "will be interpreted as tensor index"). The slices are the same here, as a tuple.
    """

    def _freeze_weight_impl(self, normalized_shape: Any, **kwargs: Any) -> Any:
        if isinstance(normalized_shape, dict):
            normalized_shape = self.normalized_shape
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        indices = tuple(slice(0, min(i, j)) for i, j in zip(normalized_shape, self.normalized_shape))
        weight = self.weight[indices] if self.weight is not None else None
        bias = self.bias[indices] if self.bias is not None else None
        return {"weight": weight, "bias": bias, "normalized_shape": normalized_shape}


class MixedMultiHeadAttention(_FreezeWithoutNone, operation.MixedMultiHeadAttention):
    """NNI's ``MixedMultiHeadAttention``; frozen also without biases."""


def supernet_hooks() -> List[Callable[..., Any]]:
    """Mutation hooks that go before NNI's defaults in ``RandomOneShot(mutation_hooks=...)``."""
    mixed = [MixedLinear, MixedConv2d, MixedBatchNorm2d, MixedLayerNorm, MixedMultiHeadAttention]
    return [ZeroDepthPathSamplingRepeat.mutate, *(op.mutate for op in mixed)]


def _keep_missing_sentinel(self: Any, state: dict) -> None:
    """Unpickle a mutable with NNI's "no default" sentinel intact.

    NNI 3.0 marks "no default value" with the string ``MISSING = '__missing__'`` and tests it by identity
    (``default_value is not MISSING``); an unpickled copy of that string is another object, so every mutable of a
    space loaded with ``torch.load`` claimed a default and failed on its first sample ("Default value is specified to
    be __missing__"). This ``__setstate__`` puts the sentinel itself back.
    """
    self.__dict__.update(state)
    if self.__dict__.get("default_value") == mutable_module.MISSING:
        self.__dict__["default_value"] = mutable_module.MISSING


if not hasattr(mutable_module.Mutable, "__setstate__") or \
        mutable_module.Mutable.__setstate__ is object.__setstate__:  # NNI 3.0 defines none: add ours once
    mutable_module.Mutable.__setstate__ = _keep_missing_sentinel
