"""GPU kernels one Qwen3 decoder layer launches in a decode step: stock Inductor vs Paiton.

    python bench/kernels_per_layer.py [--model qwen3-8b] [--out DIR]

The model is built with L and L + 1 layers (random weights, bf16); each is compiled (default
mode: no CUDA graphs, so the profiler sees every kernel), a prefill and two decode steps run,
and the third decode step is profiled. Kernels per layer = the difference between the two
models' counts; the names listed are the kernels the extra layer added, in launch order.
Writes kernels_per_layer-<model>-<card>-<date>.md.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os

import torch


@torch.no_grad()
def decode_step_kernels(model, backend):
    from torch.profiler import ProfilerActivity, profile
    from transformers import StaticCache

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    config, prompt = model.config, 16
    cache = StaticCache(config=config, max_cache_len=64)
    cache.early_initialization(1, config.num_key_value_heads, config.head_dim, model.dtype, "cuda")
    ids = torch.randint(0, config.vocab_size, (1, prompt), device="cuda")
    out = compiled(input_ids=ids, past_key_values=cache, cache_position=torch.arange(prompt, device="cuda"), use_cache=True)

    def step(i):
        position = torch.tensor([prompt + i], device="cuda")
        return compiled(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, cache_position=position,
                        position_ids=position[None], use_cache=True)

    for i in range(2):
        step(i)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(2)
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                     and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()),
                    key=lambda e: e.time_range.start)
    return [e.name for e in events]


def per_layer(short, long):
    """The kernels the longer model launches beyond the shorter one's (multiset difference)."""
    extra = collections.Counter(long) - collections.Counter(short)
    ordered = []
    for name in long:
        if extra[name] > 0:
            ordered.append(name)
            extra[name] -= 1
    return ordered


def main(argv=None):
    from paiton.models.qwen3 import build_qwen3

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-8b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    results = {}
    for backend in ("inductor", "paiton"):
        counts = []
        for layers in (args.layers, args.layers + 1):
            model = build_qwen3(args.model, device="cuda", dtype=torch.bfloat16, num_hidden_layers=layers)
            counts.append(decode_step_kernels(model, backend))
            del model
            torch.cuda.empty_cache()
        results[backend] = (len(counts[0]), len(counts[1]), per_layer(*counts))
    card = torch.cuda.get_device_properties(0).name
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Kernels per Qwen3 decoder layer in a decode step ({args.model} shapes, {card})", "",
             f"{date}, commit {os.environ.get('PAITON_COMMIT', 'unknown')}, torch {torch.__version__}. "
             f"bf16, batch 1, mode=default (no CUDA graphs, so the profiler sees each kernel).", ""]
    for backend, (short, long, layer) in results.items():
        lines += [f"## {backend}: {long - short} kernels per layer ({short} in a {args.layers}-layer step, {long} with one more layer)", ""]
        lines += [f"{i + 1}. `{name[:140]}`" for i, name in enumerate(layer)] + [""]
    table = "\n".join(lines)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"kernels_per_layer-{args.model}-{card.replace(' ', '_')}-{date[:10]}.md")
    with open(path, "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
