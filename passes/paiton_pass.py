"""Base classes for Paiton's graph passes.

A pass rewrites an ATen-level `torch.fx.Graph` in place and returns how many subgraphs it
rewrote. Its `uuid()` feeds Inductor's FX graph cache key, so it hashes the source files the
pass's behaviour depends on: change a pattern, a check or a replacement and cached graphs
compiled with the old pass are not reused.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.pattern_matcher import PatternMatcherPass

log = logging.getLogger(__name__)


def hash_source_files(paths: list[str | Path], extra: str = "") -> str:
    digest = hashlib.sha256(extra.encode())
    for path in sorted({str(p) for p in paths}):
        digest.update(path.rsplit("/", 1)[-1].encode())
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


class PaitonPass(CustomGraphPass, ABC):
    """One rewrite over the graph. `name` is also its option: `options={"paiton.<name>": False}`
    switches it off."""

    name: ClassVar[str]
    # The torch.ops.paiton op the pass puts in the graph: where the target's lowering table
    # leaves that op to Inductor, the pass manager does not run the pass (backends/lowering.py).
    # None: the pass makes no op of its own (it rewrites the inputs of ops other passes made).
    fused_op: ClassVar[str | None]
    # Modules besides the pass's own whose source decides what the pass does (the kernels'
    # op definitions, shared matcher helpers).
    depends_on: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def on_by_default(cls) -> bool:
        """Whether the pass runs unless an option says otherwise (read when a graph compiles)."""
        return True

    @abstractmethod
    def apply(self, graph: torch.fx.Graph) -> int:
        """Rewrite `graph` in place; return the number of subgraphs rewritten."""

    def __call__(self, graph: torch.fx.Graph) -> int:
        start = time.perf_counter()
        count = self.apply(graph)
        log.debug("pass %s rewrote %d subgraph(s) in %.1f ms", self.name, count, 1e3 * (time.perf_counter() - start))
        return count

    def uuid(self) -> str:
        return _uuid_of(type(self))


@functools.cache
def _uuid_of(cls: type[PaitonPass]) -> str:
    import importlib

    files = [inspect.getfile(cls), __file__]
    files += [inspect.getfile(importlib.import_module(module)) for module in cls.depends_on]
    return hash_source_files(files, extra=f"{cls.__module__}.{cls.__qualname__}")


class PatternFusionPass(PaitonPass):
    """A pass made of traced patterns (see `matcher_utils.register_fusion`).

    Subclasses implement `register_patterns(pm_pass, key)`. Patterns are traced the first
    time a pass of this class runs, not at import: tracing costs tens of milliseconds per
    pattern and most imports never compile anything. A pattern that spells out a size (the
    half-width slices of rotary embedding) is traced per size: `pattern_keys(graph)` names the
    sizes a graph needs, and each is traced once per process.
    """

    depends_on = ("paiton.passes.matcher_utils",)

    @classmethod
    def pattern_keys(cls, graph: torch.fx.Graph) -> set:
        """The variants of the patterns `graph` may need (default: one, `None`)."""
        return {None}

    @classmethod
    @abstractmethod
    def register_patterns(cls, pm_pass: PatternMatcherPass, key) -> None: ...

    def apply(self, graph: torch.fx.Graph) -> int:
        pm_pass = _pattern_pass_of(type(self))
        for key in type(self).pattern_keys(graph):
            _register_patterns_once(type(self), key)
        return pm_pass.apply(graph)


@functools.cache
def _pattern_pass_of(cls: type[PatternFusionPass]) -> PatternMatcherPass:
    return PatternMatcherPass(pass_name=f"paiton_{cls.name}")


@functools.cache
def _register_patterns_once(cls: type[PatternFusionPass], key) -> None:
    # Trace on small real CPU tensors, outside any fake mode the caller (Inductor) has active.
    with torch._subclasses.fake_tensor.unset_fake_temporarily(), torch.no_grad():
        cls.register_patterns(_pattern_pass_of(cls), key)
