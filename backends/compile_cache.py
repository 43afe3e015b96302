"""Compile artifacts carried between processes and machines.

A cold compile of Qwen3-32B (Inductor codegen, autotuning, coordinate-descent tuning) takes
minutes; torch's portable caches (`torch.compiler.save_cache_artifacts`: the FX graph,
AOTAutograd and autotuning caches) let a fresh process on a fresh machine load that work
instead. The file is xz-compressed: Inductor's cubins and sources shrink several times, and one
for Qwen3-8B's batch-1 graphs of three configurations was 41 MB raw, more than a device command
hands back per file (16 MiB). `save_cache_artifacts` returns only what was recorded since its
last call, so a file holds a list of those results, and saving again appends.

Inductor's caches are keyed by the graph, and a server's graphs hold its static shapes (the KV
cache's slots x length, the prefill buckets): a file made by a server of 128 slots x 1472
tokens is a cold compile for one of 128 x 1280 (on an H200 at a593e91: 188 and 360 s to the
first prefill instead of seconds). So a file also records what it was made for (`made_for`: the
server's model, configuration and shapes), and `cache_mismatches` names what differs.
"""

from __future__ import annotations

import lzma
import pickle

import torch

XZ_MAGIC = b"\xfd7zXZ\x00"


def save_compile_cache(path: str, saved_artifacts: list[bytes], made_for: dict | None = None) -> int:
    """Write every artifact this process compiled so far (what `saved_artifacts` holds from
    earlier calls, then what is new) to `path`, with `made_for` (what compiled them: plain
    values, for `cache_mismatches`); returns the number of artifact blobs written."""
    artifacts = torch.compiler.save_cache_artifacts()
    if artifacts is not None:
        saved_artifacts.append(artifacts[0])
    with lzma.open(path, "wb", preset=1) as f:
        pickle.dump({"artifacts": saved_artifacts, "made_for": dict(made_for or {})}, f)
    return len(saved_artifacts)


def load_compile_cache(path: str) -> dict:
    """Load a file `save_compile_cache` wrote (xz-compressed, or a plain pickle of earlier runs;
    files from before `made_for`, a bare list, too): graphs compiled after this hit the caches
    it fills. Returns what the file says it was made for ({} if it says nothing)."""
    with open(path, "rb") as f:
        compressed = f.read(len(XZ_MAGIC)) == XZ_MAGIC
    with (lzma.open if compressed else open)(path, "rb") as f:
        saved = pickle.load(f)
    artifacts, made_for = (saved.get("artifacts"), saved.get("made_for", {})) if isinstance(saved, dict) else (saved, {})
    if not isinstance(artifacts, list) or not all(isinstance(a, bytes) for a in artifacts) or not isinstance(made_for, dict):
        raise ValueError(f"{path}: not a file save_compile_cache wrote")
    for blob in artifacts:
        torch.compiler.load_cache_artifacts(blob)
    return made_for


# What must agree for a cache's graphs to be this process's: the rest of `made_for` (say, the
# torch version) is for the reader.
CONFIGURATION_KEYS = ("model", "dtype", "backend", "mode", "options", "fp8")
SHAPE_KEYS = ("max_slots", "max_model_len", "max_prefill_tokens", "tensor_parallel")


def cache_mismatches(made_for: dict, here: dict) -> tuple[list[str], list[str]]:
    """(configuration, shapes): `key: file's value, here's value` for each key of
    CONFIGURATION_KEYS and SHAPE_KEYS the file recorded and this process has with another value.
    A configuration mismatch is a file for another configuration (a server loads every
    configuration's file: harmless); a shape mismatch, same configuration, means a cold compile."""
    def differing(keys):
        return [f"{key} {made_for[key]!r} (here {here[key]!r})" for key in keys
                if key in made_for and key in here and made_for[key] != here[key]]

    return differing(CONFIGURATION_KEYS), differing(SHAPE_KEYS)
