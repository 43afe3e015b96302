"""Importing this module registers every `paiton::*` op (a compiled graph calls them)."""

from paiton.fusion import qk_norm_rope, rms_norm, swiglu  # noqa: F401
