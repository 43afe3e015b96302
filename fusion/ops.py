"""Importing this module registers every `paiton::*` op (a compiled graph calls them)."""

from paiton.fusion import decode_attention, packed_linear, qk_norm_rope, rms_norm, swiglu  # noqa: F401
