"""Paiton: a torch.compile backend that fuses Qwen3's subgraphs into Triton kernels.

    import torch
    compiled = torch.compile(model, backend="paiton")   # no `import paiton` needed
    compiled(input_ids)
    import paiton; paiton.fusion_counts(compiled)          # which fusions fired

This module and the sub-packages' `__init__` import nothing heavy: `TORCH_LOGS="+paiton"`
makes torch import them while torch itself is still importing.
"""

__version__ = "0.1.0"

_LAZY = {
    "paiton_backend": "paiton.backends.paiton_backend",
    "fusion_counts": "paiton.backends.fusion_report",
    "fusion_graphs": "paiton.backends.fusion_report",
    "PaitonOptionError": "paiton.backends.options",
    "PASS_NAMES": "paiton.passes.pass_manager",
    "quantize_fp8": "paiton.models.fp8",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'paiton' has no attribute {name!r}")
