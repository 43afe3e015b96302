"""Importing this module registers every `paiton::*` op (a compiled graph calls them)."""

from paiton.fusion import rms_norm, swiglu  # noqa: F401
