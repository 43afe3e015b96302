"""Qwen3 dense models by preset name, with random weights, built directly on the target device.

The presets carry the published architecture numbers of the Qwen3 dense family (the
`config.json` of each Qwen/Qwen3-* checkpoint); `tiny` is a 2-layer model for tests and CPU
demos. Timing and fusion behaviour depend only on shapes, so random weights serve benchmarks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Qwen3Preset:
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 128
    vocab_size: int = 151936
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 40960
    rms_norm_eps: float = 1e-6


QWEN3_PRESETS: dict[str, Qwen3Preset] = {
    "qwen3-0.6b": Qwen3Preset(28, 1024, 3072, 16, 8, tie_word_embeddings=True),
    "qwen3-1.7b": Qwen3Preset(28, 2048, 6144, 16, 8, tie_word_embeddings=True),
    "qwen3-4b": Qwen3Preset(36, 2560, 9728, 32, 8, tie_word_embeddings=True),
    "qwen3-8b": Qwen3Preset(36, 4096, 12288, 32, 8),
    "qwen3-14b": Qwen3Preset(40, 5120, 17408, 40, 8),
    "qwen3-32b": Qwen3Preset(64, 5120, 25600, 64, 8),
    # Small enough for CPU tests, with the real models' structure: GQA (2 query heads per KV
    # head), q/k norms, and row widths that are not powers of two (hidden 96, head_dim 24).
    "tiny": Qwen3Preset(2, 96, 160, 4, 2, head_dim=24, vocab_size=512, max_position_embeddings=512),
}


def projection_shapes(preset: str) -> dict[str, tuple[int, int]]:
    """A decoder layer's linears as (N, K) = (out, in) features, q/k/v and gate/up merged as
    Paiton's passes merge them: the weight shapes kernel benchmarks and GPU tests sweep."""
    m = QWEN3_PRESETS[preset]
    qkv = (m.num_attention_heads + 2 * m.num_key_value_heads) * m.head_dim
    return {"qkv": (qkv, m.hidden_size), "o": (m.hidden_size, m.num_attention_heads * m.head_dim),
            "gate_up": (2 * m.intermediate_size, m.hidden_size), "down": (m.hidden_size, m.intermediate_size)}


def qwen3_config(preset: str, **overrides):
    """A transformers `Qwen3Config` for a preset; keyword overrides replace its fields
    (e.g. `num_hidden_layers=2` for a short model with a real layer shape)."""
    from transformers import Qwen3Config

    if preset not in QWEN3_PRESETS:
        raise KeyError(f"unknown Qwen3 preset {preset!r}; presets are {sorted(QWEN3_PRESETS)}")
    fields = {**QWEN3_PRESETS[preset].__dict__, **overrides}
    return Qwen3Config(**fields, attn_implementation="sdpa")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_qwen3(
    preset: str = "tiny",
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **overrides,
):
    """A `Qwen3ForCausalLM` in eval mode with random weights, allocated and initialised on
    `device` in `dtype` (no CPU copy first: a 32B preset builds on one 80 GB GPU)."""
    from transformers import Qwen3ForCausalLM

    config = qwen3_config(preset, **overrides)
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = Qwen3ForCausalLM(config)
    return model.eval()
