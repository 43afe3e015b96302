"""The RMSNorm kernels against the eager reference (Qwen3RMSNorm's code).

On CPU the ops run the Triton kernel in the interpreter (conftest sets TRITON_INTERPRET=1);
on a GPU the compiled kernel.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from paiton_testing import assert_close_ulps

from paiton.fusion import rms_norm as rms_norm_module
from paiton.fusion.rms_norm import (
    MAX_SINGLE_PASS_COLS,
    fused_add_rms_norm_reference,
    rms_norm_launch_config,
    rms_norm_reference,
)
from paiton.fusion.triton_utils import is_interpreted

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_cpu_ops_run_the_triton_kernel():
    """Guards the premise of this file: without it the tests below would compare the reference
    with itself on CPU."""
    assert DEVICE == "cuda" or is_interpreted(rms_norm_module._rms_norm_kernel)


# Leading shapes as models have them ([tokens], [batch, seq], [batch, seq, heads]) and row
# widths around and off powers of two; a few rows wide enough for the two-pass path.
leading_shapes = st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple)
widths = st.one_of(st.integers(1, 300), st.sampled_from([127, 128, 129, 1000, 1024]))
eps_values = st.sampled_from([1e-6, 1e-5, 1e-3, 0.1])


seeds = st.integers(0, 2**31 - 1)


def random_input(shape, dtype, scale=1.0, seed=None):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    values = torch.randn(shape, dtype=torch.float32, generator=generator) * scale
    return values.to(dtype=dtype, device=DEVICE)


@settings(max_examples=60)
@given(leading=leading_shapes, width=widths, dtype=st.sampled_from(DTYPES), eps=eps_values, scale=st.sampled_from([1e-3, 1.0, 30.0]), seed=seeds)
def test_rms_norm_matches_reference(leading, width, dtype, eps, scale, seed):
    torch.manual_seed(seed)
    x = random_input((*leading, width), dtype, scale)
    weight = random_input((width,), dtype)
    out = torch.ops.paiton.rms_norm(x, weight, eps)
    assert out.is_contiguous()
    assert_close_ulps(out, rms_norm_reference(x, weight, eps))


@settings(max_examples=60)
@given(leading=leading_shapes, width=widths, dtype=st.sampled_from(DTYPES), eps=eps_values, seed=seeds)
def test_fused_add_rms_norm_matches_reference(leading, width, dtype, eps, seed):
    torch.manual_seed(seed)
    x = random_input((*leading, width), dtype)
    residual = random_input((*leading, width), dtype, 4.0)
    weight = random_input((width,), dtype)
    out, summed = torch.ops.paiton.fused_add_rms_norm(x, residual, weight, eps)
    assert_close_ulps(summed, fused_add_rms_norm_reference(x, residual, weight, eps)[1], ulps=1)
    # The norm is checked on the kernel's own sum: a sum one ulp off (the interpreter's
    # round-toward-zero casts) would otherwise move every output of its row.
    assert_close_ulps(out, rms_norm_reference(summed, weight, eps))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rows_wider_than_one_block(dtype, with_residual):
    width = MAX_SINGLE_PASS_COLS + 4097  # not a multiple of the two-pass block
    assert rms_norm_launch_config(3, width)["NUM_COL_BLOCKS"] > 1
    x, weight = random_input((3, width), dtype), random_input((width,), dtype)
    if with_residual:
        residual = random_input((3, width), dtype)
        out, summed = torch.ops.paiton.fused_add_rms_norm(x, residual, weight, 1e-6)
        assert_close_ulps(summed, fused_add_rms_norm_reference(x, residual, weight, 1e-6)[1], ulps=1)
        expected_out = rms_norm_reference(summed, weight, 1e-6)
    else:
        out = torch.ops.paiton.rms_norm(x, weight, 1e-6)
        expected_out = rms_norm_reference(x, weight, 1e-6)
    assert_close_ulps(out, expected_out)


def test_non_contiguous_input_and_per_head_rows():
    """q_norm/k_norm normalize [B, S, H, D] over D; a transposed view must give the same."""
    x = random_input((2, 4, 3, 24), torch.bfloat16).transpose(1, 2)  # [B, H, S, D] view
    weight = random_input((24,), torch.bfloat16)
    assert_close_ulps(torch.ops.paiton.rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6))


def test_mixed_dtypes_promote_like_eager():
    """fp32 weight on bf16 activations: eager's `weight * y.to(bf16)` is fp32."""
    x = random_input((4, 40), torch.bfloat16)
    weight = random_input((40,), torch.float32)
    out = torch.ops.paiton.rms_norm(x, weight, 1e-6)
    assert out.dtype == torch.float32
    # y is rounded to bf16 before the fp32 multiply: one bf16 ulp of y, relative 2**-7.
    torch.testing.assert_close(out, rms_norm_reference(x, weight, 1e-6), rtol=2**-7, atol=1e-6)


def test_every_output_element_is_written():
    """Outputs come from torch.empty: NaN-poison the allocator's memory first, so an element the
    kernel skips shows up as NaN rather than a stale zero."""
    for _ in range(3):
        torch.full((64 * 257,), float("nan"), device=DEVICE).sum()
    x, residual = random_input((64, 257), torch.float16), random_input((64, 257), torch.float16)
    weight = random_input((257,), torch.float16)
    out, summed = torch.ops.paiton.fused_add_rms_norm(x, residual, weight, 1e-6)
    assert torch.isfinite(out).all() and torch.isfinite(summed).all()


def test_empty_input():
    x = torch.empty(0, 3, 64, device=DEVICE)
    assert torch.ops.paiton.rms_norm(x, torch.ones(64, device=DEVICE), 1e-6).shape == (0, 3, 64)


def test_bad_weight_shape_is_a_clear_error():
    x = random_input((2, 8), torch.float32)
    with pytest.raises(ValueError, match="weight must be 1-D with x.shape"):
        torch.ops.paiton.rms_norm(x, torch.ones(7, device=DEVICE), 1e-6)


def test_unsupported_dtypes_are_refused():
    """The kernel computes in fp32; an fp64 result would be only fp32-accurate."""
    x = random_input((2, 8), torch.float64)
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        torch.ops.paiton.rms_norm(x, torch.ones(8, dtype=torch.float64, device=DEVICE), 1e-6)


@pytest.mark.parametrize("op", ["rms_norm", "fused_add_rms_norm"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ops_pass_torch_library_opcheck(op, dtype):
    """Schema, fake (meta) implementation and real implementation agree (also on a layout with
    odd strides on a size-1 dim)."""
    x = random_input((5, 1, 40), dtype).transpose(0, 1)
    weight = random_input((40,), dtype)
    args = (x, weight, 1e-6) if op == "rms_norm" else (x, random_input((1, 5, 40), dtype), weight, 1e-6)
    torch.library.opcheck(getattr(torch.ops.paiton, op).default, args)
    outputs = getattr(torch.ops.paiton, op)(*args)
    for out in outputs if isinstance(outputs, tuple) else (outputs,):
        assert out.stride() == torch.empty(out.shape).stride()
