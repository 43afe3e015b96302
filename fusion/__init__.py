"""Triton kernels and the torch.library ops (paiton::*) that wrap them, with CPU references."""
