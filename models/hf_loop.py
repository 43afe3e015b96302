"""Greedy decoding through transformers' StaticCache, with any forward (eager or compiled).

A few lines on purpose: this is the "plain loop a user writes" that Paiton must plug into,
used by the demo and the parity tests to compare a compiled model with eager step by step.
"""

from __future__ import annotations

import warnings

import torch


@torch.no_grad()
def hf_static_cache_greedy(
    forward, model, input_ids: torch.Tensor, new_tokens: int, follow: list[torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """Prefill `input_ids` ([batch, prompt]) into a fresh StaticCache, then `new_tokens - 1`
    greedy decode steps. Returns the last-position logits of every step ([batch, vocab] each;
    the prefill's first). `forward` is `model` itself or a compiled version of it.

    `follow`: the logits another run returned; each step then feeds that run's argmax instead
    of its own (teacher forcing), so two models stay comparable step by step even where a
    near-tie flips one greedy choice."""
    with warnings.catch_warnings():
        # transformers >= 5.2x renames `past_key_values` to `cache` with a FutureWarning; the
        # GPU image's 5.17 knows only `past_key_values`.
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
        return _greedy(forward, model, input_ids, new_tokens, follow)


def _greedy(forward, model, input_ids, new_tokens, follow):
    from transformers import StaticCache

    batch, prompt_len = input_ids.shape
    device = input_ids.device
    config = model.config
    cache = StaticCache(config=config, max_cache_len=prompt_len + new_tokens)
    # Allocate the cache now, outside any compiled graph. Left to the first forward, it would
    # be allocated inside the compiled prefill; under CUDA graphs (mode="reduce-overhead")
    # that memory belongs to the graph's pool and the next replay overwrites it.
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cache.early_initialization(batch, config.num_key_value_heads, head_dim, model.dtype, device)
    out = forward(
        input_ids=input_ids,
        past_key_values=cache,
        cache_position=torch.arange(prompt_len, device=device),
        use_cache=True,
    )
    # Clone what is kept: under CUDA graphs an output lives in the graph's memory pool until
    # the next replay.
    logits = [out.logits[:, -1].clone()]
    for step in range(new_tokens - 1):
        position = torch.tensor([prompt_len + step], device=device)
        previous = follow[step] if follow is not None else logits[-1]
        out = forward(
            input_ids=previous.argmax(-1, keepdim=True),
            past_key_values=cache,
            cache_position=position,
            position_ids=position.expand(batch, 1),
            use_cache=True,
        )
        logits.append(out.logits[:, -1].clone())
    return logits
