"""The reference table (issue 20): Qwen3-32B on ShareGPT V3 over batch sizes 1..128, our measured
rows beside the public reference rows we answer (vLLM on an H200, Paiton on an MI300X), with
ratios, from serving results files (bench/serving.py's JSON; any number, either scenario).

    python bench/reference_table.py bench/results/serving-qwen3-32b-*-sharegpt-*.json

A results file's scenario is its output length: from the dataset (no --output-len) or fixed at
256. Per batch size and scenario, each configuration's row is taken from the newest file that
has it. Writes reference_table-<model>-<card>-<date>.json/.md/.png beside the inputs (--out).
"""

from __future__ import annotations

import argparse
import json
import os

from bench_common import requests_per_batch_line, write_results

# The public result (total token throughput, tokens/s; dataset output lengths, then output 256),
# 32 ShareGPT V3 prompts at every batch size, vLLM's benchmark client; and its batch-1 mean TPOT.
REFERENCE = {
    "vLLM, H200": {1: (43.46, 41.17), 8: (166.55, 455.11), 32: (677.57, 1836.45), 128: (2107.07, 4547.69)},
    "Paiton, MI300X": {1: (56.30, 52.09), 8: (216.13, 577.28), 32: (860.65, 2130.28), 128: (2401.25, 4405.65)},
}
REFERENCE_TPOT_BATCH1_MS = {"vLLM, H200": 24.94, "Paiton, MI300X": 19.19}
SCENARIOS = ("dataset", "fixed 256")
TARGET_VS_MI300X = 1.2


def scenario_of(env: dict) -> str | None:
    output_len = env.get("output_len")
    return "dataset" if output_len is None else "fixed 256" if output_len == 256 else None


def collect(paths: list[str]) -> tuple[dict, list[dict]]:
    """{(batch, scenario, config): row}, newest file first wins; and the files' environments."""
    loaded = []
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        loaded.append((result["env"].get("date", ""), path, result))
    rows, envs = {}, []
    for _, path, result in sorted(loaded, reverse=True):
        env = dict(result["env"], file=os.path.basename(path))
        scenario = scenario_of(env)
        if scenario is None:
            continue
        envs.append(env)
        for row in result["rows"]:
            key = (row["batch"], scenario, row.get("label", row["config"]))
            rows.setdefault(key, dict(row, file=env["file"], scheduler=row.get("scheduler", "static")))
    return rows, envs


def build(rows: dict) -> list[dict]:
    """One entry per batch size: our configurations' total tok/s per scenario, the reference rows,
    and the ratios the issue's targets name."""
    batches = sorted({b for b, _, _ in rows} | {b for ref in REFERENCE.values() for b in ref})
    configs = sorted({c for _, _, c in rows}, key=lambda c: (c != "paiton", c))
    table = []
    for batch in batches:
        entry = {"batch": batch, "ours": {}, "reference": {}, "ratios": {}}
        for scenario_index, scenario in enumerate(SCENARIOS):
            for config in configs:
                row = rows.get((batch, scenario, config))
                if row:
                    entry["ours"][f"{config}, {scenario}"] = dict(
                        total_tok_s=row["total_token_throughput"], output_tok_s=row["output_throughput"],
                        mean_tpot_ms=row["mean_tpot_ms"], mean_ttft_ms=row["mean_ttft_ms"], completed=row["completed"],
                        scheduler=row["scheduler"], file=row["file"])
            for name, reference in REFERENCE.items():
                if batch in reference:
                    entry["reference"][f"{name}, {scenario}"] = reference[batch][scenario_index]
            paiton = rows.get((batch, scenario, "paiton"))
            if paiton:
                for name, reference in REFERENCE.items():
                    if batch in reference:
                        entry["ratios"][f"paiton / {name}, {scenario}"] = paiton["total_token_throughput"] / reference[batch][scenario_index]
                for config in configs:
                    other = rows.get((batch, scenario, config))
                    if config != "paiton" and other:
                        entry["ratios"][f"paiton / {config}, {scenario}"] = paiton["total_token_throughput"] / other["total_token_throughput"]
        table.append(entry)
    return table


def targets_line(table: list[dict]) -> str:
    """Where the issue's targets are missed, and which of the cells they need were not measured."""
    below_reference, below_stock, unmeasured = [], [], []
    for entry in table:
        for scenario in SCENARIOS:
            where = f"batch {entry['batch']} {scenario}"
            versus_reference = entry["ratios"].get(f"paiton / Paiton, MI300X, {scenario}")
            if versus_reference is not None and versus_reference < TARGET_VS_MI300X:
                below_reference.append(f"{where} ({versus_reference:.2f}x)")
            versus_stock = entry["ratios"].get(f"paiton / inductor-cdt, {scenario}")
            if versus_stock is not None and versus_stock < 1:
                below_stock.append(f"{where} ({versus_stock:.2f}x)")
            for config in ("paiton", "inductor-cdt"):
                if f"{config}, {scenario}" not in entry["ours"]:
                    unmeasured.append(f"{config} {where}")
    return ("Targets: below 1.2x the MI300X row: " + (", ".join(below_reference) or "none")
            + "; below stock Inductor + tuning: " + (", ".join(below_stock) or "none")
            + "; not measured: " + (", ".join(unmeasured) or "none") + ".")


def markdown(model: str, envs: list[dict], table: list[dict], note: str = "") -> str:
    env = envs[0]
    sources = ", ".join(sorted({e["file"] for e in envs}))

    def cell(entry, key, ratio_key=None):
        ours = entry["ours"].get(key)
        if not ours:
            return "-"
        text = f"{ours['total_tok_s']:.1f}"
        if ratio_key and ratio_key in entry["ratios"]:
            text += f" ({entry['ratios'][ratio_key]:.2f}x)"
        return text

    lines = [f"# {model}, ShareGPT V3, batch 1..128: against the reference", "",
             f"Our rows: {env['card']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}, {env['date']} "
             f"(from {sources}). Total tokens/s; in brackets Paiton's ratio to Paiton on the MI300X (target "
             f">= {TARGET_VS_MI300X}x) and, in the last columns, to stock Inductor + tuning in the same run (target >= 1x).", "",
             "| batch | Paiton (H200), dataset | Paiton (H200), fixed 256 | vLLM H200, dataset / 256 | Paiton MI300X, dataset / 256 "
             "| Paiton / vLLM H200, dataset / 256 | stock Inductor + cdt, dataset / 256 | Paiton / stock |",
             "|---|---|---|---|---|---|---|---|"]
    for entry in table:
        b = entry["batch"]
        ref = entry["reference"]

        def pair(name):
            a, c = ref.get(f"{name}, dataset"), ref.get(f"{name}, fixed 256")
            return f"{a:.2f} / {c:.2f}" if a is not None else "-"

        versus_vllm = " / ".join(f"{entry['ratios'][k]:.2f}x" if k in entry["ratios"] else "-"
                                 for k in ("paiton / vLLM, H200, dataset", "paiton / vLLM, H200, fixed 256"))
        stock = " / ".join(cell(entry, f"inductor-cdt, {s}") for s in SCENARIOS)
        versus_stock = " / ".join(f"{entry['ratios'][k]:.2f}x" if k in entry["ratios"] else "-"
                                  for k in ("paiton / inductor-cdt, dataset", "paiton / inductor-cdt, fixed 256"))
        lines.append(f"| {b} | {cell(entry, 'paiton, dataset', 'paiton / Paiton, MI300X, dataset')} | "
                     f"{cell(entry, 'paiton, fixed 256', 'paiton / Paiton, MI300X, fixed 256')} | {pair('vLLM, H200')} | "
                     f"{pair('Paiton, MI300X')} | {versus_vllm} | {stock} | {versus_stock} |")
    tpot = next((e["ours"].get("paiton, dataset") for e in table if e["batch"] == 1), None)
    lines += ["", "Mean TPOT at batch 1 (dataset lengths): "
              + (f"Paiton H200 {tpot['mean_tpot_ms']:.2f} ms; " if tpot else "Paiton H200 not measured yet; ")
              + "; ".join(f"{k} {v} ms" for k, v in REFERENCE_TPOT_BATCH1_MS.items()) + ".", "",
              "Not like for like: another card (H200 against the MI300X; vLLM's row is an H200 too); tokens counted by "
              f"{env.get('tokenizer') or 'the stand-in tokenizer'} (Qwen's tokenizer files cannot be fetched here; mean "
              f"prompt {env.get('mean_prompt_len', 0):.0f} and output {env.get('mean_output_len', 0):.0f} tokens under it over "
              "the workload file), random weights (decode time depends only on shapes); the reference ran 32 prompts at "
              "every batch size, ours " + requests_per_batch_line(env) + "; ours went through `paiton serve` (continuous batching) "
              "over HTTP where the row's scheduler says http, else the bundled loop in process.", "",
              targets_line(table)]
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def plot(table: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, scenario in zip(axes, SCENARIOS):
        series = {}
        for entry in table:
            for key, value in entry["ours"].items():
                if key.endswith(scenario):
                    series.setdefault(key.rsplit(",", 1)[0] + " (H200, ours)", []).append((entry["batch"], value["total_tok_s"]))
            for key, value in entry["reference"].items():
                if key.endswith(scenario):
                    series.setdefault(key.rsplit(",", 1)[0] + " (reference)", []).append((entry["batch"], value))
        for name, points in series.items():
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", linestyle="--" if "reference" in name else "-", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (max concurrency)")
        ax.set_ylabel("total tokens/s")
        ax.set_title(f"output: {scenario}")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="serving results JSON files")
    parser.add_argument("--out", help="folder of the table (default: the first input's)")
    parser.add_argument("--note", default="", help="a paragraph added to the markdown (what else is not like for like)")
    args = parser.parse_args(argv)
    rows, envs = collect(args.results)
    if not envs:
        parser.error("no results file with dataset output lengths or a fixed output of 256")
    table = build(rows)
    env = envs[0]
    model = os.path.basename(str(env["model"]))
    stem_name = f"reference_table-{model}-{env['card'].replace(' ', '_')}-{env['date'][:10]}"
    out = args.out or os.path.dirname(os.path.abspath(args.results[0]))
    stem = write_results(out, stem_name, dict(reference=REFERENCE, reference_tpot_batch1_ms=REFERENCE_TPOT_BATCH1_MS,
                                              sources=[e["file"] for e in envs], table=table),
                         markdown(model, envs, table, args.note))
    plot(table, stem + ".png", f"{model}, ShareGPT V3: ours (H200) against the reference")


if __name__ == "__main__":
    main()
