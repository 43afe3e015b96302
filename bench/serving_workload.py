"""Requests for the serving benchmark (issue 5): a ShareGPT file, as vLLM's
benchmark_serving.py reads it, or a synthetic workload shaped like it.

ShareGPT (a JSON list of {"conversations": [{"from": "human", "value": ...},
{"from": "gpt", "value": ...}, ...]}), as vLLM's `sample_sharegpt_requests`: the first turn
is the prompt, the second turn's token count the output length (or `fixed_output_len`);
conversations with fewer than two turns are skipped, and so are pairs with a prompt or
output under 4 tokens, a prompt over 1024 tokens or prompt + output over 2048. The file's
order is shuffled with the seed, then the first `num_prompts` that pass are taken.

Synthetic (no file, or no tokenizer): prompt and output lengths drawn from log-normal
distributions with ShareGPT-like medians and spread, under the same limits:
    prompt tokens ~ LogNormal(log(SYNTHETIC_PROMPT_MEDIAN), SYNTHETIC_PROMPT_SIGMA), in [4, 1024]
    output tokens ~ LogNormal(log(SYNTHETIC_OUTPUT_MEDIAN), SYNTHETIC_OUTPUT_SIGMA), in [4, 2048 - prompt]
with token ids uniform over the vocabulary, all from one seeded generator.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

MIN_TOKENS, MAX_PROMPT, MAX_TOTAL = 4, 1024, 2048
SYNTHETIC_PROMPT_MEDIAN, SYNTHETIC_PROMPT_SIGMA = 200, 1.0
SYNTHETIC_OUTPUT_MEDIAN, SYNTHETIC_OUTPUT_SIGMA = 180, 0.9


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    output_len: int


def sharegpt_requests(path: str | Path, tokenize, num_prompts: int, seed: int = 0,
                      fixed_output_len: int | None = None) -> list[Request]:
    """`tokenize(text) -> list[int]`. Errors name the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such dataset file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: a ShareGPT file is a JSON list of conversations, got {type(data).__name__}")
    pairs = []
    for index, item in enumerate(data):
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(turns, list):
            raise ValueError(f"{path}: entry {index} has no 'conversations' list")
        if len(turns) < 2:
            continue
        if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns[:2]):
            raise ValueError(f"{path}: entry {index}: turns need a string 'value'")
        pairs.append((turns[0]["value"], turns[1]["value"]))
    random.Random(seed).shuffle(pairs)
    requests = []
    for prompt_text, completion in pairs:
        prompt = list(tokenize(prompt_text))
        output_len = fixed_output_len if fixed_output_len is not None else len(list(tokenize(completion)))
        if len(prompt) < MIN_TOKENS or output_len < MIN_TOKENS:
            continue
        if len(prompt) > MAX_PROMPT or len(prompt) + output_len > MAX_TOTAL:
            continue
        requests.append(Request(prompt, output_len))
        if len(requests) == num_prompts:
            return requests
    raise ValueError(f"{path}: only {len(requests)} usable conversations, {num_prompts} asked for")


def synthetic_requests(num_prompts: int, vocab_size: int, seed: int = 0, fixed_output_len: int | None = None,
                       max_prompt: int = MAX_PROMPT) -> list[Request]:
    """`max_prompt` lowers the prompt limit (short smoke runs); the distribution is otherwise
    the one documented above."""
    rng = random.Random(seed)
    requests = []
    for _ in range(num_prompts):
        prompt_len = _clipped_lognormal(rng, SYNTHETIC_PROMPT_MEDIAN, SYNTHETIC_PROMPT_SIGMA, MIN_TOKENS, max_prompt)
        if fixed_output_len is not None:
            output_len = fixed_output_len
        else:
            output_len = _clipped_lognormal(rng, SYNTHETIC_OUTPUT_MEDIAN, SYNTHETIC_OUTPUT_SIGMA, MIN_TOKENS,
                                            MAX_TOTAL - prompt_len)
        requests.append(Request([rng.randrange(vocab_size) for _ in range(prompt_len)], output_len))
    return requests


def _clipped_lognormal(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return max(low, min(high, round(rng.lognormvariate(math.log(median), sigma))))
