"""Precision names, memory formats and the wire dtype of packed feeds."""

import pytest
import torch

from nni_pipebd.executors.runtime import _pack, _unpack
from nni_pipebd.precision import (autocast, autocast_dtype, cast_dtype, check_precision, formatted, needs_scaler,
                                  wire_dtype)


def test_names_and_their_autocast():
    assert [autocast_dtype(p) for p in ("fp32", "bf16", "fp16", "fp64")] == [None, torch.bfloat16, torch.float16, None]
    assert [cast_dtype(p) for p in ("fp32", "bf16", "fp16", "fp64")] == [None, None, None, torch.float64]
    assert needs_scaler("fp16") and not any(needs_scaler(p) for p in ("bf16", "fp32", "fp64"))
    with autocast("bf16", "cpu"):
        assert torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.bfloat16
    with autocast("fp32", "cpu"):
        assert torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.float32
    with pytest.raises(ValueError, match=r"unknown precision 'half'; choose one of \['fp32', 'bf16', 'fp16', 'fp64'\]"):
        autocast_dtype("half")
    with pytest.raises(ValueError, match=r"unknown precision 'double'"):
        cast_dtype("double")
    check_precision("fp16", "cuda")
    check_precision("bf16", "cpu")
    check_precision("fp64", "cpu")
    check_precision("fp64", "cuda")
    with pytest.raises(ValueError, match=r"'fp16' needs CUDA, but execution\.device gives cpu; use precision: bf16"):
        check_precision("fp16", torch.device("cpu"))


def test_formatted_changes_layout_never_values():
    x = torch.randn(2, 3, 4, 5)
    cl = formatted(x, True)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, x)
    assert formatted(cl, False).is_contiguous() and torch.equal(formatted(cl, False), x)
    assert formatted(x, False) is x  # already plain: no copy
    flat = torch.randn(2, 6)
    assert formatted(flat, True) is flat  # only 4-D tensors have a channels_last layout


@pytest.mark.parametrize("dtype_in,dtype_out,wire", [
    (torch.float32, torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),  # bf16 relays travel in half the bytes
    (torch.bfloat16, torch.float16, torch.float32),
    (torch.float16, torch.float32, torch.float32),
    (torch.float64, torch.float64, torch.float64),  # fp64 relays and feeds stay float64
])
def test_feeds_keep_each_half_in_its_own_dtype_bit_for_bit(dtype_in, dtype_out, wire):
    assert wire_dtype(dtype_in, dtype_out) == wire
    x = (torch.randn(3, 2, 4, 4) * 1e3).to(dtype_in).contiguous(memory_format=torch.channels_last)
    y = (torch.randn(3, 5) * 1e-3).to(dtype_out)
    packed = _pack(x, y, wire)
    assert packed.dtype == wire and packed.shape == (3, 2 * 16 + 5)
    a, b = _unpack(packed, (2, 4, 4), (5,), dtype_in, dtype_out)
    assert a.dtype == dtype_in and b.dtype == dtype_out
    assert torch.equal(a, x) and torch.equal(b, y)
