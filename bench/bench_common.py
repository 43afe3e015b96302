"""What the benchmark scripts share: the configurations they compare (one bundled decode loop
each), writing a result as JSON (every raw number) and a markdown table side by side, under one
file stem; comparing generated tokens with eager's."""

from __future__ import annotations

import json
import os

# eager; stock Inductor with mode "reduce-overhead" (on a GPU); the strongest stock setting we
# know (gpt-fast's: reduce-overhead plus coordinate descent tuning); Paiton; and Paiton with the
# same coordinate descent tuning of the kernels Inductor still generates around Paiton's.
CONFIGS = ("eager", "inductor", "inductor-cdt", "paiton", "paiton-cdt")


def make_loop(model, config: str, max_batch: int, max_length: int, device: str, paiton_inner: str = "inductor"):
    """A DecodeLoop for one of CONFIGS. On a GPU every compiled configuration uses CUDA graphs."""
    from paiton.models.decode_loop import DecodeLoop

    def loop(backend, **kwargs):
        return DecodeLoop(model, max_batch_size=max_batch, max_length=max_length, backend=backend, **kwargs)

    cudagraphs = {"triton.cudagraphs": True} if device.startswith("cuda") else {}
    if config in ("eager", "inductor"):
        return loop(config)
    if config == "inductor-cdt":
        return loop("inductor", mode=None, options={"coordinate_descent_tuning": True, **cudagraphs})
    if config in ("paiton", "paiton-cdt") and paiton_inner == "eager":
        return loop("paiton", options={"paiton.inner_compiler": "eager"})
    if config == "paiton":
        return loop("paiton")
    if config == "paiton-cdt":
        return loop("paiton", mode=None, options={"coordinate_descent_tuning": True, **cudagraphs})
    raise ValueError(f"unknown configuration {config!r}; choose from {', '.join(CONFIGS)}")


def write_results(out_dir: str, stem_name: str, result: dict, table: str, echo: bool = True) -> str:
    """Write <out_dir>/<stem_name>.json and .md; print the table (`echo`); return the path stem."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, stem_name)
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(table)
    if echo:
        print(table)
    return stem


def first_divergence(tokens: list[int], reference: list[int]) -> int | None:
    """The first position where `tokens` differs from `reference` (None: identical)."""
    for i, (x, y) in enumerate(zip(tokens, reference)):
        if x != y:
            return i
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))
