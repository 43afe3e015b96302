"""The ordered list of Paiton passes, run as one Inductor custom graph pass.

Order matters: a fusion whose pattern contains another's runs first (fused add + RMSNorm
before plain RMSNorm), and cleanup runs last. The manager is handed to Inductor as
`post_grad_custom_pre_pass` (the ATen graph after AOTAutograd, before Inductor's own post-grad
rewrites) or run directly on the ATen graph by the backend's eager inner compiler.

The target's lowering table (backends/lowering.py) can leave an op to Inductor on a chip: the
pass that would create that op does not run there (`left_to_inductor`), and the fusion report
shows 0 for it.

Each run leaves the rewrite counts in `last_counts` and adds them to Inductor's counters
(`counters["inductor"]["paiton.<pass>"]`). Inductor stores counter increments with a cached
graph and replays them on a cache hit, so the counts are right whether or not the passes ran
in this process.
"""

from __future__ import annotations

import logging

import torch
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.pattern_matcher import stable_topological_sort

from paiton.backends import lowering
from paiton.backends.target import Target, detect_target
from paiton.passes.all_reduce_add_rms_norm import AllReduceAddRMSNormPass
from paiton.passes.cache_counters import CacheCountersPass
from paiton.passes.decode_attention import DecodeAttentionPass
from paiton.passes.few_rows_linear import FewRowsLinearPass
from paiton.passes.fused_add_rms_norm import FusedAddRMSNormPass
from paiton.passes.kv_cache_write import KVCacheWritePass
from paiton.passes.l2_prefetch import L2PrefetchPass
from paiton.passes.merged_projections import MergedProjectionsPass
from paiton.passes.norm_linear import NormLinearPass
from paiton.passes.one_row_linear import OneRowLinearPass
from paiton.passes.paiton_pass import PaitonPass, hash_source_files
from paiton.passes.prefill_attention import PrefillAttentionPass
from paiton.passes.qk_norm_rope import QKNormRoPEPass
from paiton.passes.rms_norm import RMSNormPass
from paiton.passes.silu_mul_linear import SiluMulLinearPass
from paiton.passes.swiglu import SwiGLUPass
from paiton.passes.swiglu_out import SwiGLUOutPass

log = logging.getLogger(__name__)

# Every pass Paiton has, in the order they run.
# The all-reduce joins the fused add + RMSNorm op (tensor parallel);
# QK-norm + RoPE starts from the RMSNorm pass's output; the KV-cache write joins the QK-norm +
# RoPE op and looks for the attention (fused or not) that reads the cache; the cache counters'
# slots are those of the KV-cache write's op; SwiGLU into the gate/up product of a few rows and
# into down_proj's product both start from the SwiGLU pass's output (the gate/up one first: at a
# few rows it wins, and down_proj's pass takes what it leaves); the norms go into the products
# once those are in their final form (SwiGLU's included); the L2 prefetch goes last, into the
# norm and rotary ops the others left.
PASS_ORDER: tuple[type[PaitonPass], ...] = (
    FusedAddRMSNormPass,
    AllReduceAddRMSNormPass,
    RMSNormPass,
    QKNormRoPEPass,
    DecodeAttentionPass,
    PrefillAttentionPass,
    KVCacheWritePass,
    CacheCountersPass,
    SwiGLUPass,
    SwiGLUOutPass,
    SiluMulLinearPass,
    NormLinearPass,
    L2PrefetchPass,
)
# Passes the backend runs on Dynamo's graph, with the real inputs, before AOTAutograd (see
# merged_projections.py for why they cannot wait for the ATen graph). The one-row and few-rows
# passes take the linears the merge left (a decode step's at batch 1, and at batch 2-64).
DYNAMO_GRAPH_PASSES = (MergedProjectionsPass, OneRowLinearPass, FewRowsLinearPass)
PASS_NAMES: tuple[str, ...] = tuple(p.name for p in DYNAMO_GRAPH_PASSES + PASS_ORDER)
COUNTER_PREFIX = "paiton."


_PASSES_BY_NAME = {p.name: p for p in DYNAMO_GRAPH_PASSES + PASS_ORDER}


def switched_on_by_default(name: str) -> bool:
    """Whether pass `name` runs unless an option says otherwise: its class's `on_by_default`
    (every pass but l2_prefetch and norm_linear; the Dynamo-graph passes, not PaitonPasses, always)."""
    on_by_default = getattr(_PASSES_BY_NAME[name], "on_by_default", None)
    return on_by_default() if on_by_default is not None else True


class PaitonPassManager(CustomGraphPass):
    def __init__(self, enabled: dict[str, bool] | None = None, target: Target | None = None) -> None:
        """`enabled`: pass name -> on/off (default: switched_on_by_default); `target`: the chip whose lowering table
        decides which fused ops exist (default: the current device)."""
        enabled = enabled or {}
        unknown = set(enabled) - set(PASS_NAMES)
        if unknown:
            raise ValueError(f"unknown Paiton pass(es) {sorted(unknown)}; passes are {list(PASS_NAMES)}")
        self.enabled = {name: enabled.get(name, switched_on_by_default(name)) for name in PASS_NAMES}
        self.target = target if target is not None else detect_target()
        ops_left = lowering.ops_left_to_inductor(self.target)
        self.left_to_inductor = tuple(cls.name for cls in DYNAMO_GRAPH_PASSES + PASS_ORDER if cls.fused_op in ops_left)
        self.passes: list[PaitonPass] = [cls() for cls in PASS_ORDER if self.runs(cls.name)]
        self.last_counts: dict[str, int] = {}

    def runs(self, name: str) -> bool:
        """The pass is switched on and the target's table uses the op it creates."""
        return self.enabled[name] and name not in self.left_to_inductor

    def __call__(self, graph: torch.fx.Graph) -> None:
        counts = {}
        for p in self.passes:
            counts[p.name] = p(graph)
            counters["inductor"][COUNTER_PREFIX + p.name] += counts[p.name]
            if counts[p.name]:
                # A multi-output replacement sits where the matcher put it, which can be before
                # the definition of an input that came later in the original order (q's rotary
                # output before k's projection): restore a topological order for the next
                # pass, keeping the original order elsewhere.
                stable_topological_sort(graph)
        # Cleanup: drop what the rewrites left unused.
        graph.eliminate_dead_code()
        graph.lint()
        self.last_counts = counts
        log.debug("paiton passes: %s", counts)

    def uuid(self) -> str:
        # The passes that run (options and the target's table) and each one's own uuid (a hash
        # of its source files) decide the rewritten graph; Inductor's FX graph cache keys on this.
        per_pass = ",".join(f"{p.name}={p.uuid()}" for p in self.passes)
        return hash_source_files([__file__], extra=f"{self.enabled}|{self.target.arch}|{self.left_to_inductor}|{per_pass}")


def counts_from_counters(delta: dict[str, int], pass_names) -> dict[str, int]:
    """Rewrite counts per pass from a difference of `counters["inductor"]`."""
    return {name: int(delta.get(COUNTER_PREFIX + name, 0)) for name in pass_names}
