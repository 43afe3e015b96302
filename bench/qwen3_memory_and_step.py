"""Qwen3 on one GPU, whole model: device memory with merged projections, and the decode step
time, for eager, stock Inductor and Paiton in one process.

    python bench/qwen3_memory_and_step.py --model qwen3-8b [--out DIR] [--steps 48]

Memory: the merged-projections pass packs q/k/v and gate/up weights into one buffer per
group (parameters become views of it). The claim to check is that the model never holds two
copies of those weights: so the script reports the weight bytes, the memory allocated after
each configuration's compile and decode (steady state) and the peak during it, all relative
to the weights alone. Paiton runs first, so its peak includes the packing itself.

Step time: the loop of ../shared/baseline/baseline.py (HF StaticCache, prompt 128, batch 1,
random weights, bf16, one decode step timed at a time with a sync around it; median of the
steps after the first 5). Every configuration is fed the same tokens (eager's greedy choice);
the table shows at how many steps its own argmax is eager's, and its largest logit difference.
Writes qwen3_memory_and_step-<model>-<card>-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from bench_common import CONFIGS, compile_settings, run_environment, write_results


@torch.no_grad()
def decode_run(model, forward, prompt_ids, steps, follow=None, prefill=None):
    """Prefill (with `prefill`, default `forward`) + `steps` decode steps; per-step seconds, the
    logits of each step, the TTFT."""
    from transformers import StaticCache

    batch, prompt = prompt_ids.shape
    config = model.config
    cache = StaticCache(config=config, max_cache_len=prompt + steps + 8)
    cache.early_initialization(batch, config.num_key_value_heads, config.head_dim, model.dtype, prompt_ids.device)
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = (prefill or forward)(input_ids=prompt_ids, past_key_values=cache, cache_position=torch.arange(prompt, device="cuda"), use_cache=True)
    logits = [out.logits[:, -1].float().clone()]
    torch.cuda.synchronize()
    ttft = time.perf_counter() - start
    times = []
    for i in range(steps):
        token = (follow[i] if follow is not None else logits[-1]).argmax(-1, keepdim=True)
        position = torch.tensor([prompt + i], device="cuda")
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = forward(input_ids=token, past_key_values=cache, cache_position=position,
                      position_ids=position.expand(batch, 1), use_cache=True)
        logits.append(out.logits[:, -1].float().clone())
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times, logits, ttft


def main(argv=None):
    import paiton
    from paiton.models.qwen3 import build_qwen3

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen3-8b")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--configs", default="paiton,inductor,eager", help=f"from {', '.join(CONFIGS)}")
    parser.add_argument("--eager-prefill", action="store_true",
                        help="prefill uncompiled, as ../shared/baseline does (compiles the decode graph only)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = build_qwen3(args.model, device="cuda", dtype=torch.bfloat16)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    prompt_ids = torch.randint(0, model.config.vocab_size, (1, 128), device="cuda")
    gib = 2**30
    eager_times, eager_logits, _ = decode_run(model, model, prompt_ids, args.steps)  # also the tokens all follow
    env = dict(run_environment("cuda"), model=args.model, weights_gib=weights / gib, steps=args.steps)
    rows = []
    for name in args.configs.split(","):
        torch._dynamo.reset()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        compile_start = time.perf_counter()
        if name == "eager":
            forward, times, logits, ttft = model, *decode_run(model, model, prompt_ids, args.steps, follow=eager_logits)
        else:
            backend, settings = compile_settings(name, "cuda")
            forward = torch.compile(model, backend=backend, fullgraph=True, **settings)
            times, logits, ttft = decode_run(model, forward, prompt_ids, args.steps, follow=eager_logits,
                                             prefill=model if args.eager_prefill else None)
        total = time.perf_counter() - compile_start
        # Fed eager's tokens, does each step pick eager's next token? (A second generation on its
        # own tokens would need a new cache, whose new address costs a CUDA graph re-record.)
        agree = sum(int(torch.equal(a.argmax(-1), e.argmax(-1))) for a, e in zip(logits, eager_logits))
        row = dict(
            config=name,
            tpot_ms=statistics.median(times[5:]) * 1e3,
            first_run_s=total,
            ttft_first_run_ms=ttft * 1e3,
            max_logit_diff=max((a - e).abs().max().item() for a, e in zip(logits, eager_logits)),
            argmax_equal_eager_steps=f"{agree}/{len(eager_logits)}",
            allocated_over_weights_gib=(torch.cuda.memory_allocated() - weights) / gib,
            peak_over_weights_gib=(torch.cuda.max_memory_allocated() - weights) / gib,
        )
        if name.startswith("paiton"):
            row["fusions"] = paiton.fusion_counts(model)
            attention = model.model.layers[0].self_attn
            row["qkv_one_buffer"] = len({attention.q_proj.weight.untyped_storage().data_ptr(),
                                         attention.k_proj.weight.untyped_storage().data_ptr(),
                                         attention.v_proj.weight.untyped_storage().data_ptr()}) == 1
        rows.append(row)
        print(row, flush=True)
        write_table(args, env, rows)  # after every row: a run cut short keeps what it measured


def write_table(args, env, rows):
    card = env["card"]
    lines = [f"# {args.model}: memory and decode step, eager vs stock Inductor vs Paiton ({card})", "",
             f"{env['date']}, commit {env['commit']}, torch {env['torch']}, triton {env['triton']}, transformers "
             f"{env['transformers']}. bf16, random weights, batch 1, prompt 128, HF StaticCache, CUDA graphs "
             f"for every compiled configuration (-cdt: plus coordinate descent tuning), prefill "
             f"{'eager' if args.eager_prefill else 'compiled'}. Weights: {env['weights_gib']:.2f} GiB.", "",
             "| config | TPOT ms (median) | first run s (compile + 1 generation) | max abs logit diff vs eager | argmax = eager (steps) | allocated - weights GiB | peak - weights GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['tpot_ms']:.2f} | {r['first_run_s']:.0f} | {r['max_logit_diff']:.3f} | "
                     f"{r['argmax_equal_eager_steps']} | {r['allocated_over_weights_gib']:.2f} | {r['peak_over_weights_gib']:.2f} |")
    table = "\n".join(lines) + "\n"
    write_results(args.out, f"qwen3_memory_and_step-{args.model}-{card.replace(' ', '_')}-{env['date'][:10]}",
                  dict(env=env, rows=rows), table, echo=False)


if __name__ == "__main__":
    main()
