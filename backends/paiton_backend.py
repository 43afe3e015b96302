"""The `paiton` torch.compile backend.

    torch.compile(model, backend="paiton")                       # Inductor does the rest
    torch.compile(model, backend="paiton", mode="reduce-overhead")   # ... with CUDA graphs
    torch.compile(model, backend="paiton", options={"paiton.inner_compiler": "eager"})

Dynamo hands the backend a torch-level FX graph. With the default inner compiler, Inductor's
`compile_fx` lowers it to ATen with AOTAutograd and Paiton's passes run as Inductor's
`post_grad_custom_pre_pass`; Inductor then compiles everything Paiton did not fuse, with the
same mode handling (CUDA graphs for "reduce-overhead") and the same FX graph cache as
`backend="inductor"`. With `paiton.inner_compiler="eager"`, AOTAutograd lowers the graph
(with Inductor's decompositions, so the passes see the same ATen ops) and the rewritten graph
runs as it is.

On a GPU, Paiton turns on Inductor's `coordinate_descent_tuning` unless the options set it:
the kernels Inductor still generates around Paiton's get tuned, and a one-row matmul (batch-1
decode: o_proj, down_proj, lm_head) becomes a tuned Triton reduction instead of a cuBLAS call.
Measured on an H100, Qwen3-8B batch-1 decode step: 6.89 ms with it, 7.19 ms without, in the
same run (bench/results/NOTES.md). `options={"coordinate_descent_tuning": False}` turns it off, as does Inductor's own
TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=0 (a set variable is left to Inductor).

Which fusions a graph gets is the lowering table's choice for the chip the graph's inputs are
on (or the chip named by `paiton.target`): an op the table leaves to Inductor is not created
(backends/lowering.py).

Paiton fuses inference graphs. A graph that needs gradients (grad mode on and an input that
requires grad) is compiled without Paiton's passes, with a warning.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

log = logging.getLogger(__name__)


def coordinate_descent_default(patches: dict, on_gpu: bool) -> dict:
    """Inductor's coordinate_descent_tuning for this graph where neither the options (`patches`)
    nor Inductor's own environment variable (TORCHINDUCTOR_COORDINATE_DESCENT_TUNING, which
    torch reads into its config) says: on a GPU, on. Its cost is paid at a graph's first run,
    one config compiled at a time on the main thread, so TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=0
    is how a run short of time switches it off for every graph at once."""
    if not on_gpu or "coordinate_descent_tuning" in patches or "TORCHINDUCTOR_COORDINATE_DESCENT_TUNING" in os.environ:
        return {}
    return {"coordinate_descent_tuning": True}


def paiton_backend(gm: torch.fx.GraphModule, example_inputs: list[Any], *, mode: str | None = None, options: dict | None = None):
    """Compile one Dynamo graph. `mode` and `options` are what torch.compile passes."""
    from torch._dynamo.utils import counters

    import paiton.fusion.ops  # noqa: F401  (registers torch.ops.paiton.*: the compiled graph calls them)
    from paiton.backends.fusion_report import attribute_runs, record_graph
    from paiton.backends.options import PaitonOptions
    from paiton.passes.pass_manager import COUNTER_PREFIX, DYNAMO_GRAPH_PASSES, PaitonPassManager, counts_from_counters

    opts = PaitonOptions.from_backend_kwargs(mode, options)
    target = _graph_target(opts.target, example_inputs)
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs
    )
    if needs_grad:
        log.warning(
            "paiton: this graph needs gradients (grad mode is on and an input requires grad); Paiton fuses "
            "inference graphs only, so it is compiled without Paiton's passes. Run the model under "
            "torch.no_grad() or torch.inference_mode() to get the fusions."
        )
    enabled = {name: on and not needs_grad for name, on in opts.passes.items()}
    manager = PaitonPassManager(enabled, target)

    before = counters["inductor"].copy()
    dynamo_graph_passes = [cls() for cls in DYNAMO_GRAPH_PASSES if manager.runs(cls.name)]
    for graph_pass in dynamo_graph_passes:
        counters["inductor"][COUNTER_PREFIX + graph_pass.name] += graph_pass(gm, example_inputs)
    if opts.inner_compiler == "eager":
        compiled = _compile_without_inductor(gm, example_inputs, manager)
    else:
        from torch._inductor.compile_fx import compile_fx

        if torch._inductor.config.post_grad_custom_pre_pass is not None:
            raise RuntimeError(
                "paiton: torch._inductor.config.post_grad_custom_pre_pass is already set; Paiton runs its "
                "passes there. Move the other pass to post_grad_custom_post_pass."
            )
        from paiton.fusion.ops import register_inductor_fallbacks

        register_inductor_fallbacks()  # before Inductor meets them (its own first lowering of an op can take minutes)
        patches = {**opts.inductor_config, "post_grad_custom_pre_pass": manager if manager.passes else None}
        on_gpu = any(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in example_inputs)
        patches.update(coordinate_descent_default(patches, on_gpu))
        compiled = compile_fx(gm, example_inputs, config_patches=patches)
    for graph_pass in dynamo_graph_passes:
        graph_pass.after_compile()
    # Passes the table leaves to Inductor are reported, with 0; passes switched off are not.
    counts = counts_from_counters(counters["inductor"] - before, [name for name, on in enabled.items() if on])

    record = record_graph(gm, example_inputs, _current_compile_id(), opts.inner_compiler, counts, target.arch)
    log.info(
        "paiton: compiled graph %s with %s: %s; target %s%s",
        record.compile_id,
        opts.inner_compiler,
        ", ".join(f"{name}={n}" for name, n in counts.items()) or "no passes",
        target.arch,
        f", left to Inductor: {', '.join(manager.left_to_inductor)}" if manager.left_to_inductor else "",
    )
    return attribute_runs(compiled, record, example_inputs)


def _graph_target(named, example_inputs):
    """The chip whose lowering table the passes follow: `paiton.target`, else the inputs' chip."""
    from paiton.backends.options import TARGET_OPTION, PaitonOptionError
    from paiton.backends.target import target_of_inputs

    runs_on = target_of_inputs(example_inputs)
    if named is None:
        return runs_on
    if runs_on.is_gpu and named.vendor != runs_on.vendor:
        raise PaitonOptionError(
            f"{TARGET_OPTION}={named.arch!r} is a {named.vendor} chip, but this graph's inputs are on a {runs_on.vendor} "
            f"GPU ({runs_on.arch}, {runs_on.name}); name a {runs_on.vendor} target or leave {TARGET_OPTION} out"
        )
    return named


def _compile_without_inductor(gm: torch.fx.GraphModule, example_inputs: list[Any], manager):
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func
    from torch._inductor.decomposition import select_decomp_table

    def run_passes(aten_gm: torch.fx.GraphModule, _inputs):
        manager(aten_gm.graph)
        aten_gm.recompile()
        return make_boxed_func(aten_gm.forward)

    # Inductor's decompositions: without them casts stay `_to_copy` rather than
    # `convert_element_type`, and the passes (traced with them) would match nothing.
    return aot_autograd(
        fw_compiler=run_passes,
        decompositions=select_decomp_table(),
        keep_inference_input_mutations=True,
    )(gm, example_inputs)


def _current_compile_id() -> str:
    compile_id = torch._guards.CompileContext.current_compile_id()
    return str(compile_id) if compile_id is not None else "?"


def _reset() -> None:
    """Called by torch._dynamo.reset(): compiled graphs are gone, and so are their records and,
    as for backend="inductor", the CUDA graph trees."""
    from paiton.backends.fusion_report import clear_fusion_records

    clear_fusion_records()
    if torch.cuda.is_available():
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees

        reset_cudagraph_trees()


paiton_backend.reset = _reset
