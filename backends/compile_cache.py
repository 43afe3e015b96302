"""Compile artifacts carried between processes and machines.

A cold compile of Qwen3-32B (Inductor codegen, autotuning, coordinate-descent tuning) takes
minutes; torch's portable caches (`torch.compiler.save_cache_artifacts`: the FX graph,
AOTAutograd and autotuning caches) let a fresh process on a fresh machine load that work
instead. The file is xz-compressed: Inductor's cubins and sources shrink several times, and one
for Qwen3-8B's batch-1 graphs of three configurations was 41 MB raw, more than a device command
hands back per file (16 MiB). `save_cache_artifacts` returns only what was recorded since its
last call, so a file holds a list of those results, and saving again appends.
"""

from __future__ import annotations

import lzma
import pickle

import torch

XZ_MAGIC = b"\xfd7zXZ\x00"


def save_compile_cache(path: str, saved_artifacts: list[bytes]) -> int:
    """Write every artifact this process compiled so far (what `saved_artifacts` holds from
    earlier calls, then what is new) to `path`; returns the number of artifact blobs written."""
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is not None:
        saved_artifacts.append(artifacts[0])
    with lzma.open(path, "wb", preset=1) as f:
        pickle.dump(saved_artifacts, f)
    return len(saved_artifacts)


def load_compile_cache(path: str) -> None:
    """Load a file `save_compile_cache` wrote (xz-compressed, or a plain pickle of earlier runs):
    graphs compiled after this hit the caches it fills."""
    with open(path, "rb") as f:
        compressed = f.read(len(XZ_MAGIC)) == XZ_MAGIC
    with (lzma.open if compressed else open)(path, "rb") as f:
        artifacts = pickle.load(f)
    if not isinstance(artifacts, list) or not all(isinstance(a, bytes) for a in artifacts):
        raise ValueError(f"{path}: not a file save_compile_cache wrote")
    for blob in artifacts:
        torch.compiler.load_cache_artifacts(blob)
