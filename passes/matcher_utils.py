"""Register a fusion as two plain PyTorch functions: the subgraph to find and its replacement.

Built on Inductor's pattern machinery (`fwd_only`, `fx_to_pattern`, `register_graph_pattern`,
`Match.replace_by_example`). What this adds over `register_replacement`:

* **Strict literals.** `register_replacement` matches every int/float/list/dtype literal as a
  wildcard first and re-traces the search function on each match to check them. Here the
  pattern is traced once and every literal is part of it: `pow(x, 2)` does not match
  `pow(x, 3)`, `mean(x, [-1])` does not match `mean(x, [1])`, a cast to float32 does not
  match a cast to float64. This keeps near-miss graphs alone and makes no trace per match.
* **Distinct outputs.** Inductor's multi-output matching may bind two outputs of a pattern to
  the same subgraph; such a match is rejected.
* **No extra keyword arguments.** Inductor's matcher compares only the keyword arguments the
  pattern has and ignores the others, so `add(x, r, alpha=2)` would match a traced `x + r`.
  A match is rejected when any of its nodes has a keyword argument its pattern node lacks.
* **Scalars read from the graph.** Arguments named in `scalars` (eps) are traced with a
  sentinel value that `fx_to_pattern` turns into a `KeywordArg`, so the match captures the
  graph's own value (any value) and the replacement receives it. The sentinel exists only at
  registration; registration fails loudly if it does not land in the pattern.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch._inductor.pattern_matcher import (
    Match,
    PatternMatcherPass,
    fwd_only,
    fx_to_pattern,
    register_graph_pattern,
)

# Values no Qwen3 subgraph contains as a literal; they stand in for scalar arguments while the
# search function is traced.
_SCALAR_SENTINELS = (0.0123456789, 0.0234567891, 0.0345678912)


def register_fusion(
    pm_pass: PatternMatcherPass,
    search_fn: Callable[..., Any],
    replace_fn: Callable[..., Any],
    example_inputs: Sequence[torch.Tensor],
    *,
    scalars: Sequence[str] = (),
    extra_check: Callable[[Match], bool] = lambda match: True,
) -> None:
    """Match `search_fn` in ATen graphs and replace it by `replace_fn`.

    `search_fn` and `replace_fn` take the same arguments: the tensors of `example_inputs`
    (in order) and the scalar arguments named in `scalars`, in the order of `search_fn`'s
    signature. `example_inputs` fix the dtypes (casts are traced as literals); ranks and
    sizes are free unless the pattern's ops spell them out (the extra check decides). If `search_fn` returns a
    tuple, `replace_fn` returns one of the same length and each output's users move over.
    """
    argnames = list(inspect.signature(search_fn).parameters)
    if list(inspect.signature(replace_fn).parameters) != argnames:
        raise TypeError(f"{replace_fn.__name__} must take the arguments of {search_fn.__name__}: {argnames}")
    if len(scalars) > len(_SCALAR_SENTINELS):
        raise ValueError(f"at most {len(_SCALAR_SENTINELS)} scalar arguments per pattern")
    sentinels = dict(zip(scalars, _SCALAR_SENTINELS))
    tensors = iter(example_inputs)
    trace_args = [sentinels[name] if name in sentinels else next(tensors) for name in argnames]

    search_gm = fwd_only(search_fn, trace_args)
    _check_sentinels_landed(search_gm, sentinels, search_fn)
    pattern = fx_to_pattern(search_gm, argnames=argnames, scalar_workaround=sentinels)
    allowed_kwargs: dict[Any, set[str]] = {}
    for node in search_gm.graph.nodes:
        if node.op == "call_function":
            allowed_kwargs.setdefault(node.target, set()).update(node.kwargs)

    def check(match: Match) -> bool:
        # A multi-output pattern can match two of its outputs on one subgraph (the q and k
        # halves of QK-norm + RoPE both on q's nodes): each output must be its own node.
        outputs = match.output_nodes()
        if len(set(outputs)) != len(outputs):
            return False
        for node in match.nodes:
            if node.op == "call_function" and not set(node.kwargs) <= allowed_kwargs.get(node.target, set()):
                return False
        return extra_check(match)

    def apply_replacement(match: Match, *args: Any, **kwargs: Any) -> None:
        match.replace_by_example(replace_fn, [kwargs[name] for name in argnames])

    register_graph_pattern(pattern, extra_check=check, pass_dict=pm_pass)(apply_replacement)


def _check_sentinels_landed(gm: torch.fx.GraphModule, sentinels: dict[str, float], fn: Callable) -> None:
    seen = {arg for node in gm.graph.nodes for arg in node.args if isinstance(arg, float)}
    missing = [name for name, value in sentinels.items() if value not in seen]
    if missing:
        raise ValueError(
            f"{fn.__name__}: scalar argument(s) {missing} do not appear as graph constants after tracing; "
            "a pattern can only capture scalars that reach an ATen op unchanged"
        )


# ---------------------------------------------------------------------------------------------
# Helpers for extra checks: read what a match bound, by the search function's argument names.
# ---------------------------------------------------------------------------------------------


def bound_value(match: Match, name: str) -> Any:
    """The FakeTensor (or Python scalar) a pattern argument bound to in this match."""
    value = match.kwargs[name]
    if isinstance(value, torch.fx.Node):
        return value.meta.get("val")
    return value


def is_python_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def same_size(a, b) -> bool:
    """Sizes equal for certain (symbolic sizes included; unknown counts as different)."""
    return statically_known_true(a == b)


def same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dim() == b.dim() and all(same_size(m, n) for m, n in zip(a.shape, b.shape))
