"""Importing this module registers every `paiton::*` op (a compiled graph calls them)."""

from paiton.fusion import decode_attention, qk_norm_rope, rms_norm, swiglu  # noqa: F401
