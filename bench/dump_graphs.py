"""Write the ATen graphs Paiton's passes see, before and after, for a tiny Qwen3's prefill and
StaticCache decode step, on this machine's device (the graph differs per device, torch and
transformers version: SDPA lowers to other ops on CUDA than on CPU). For writing patterns.

    python bench/dump_graphs.py --out DIR [--dtype bfloat16] [--inner inductor]
"""

import argparse
import os

import torch


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--inner", default="inductor", choices=["inductor", "eager"])
    args = parser.parse_args()

    from paiton.models.hf_loop import hf_static_cache_greedy
    from paiton.models.qwen3 import build_qwen3
    from paiton.passes.pass_manager import PaitonPassManager

    graphs = []
    original = PaitonPassManager.__call__

    def readable(graph):
        module = torch.fx.GraphModule(torch.nn.Module(), graph)
        return module.print_readable(print_output=False, include_stride=True, include_device=True)

    def recording(self, graph):
        before = readable(graph)
        original(self, graph)
        graphs.append((before, readable(graph)))

    PaitonPassManager.__call__ = recording
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_qwen3("tiny", device=device, dtype=getattr(torch, args.dtype), num_hidden_layers=1)
    options = {"paiton.inner_compiler": args.inner}
    if args.inner == "inductor":
        options["fx_graph_cache"] = False  # a cache hit would skip the passes, and the dump
    compiled = torch.compile(model, backend="paiton", options=options)
    hf_static_cache_greedy(compiled, model, torch.randint(0, 500, (2, 5), device=device), 3)
    os.makedirs(args.out, exist_ok=True)
    for index, (before, after) in enumerate(graphs):
        name = ("prefill", "decode")[index] if index < 2 else f"graph{index}"
        for stage, text in (("before", before), ("after", after)):
            path = os.path.join(args.out, f"aten_{name}_{stage}_{device}_{args.dtype}.txt")
            with open(path, "w") as f:
                f.write(f"# torch {torch.__version__}, device {device}, inner {args.inner}\n{text}\n")
            print(path)


if __name__ == "__main__":
    main()
