"""The backend's contract: options, errors, the entry point, logging, caching, reports."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from paiton_testing import EAGER_INNER, fusions, transformers_rms_norm

import paiton
from paiton.backends.options import PaitonOptionError, PaitonOptions
from paiton.passes.pass_manager import PASS_NAMES, PaitonPassManager


class TinyNorm(torch.nn.Module):
    """Linear, then residual add + RMSNorm, then RMSNorm (as transformers writes them)."""

    def __init__(self, dim=32):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim, bias=False)
        self.w1 = torch.nn.Parameter(torch.rand(dim) + 0.5)
        self.w2 = torch.nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        residual = x + self.proj(x)
        return transformers_rms_norm(transformers_rms_norm(residual, self.w1), self.w2), residual


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


def test_default_options(monkeypatch):
    """Every pass on but l2_prefetch (timed a loss: on only under PAITON_L2_PREFETCH=1) and
    norm_linear (untimed: on only under PAITON_NORM_LINEAR=1)."""
    monkeypatch.delenv("PAITON_L2_PREFETCH", raising=False)
    monkeypatch.delenv("PAITON_NORM_LINEAR", raising=False)
    opts = PaitonOptions.from_backend_kwargs()
    assert opts.inner_compiler == "inductor"
    assert opts.passes == {name: name not in ("l2_prefetch", "norm_linear") for name in PASS_NAMES}
    assert opts.inductor_config == {}


def test_mode_and_inductor_options_reach_inductor():
    assert PaitonOptions.from_backend_kwargs(mode="reduce-overhead").inductor_config == {"triton.cudagraphs": True}
    opts = PaitonOptions.from_backend_kwargs(options={"coordinate_descent_tuning": True, "paiton.rms_norm": False})
    assert opts.inductor_config == {"coordinate_descent_tuning": True}
    assert opts.passes["rms_norm"] is False and opts.passes["fused_add_rms_norm"] is True


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(options={"paiton.rms_norms": False}), "unknown Paiton option 'paiton.rms_norms'"),
        (dict(options={"paiton.inner_compiler": "tvm"}), "must be one of"),
        (dict(options={"paiton.rms_norm": "off"}), "True or False"),
        (dict(options={"coordinate_descent_tunning": True}), "not a Paiton option .* nor an Inductor config option"),
        (dict(options={"coordinate_descent_tuning": "yes"}), "takes bool"),
        (dict(mode="fastest"), "unknown torch.compile mode 'fastest'"),
        (dict(mode="reduce-overhead", options=None), None),
        (dict(options={**EAGER_INNER, "triton.cudagraphs": True}), "cannot apply"),
        (dict(options={"post_grad_custom_pre_pass": None}), "post_grad_custom_post_pass"),
        (dict(options=["paiton.rms_norm"]), "must be a dict"),
    ],
)
def test_option_errors_are_clear(kwargs, message):
    if message is None:
        PaitonOptions.from_backend_kwargs(**kwargs)
        return
    with pytest.raises(PaitonOptionError, match=message):
        PaitonOptions.from_backend_kwargs(**kwargs)


def test_unknown_option_fails_the_compile():
    """torch.compile surfaces the backend's error instead of silently running eager."""
    compiled = torch.compile(TinyNorm(), backend="paiton", options={"paiton.fused_add_rms_norms": False})
    with pytest.raises(Exception, match="unknown Paiton option"):
        compiled(torch.randn(2, 32))


def test_unknown_pass_in_manager():
    with pytest.raises(ValueError, match="unknown Paiton pass"):
        PaitonPassManager({"rms_nrom": True})


# ---------------------------------------------------------------------------------------------
# The Inductor FX graph cache
# ---------------------------------------------------------------------------------------------


def test_uuid_is_stable_and_follows_the_options():
    assert PaitonPassManager().uuid() == PaitonPassManager().uuid()
    assert PaitonPassManager().uuid() != PaitonPassManager({"rms_norm": False}).uuid()
    assert PaitonPassManager({"rms_norm": False}).uuid() != PaitonPassManager({"fused_add_rms_norm": False}).uuid()


@pytest.mark.slow
def test_counts_survive_an_fx_graph_cache_hit():
    """The second compile of the same graph is served from Inductor's cache (the passes do not
    run); the counts must still be reported."""
    from torch._dynamo.utils import counters

    module, x = TinyNorm(), torch.randn(4, 32)
    with torch.no_grad(), torch._inductor.config.patch(fx_graph_cache=True):
        expected = module(x)
        for attempt in range(2):
            torch._dynamo.reset()
            counters.clear()
            out, _ = torch.compile(module, backend="paiton")(x)
            torch.testing.assert_close(out, expected[0])
            assert paiton.fusion_counts(module) == fusions(fused_add_rms_norm=1, rms_norm=1), attempt
        assert counters["inductor"]["fxgraph_cache_hit"] == 1


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


def test_fusion_counts_for_each_way_of_compiling():
    x = torch.randn(3, 32)
    expected = fusions(fused_add_rms_norm=1, rms_norm=1)
    with torch.no_grad():
        module = TinyNorm()
        compiled = torch.compile(module, backend="paiton", options=EAGER_INNER)
        compiled(x)
        assert paiton.fusion_counts(compiled) == expected
        assert paiton.fusion_counts(module) == expected

        other = TinyNorm()  # never compiled: no records
        assert paiton.fusion_counts(other) == fusions()

        # Dynamo reuses the first instance's graph for a second instance of the class (it guards
        # on parameter shapes, not identity): the shared graph is attributed to both.
        compiled_forward = torch.compile(other.forward, backend="paiton", options=EAGER_INNER)
        compiled_forward(x)
        assert paiton.fusion_counts(compiled_forward) == expected
        assert paiton.fusion_counts(other) == expected
        assert len(paiton.fusion_graphs()) == 1 and paiton.fusion_counts() == expected

    with pytest.raises(TypeError, match="needs a torch.nn.Module"):
        paiton.fusion_counts(42)


def test_dynamo_reset_clears_the_records():
    with torch.no_grad():
        torch.compile(TinyNorm(), backend="paiton", options=EAGER_INNER)(torch.randn(3, 32))
    assert paiton.fusion_counts()["rms_norm"] == 1
    torch._dynamo.reset()
    assert paiton.fusion_counts() == fusions()


def test_graphs_that_need_gradients_are_not_rewritten(caplog):
    module, x = TinyNorm(), torch.randn(3, 32)
    with caplog.at_level("WARNING", logger="paiton"):
        out, _ = torch.compile(module, backend="paiton", options=EAGER_INNER)(x)
    out.sum().backward()  # the graph still trains
    assert module.w1.grad is not None
    assert paiton.fusion_counts(module) == fusions()
    assert "needs gradients" in caplog.text


# ---------------------------------------------------------------------------------------------
# In a fresh process: the entry point and TORCH_LOGS
# ---------------------------------------------------------------------------------------------

FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    dim = 32
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.rand(dim) + 0.5)
        def forward(self, x):
            h = x.to(torch.float32)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
            return self.weight * h.to(x.dtype)
    m, x = M(), torch.randn(4, dim)
    with torch.no_grad():
        out = torch.compile(m, backend="paiton", options={"paiton.inner_compiler": "eager"})(x)
        torch.testing.assert_close(out, m(x))
    assert "paiton" not in sys.modules or sys.modules["paiton"].__name__ == "paiton"
    import paiton
    print("COUNTS", paiton.fusion_counts(m))
    """
)


def run_fresh(env_extra=None, script=FRESH_PROCESS_SCRIPT):
    env = {k: v for k, v in os.environ.items() if k != "TORCH_LOGS"}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, cwd="/"
    )


def test_backend_by_name_in_a_fresh_process():
    """`backend="paiton"` resolves through the torch_dynamo_backends entry point; the script
    never imports paiton before compiling."""
    result = run_fresh()
    assert result.returncode == 0, result.stderr
    assert "COUNTS {'merged_projections': 0, 'one_row_linear': 0, 'few_rows_linear': 0, 'fused_add_rms_norm': 0, 'all_reduce_add_rms_norm': 0, 'rms_norm': 1, " in result.stdout


def test_torch_logs_switches_the_paiton_logger_on():
    result = run_fresh({"TORCH_LOGS": "+paiton"})
    assert result.returncode == 0, result.stderr
    assert "pass rms_norm rewrote 1 subgraph(s)" in result.stderr
    assert "paiton: compiled graph 0/0 with eager: merged_projections=0, one_row_linear=0, few_rows_linear=0, fused_add_rms_norm=0, all_reduce_add_rms_norm=0, rms_norm=1," in result.stderr
    quiet = run_fresh()
    assert "rewrote" not in quiet.stderr


@pytest.mark.parametrize("device, options, env, expected", [
    ("cuda", None, None, True),  # Paiton's GPU default
    ("cuda", {"coordinate_descent_tuning": False}, None, False),  # the user's choice wins
    ("cuda", None, "0", None),  # Inductor's variable, set: left to Inductor's config, which reads it
    ("cuda", None, "1", None),
    ("cpu", None, None, None),  # nothing to tune on CPU: Inductor's own default stays
])
def test_coordinate_descent_tuning_is_on_by_default_on_gpu(monkeypatch, device, options, env, expected):
    """What reaches Inductor's compile_fx, for graph inputs on a GPU (fake tensors: no GPU
    needed) and on the CPU."""
    if env is None:
        monkeypatch.delenv("TORCHINDUCTOR_COORDINATE_DESCENT_TUNING", raising=False)
    else:
        monkeypatch.setenv("TORCHINDUCTOR_COORDINATE_DESCENT_TUNING", env)
    import torch._inductor.compile_fx as compile_fx_module
    from torch._subclasses import FakeTensorMode

    from paiton.backends.paiton_backend import paiton_backend

    seen = {}

    def fake_compile_fx(gm, example_inputs, config_patches=None):
        seen.update(config_patches)
        return gm.forward

    monkeypatch.setattr(compile_fx_module, "compile_fx", fake_compile_fx)
    gm = torch.fx.symbolic_trace(lambda x: x * 2)
    with FakeTensorMode():
        example = torch.empty(4, device=device)
    paiton_backend(gm, [example], options=options)
    assert seen.get("coordinate_descent_tuning") == expected


def test_paiton_ops_are_inductor_fallbacks_before_inductor_meets_them():
    """Every paiton:: op is registered with Inductor as a fallback, with the layout constraint
    Inductor's own first lowering would give it, so that lowering (which in torch 2.11 formats
    the op's arguments' whole IR for a log line, minutes on a Qwen3-32B graph) never runs."""
    from torch._inductor import lowering
    from torch._library.utils import get_layout_constraint_tag

    from paiton.fusion.ops import paiton_op_overloads, register_inductor_fallbacks

    register_inductor_fallbacks()
    ops = paiton_op_overloads()
    assert {str(op) for op in ops} >= {"paiton.fp8_linear.default", "paiton.silu_mul_fp8_linear.default",
                                       "paiton.rms_norm.default", "paiton.decode_attention.default"}
    for op in ops:
        assert op in lowering.lowerings, op
        implicit = lowering.tag_to_layout_constraint(get_layout_constraint_tag(op, with_default=True))
        assert lowering._maybe_layout_constraints.get(op) is implicit, op
    assert register_inductor_fallbacks() == 0  # once


IMPLICIT_FALLBACK_SCRIPT = r"""
import logging, torch
import torch._inductor.exc as exc
formatted = []
original = exc.OperatorIssue.operator_str
def recording(target, args, kwargs):
    formatted.append(str(target))
    return original(target, args, kwargs)
exc.OperatorIssue.operator_str = staticmethod(recording)
logging.getLogger("torch._inductor.graph").setLevel(logging.INFO)  # torch 2.13 formats lazily: make it format
class Norm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(64))
    def forward(self, x):
        v = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(v + 1e-6)).to(x.dtype)
with torch.no_grad():
    out = torch.compile(Norm(), backend="paiton")(torch.randn(4, 64))
print("FORMATTED", [t for t in formatted if t.startswith("paiton")])
"""


def test_an_inductor_compile_never_formats_a_paiton_op_for_an_implicit_fallback():
    """Through Inductor (CPU), a graph with a Paiton op: Inductor never takes its implicit
    fallback path for it (the path that formats the op's arguments)."""
    # caches off: a cached graph would skip the lowering
    result = run_fresh({"TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}, IMPLICIT_FALLBACK_SCRIPT)
    assert result.returncode == 0, result.stderr
    assert "FORMATTED []" in result.stdout, result.stdout
