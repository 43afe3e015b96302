"""What the benchmark scripts share: writing a result as JSON (every raw number) and a
markdown table side by side, under one file stem; comparing generated tokens with eager's."""

from __future__ import annotations

import json
import os


def write_results(out_dir: str, stem_name: str, result: dict, table: str) -> str:
    """Write <out_dir>/<stem_name>.json and .md; print the table; return the path stem."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, stem_name)
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(table)
    print(table)
    return stem


def first_divergence(tokens: list[int], reference: list[int]) -> int | None:
    """The first position where `tokens` differs from `reference` (None: identical)."""
    for i, (x, y) in enumerate(zip(tokens, reference)):
        if x != y:
            return i
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))
