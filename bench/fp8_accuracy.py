"""FP8 accuracy (issue 21): logits of the FP8 model against the same model in its own dtype,
teacher-forced over a few hundred tokens, on random weights and on weights with outlier
structure.

    python bench/fp8_accuracy.py --models tiny,qwen3-0.6b --tokens 320            # CPU
    python bench/fp8_accuracy.py --models qwen3-8b,qwen3-32b --device cuda         # GPU, bf16

Per model and weight kind: one sequence of `--tokens` tokens (a random prompt of 32, then the
reference model's own greedy continuation), run through both models in one forward (teacher
forcing: both see the same tokens at every position), and at every position compared: the
largest and the mean |logit difference|, both relative to the reference logits' standard
deviation too, and how often the argmax (the greedy token) agrees. `--baseline` adds, per
row, the reference dtype itself against float32 on the same weights and tokens: random
weights give nearly flat logits (many near ties), so agreement is only meaningful beside it.

Weights: `random` is the presets' initialization (normal, std 0.02). `outliers` makes them look
more like trained LLM weights, which quantize worse: each linear's weight gets heavy tails
(elements drawn from Student's t with 4 degrees of freedom, scaled to the same std), 1% of its
input channels (columns) scaled 8x (the weight side of LLMs' outlier features), and 0.01% of
its elements scaled 30x. Per-channel scales are one per output row, so an outlier column raises
every row's absmax and coarsens the rest of the row: the hard case for this quantization.

The FP8 model is `quantize_fp8(copy)`: every decoder linear per channel, lm_head and embeddings
kept; with `--lm-head` a second row has the lm_head in FP8 too (per channel, as `paiton serve
--fp8-lm-head` runs it: at batch 1 it is 5% of Qwen3-32B's FP8 bytes read, 14% of Qwen3-8B's). Its several-row products (a prefill, or this teacher-forced forward) take the path
fusion/fp8_paths.py chooses: on a CPU the weight dequantized and multiplied in the model's dtype
(weight-only); on a GPU, timed per shape, at these row counts torch._scaled_mm, which quantizes
the activations to FP8 per token as well (W8A8: about 2^-4 of each activation besides), so a
GPU's numbers include that rounding and a CPU's do not. A decode step's one-row GEMV is
weight-only everywhere (the same FP8 values summed in fp32).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import run_environment, versions_line, write_results  # noqa: E402

WEIGHT_KINDS = ("random", "outliers")


def add_outliers(model: torch.nn.Module, seed: int) -> None:
    """The `outliers` weights of the module docstring, for every decoder linear, in place."""
    generator = torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight.data
                n, k = w.shape
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=generator)))
                # sampled where the weight lives (an 8B model's on its GPU: minutes less than on the CPU)
                tails = torch.distributions.StudentT(torch.tensor(4.0, device=w.device)).sample((n, k))
                tails = tails / tails.std() * w.float().std()
                columns = torch.randperm(k, generator=generator)[:max(1, k // 100)].to(w.device)
                tails[:, columns] *= 8
                # (drawn with replacement: a permutation of an 8B model's n * k takes seconds per weight)
                elements = torch.randint(0, n * k, (max(1, n * k // 10000),), generator=generator).to(w.device)
                tails.view(-1)[elements] *= 30
                w.copy_(tails.to(w.dtype))


@torch.no_grad()
def compare(reference: torch.nn.Module, fp8: torch.nn.Module, tokens: int, seed: int) -> dict:
    device = next(reference.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, reference.config.vocab_size, (1, 32), generator=generator).to(device)
    new = tokens - prompt.shape[1]
    ids = reference.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False) if new > 0 else prompt
    expected, actual = reference(ids).logits[0].float(), fp8(ids).logits[0].float()
    difference = (actual - expected).abs()
    spread = expected.std().item()
    agree = (actual.argmax(-1) == expected.argmax(-1)).float()
    return dict(tokens=ids.shape[1], max_logit_diff=difference.max().item(), mean_logit_diff=difference.mean().item(),
                logit_std=spread, max_diff_over_std=difference.max().item() / spread,
                mean_diff_over_std=difference.mean().item() / spread, greedy_agreement=agree.mean().item(),
                greedy_agreement_continuation=agree[32:].mean().item())


def main(argv=None):
    from paiton.models.fp8 import quantize_fp8
    from paiton.models.qwen3 import build_qwen3

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,qwen3-0.6b")
    parser.add_argument("--tokens", type=int, default=320, help="teacher-forced positions per sequence")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="the reference model's dtype (the FP8 model computes in it too)")
    parser.add_argument("--fp8-format", choices=["e4m3fn", "e4m3fnuz"], help="default: the chip's (CPU: e4m3fn)")
    parser.add_argument("--baseline", action="store_true",
                        help="also the reference dtype against float32 (how far bf16 itself is from exact)")
    parser.add_argument("--lm-head", action="store_true",
                        help="also a row per model and weight kind with the lm_head in FP8 too (quantize_fp8's "
                             "include_lm_head, `paiton serve --fp8-lm-head`)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    from paiton.fusion.fp8_linear import FP8_FORMATS

    dtype = getattr(torch, args.dtype)
    fp8_dtype = FP8_FORMATS[args.fp8_format] if args.fp8_format else None
    rows = []
    for name in args.models.split(","):
        for kind in WEIGHT_KINDS:
            reference = build_qwen3(name, device=args.device, dtype=dtype, seed=args.seed)
            if kind == "outliers":
                add_outliers(reference, args.seed)
            fp8 = quantize_fp8(copy.deepcopy(reference), dtype=fp8_dtype)
            format_used = next(m.weight.dtype for m in fp8.modules() if hasattr(m, "weight_scale"))
            row = dict(model=name, weights=kind, fp8=str(format_used).removeprefix("torch."), lm_head=False,
                       **compare(reference, fp8, args.tokens, args.seed))
            rows.append(row)
            if args.lm_head:  # the same FP8 decoder, its lm_head quantized as well
                quantize_fp8(fp8, dtype=format_used, include_lm_head=True)
                rows.append(dict(row, lm_head=True, **compare(reference, fp8, args.tokens, args.seed)))
            for r in rows[-1 - args.lm_head:]:
                print(f"{name} {kind}{' (lm_head FP8 too)' if r['lm_head'] else ''}: max |dlogit| {r['max_logit_diff']:.3g}, "
                      f"mean {r['mean_logit_diff']:.3g} (logit std {r['logit_std']:.3g}), "
                      f"greedy agreement {100 * r['greedy_agreement']:.1f}%", flush=True)
            if args.baseline:  # the reference dtype's own distance from fp32, on the same weights
                exact = copy.deepcopy(reference).float()
                rows.append(dict(model=name, weights=kind, fp8=f"none: {args.dtype} vs float32", lm_head=False,
                                 **compare(exact, reference, args.tokens, args.seed)))
            del reference, fp8
    env = dict(run_environment(args.device), dtype=args.dtype, tokens=args.tokens, seed=args.seed)
    table = markdown(env, rows)
    stem = write_results(args.out, f"fp8_accuracy-{env['card'].replace(' ', '_')}-{env['date'][:10]}",
                         dict(env=env, rows=rows), table)
    plot(rows, stem + ".png", env)


def markdown(env, rows) -> str:
    lines = [f"# FP8 weights against {env['dtype']}: teacher-forced logits", "",
             f"{versions_line(env)}, {env['card']}; {env['tokens']} positions per model and weight kind (32 random "
             "prompt tokens, then the reference's greedy continuation); every decoder linear per channel in FP8, "
             "the embeddings kept, the lm_head kept unless its column says FP8 (per channel too). Weights: "
             "bench/fp8_accuracy.py's docstring.", "",
             "| model | weights | FP8 | lm_head | max abs logit diff | mean abs logit diff | logit std | max / std | mean / std | "
             "greedy agreement (all / continuation) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = "FP8" if r.get("lm_head") else ("-" if r["fp8"].startswith("none") else env["dtype"])
        lines.append(f"| {r['model']} | {r['weights']} | {r['fp8']} | {head} | {r['max_logit_diff']:.3g} | {r['mean_logit_diff']:.3g} | "
                     f"{r['logit_std']:.3g} | {r['max_diff_over_std']:.3f} | {r['mean_diff_over_std']:.4f} | "
                     f"{100 * r['greedy_agreement']:.1f}% / {100 * r['greedy_agreement_continuation']:.1f}% |")
    return "\n".join(lines) + "\n"


def plot(rows, path, env):
    from bench_common import grouped_bar_plot

    groups = {f"{r['model']}\n{r['weights']}{' +head' if r.get('lm_head') else ''}{' (ref)' if r['fp8'].startswith('none') else ''}": {"mean |dlogit| / std (x100)": 100 * r["mean_diff_over_std"],
                                                 "greedy disagreement %": 100 * (1 - r["greedy_agreement"])} for r in rows}
    grouped_bar_plot(path, f"FP8 vs {env['dtype']}, {env['card']}, {env['date'][:10]}", groups, "")


if __name__ == "__main__":
    main()
