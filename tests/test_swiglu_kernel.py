"""The silu_mul kernel against the eager reference, including gate/up read in place as
column slices of one merged matrix."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from paiton_testing import assert_close_ulps

from paiton.fusion import swiglu as swiglu_module
from paiton.fusion.swiglu import silu_mul_launch_config, silu_mul_reference
from paiton.fusion.triton_utils import as_rows, is_interpreted

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BLOCK = silu_mul_launch_config(32)["BLOCK"]


def test_cpu_ops_run_the_triton_kernel():
    assert DEVICE == "cuda" or is_interpreted(swiglu_module._silu_mul_kernel)


def random(shape, dtype, seed, scale=3.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator) * scale).to(dtype=dtype, device=DEVICE)


@settings(max_examples=60)
@given(
    leading=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple),
    width=st.one_of(st.integers(1, 300), st.sampled_from([BLOCK - 1, BLOCK + 1, 3 * BLOCK])),
    dtype=st.sampled_from(DTYPES),
    merged=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_silu_mul_matches_reference(leading, width, dtype, merged, seed):
    if merged:  # gate and up as the two halves of one [.., 2 * width] matmul output
        gate_up = random((*leading, 2 * width), dtype, seed)
        gate, up = gate_up[..., :width], gate_up[..., width:]
        assert as_rows(gate).data_ptr() == gate.data_ptr()  # read in place, no copy
    else:
        gate, up = random((*leading, width), dtype, seed), random((*leading, width), dtype, seed + 1)
    out = torch.ops.paiton.silu_mul(gate, up)
    assert out.is_contiguous()
    expected = silu_mul_reference(gate, up)
    if dtype == torch.float32:
        # Triton's fp32 exp (as Inductor's) is the fast hardware one: exp(-g) computed as
        # 2**(-g * log2(e)) loses |g| * 2**-24 in the exponent's rounding, a relative error
        # of about |g| ulp (seen on an H100: 15 ulp at |g| near 8); plus a few ulp of rounding.
        relative = (out.double() - expected.double()).abs() / expected.double().abs().clamp_min(1e-30)
        allowed = (8 + 2 * gate.double().abs()) * 2.0**-24
        assert (relative <= allowed).all(), f"worst {(relative / allowed).max().item():.2f} of the allowed error"
    else:
        # s = silu(gate) is rounded before the multiply: one ulp of s (2 ulp of the product, as
        # for the RMSNorm weight multiply) plus the product's own rounding. The interpreter's
        # round-toward-zero casts differ from eager's within that.
        assert_close_ulps(out, expected)


def test_rows_that_do_not_collapse_are_copied_not_misread():
    """A [B, S, I] view whose leading strides do not combine into one row stride."""
    base = random((3, 4, 2, 40), torch.float32, 0)
    gate = base[:, :, 0, :]  # stride (320, 80, 1): rows of one batch are 80 apart, batches 320
    up = random((3, 4, 40), torch.float32, 1)
    assert_close_ulps(torch.ops.paiton.silu_mul(gate, up), silu_mul_reference(gate, up))


def test_mismatched_inputs_are_a_clear_error():
    with pytest.raises(ValueError, match="one shape, dtype and device"):
        torch.ops.paiton.silu_mul(random((2, 8), torch.float32, 0), random((1, 8), torch.float32, 1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    gate_up = random((2, 3, 64), dtype, 0)
    torch.library.opcheck(torch.ops.paiton.silu_mul.default, (gate_up[..., :32], gate_up[..., 32:]))
