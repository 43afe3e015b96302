"""Importing this module registers every `paiton::*` op (a compiled graph calls them), and
`register_inductor_fallbacks` hands them to Inductor as fallback kernels up front."""

from __future__ import annotations

import torch

from paiton.fusion import (  # noqa: F401
    all_reduce_add_rms_norm,
    decode_attention,
    fp8_linear,
    norm_linear,
    packed_linear,
    qk_norm_rope,
    rms_norm,
    swiglu,
)


def paiton_op_overloads() -> list[torch._ops.OpOverload]:
    """Every registered `paiton::*` op overload."""
    overloads = []
    for schema in torch._C._jit_get_all_schemas():
        namespace, _, name = schema.name.partition("::")
        if namespace == "paiton":
            overloads.append(getattr(getattr(torch.ops.paiton, name), schema.overload_name or "default"))
    return overloads


def register_inductor_fallbacks() -> int:
    """Register each `paiton::*` op with Inductor as a fallback kernel (the op runs as it is,
    its inputs laid out as the op's layout tag asks, custom ops' default: the traced strides),
    which is what Inductor does by itself at an op's first lowering, with one difference: there,
    torch 2.11 first formats the op's arguments for a log line it may never print, whether
    or not that log is on (torch 2.13 formats it lazily). Formatting an argument prints the IR
    behind it, and behind the first fp8_linear's input of a Qwen3 graph that took minutes:
    stack samples of the H200 compiling Qwen3-8B and -32B decode graphs at 27bf6de spent 2 to
    2.5 of their 2.5 to 4 minutes in ir.py's __str__ under that call (exc.py operator_str).
    Returns how many ops it registered (0 once all are)."""
    from torch._inductor import lowering

    try:
        from torch._library.utils import get_layout_constraint_tag
    except ImportError:  # a torch without layout tags: leave the ops to Inductor's own path
        return 0
    registered = 0
    for op in paiton_op_overloads():
        if op in lowering.lowerings:
            continue
        constraint = lowering.tag_to_layout_constraint(get_layout_constraint_tag(op, with_default=True))
        lowering.make_fallback(op, layout_constraint=constraint, warn=False)
        registered += 1
    return registered
