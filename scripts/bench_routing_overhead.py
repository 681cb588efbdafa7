"""Overhead of recording routing during generation: model.generate with and without record_routing.

    python scripts/bench_routing_overhead.py                  # writes results/benchmarks/routing_overhead.{json,md}
    python scripts/bench_routing_overhead.py --repeats 3 --new-tokens 16
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import transformers

from cfmoe.provenance import sidecar, write_json_atomic, write_text_atomic
from cfmoe.routing import record_routing

OUT = Path(__file__).resolve().parent.parent / "results" / "benchmarks" / "routing_overhead"

# the study's default shape: Qwen2-MoE with 64 routed experts, top-6, and a shared expert
MODEL = dict(vocab_size=8192, hidden_size=128, intermediate_size=384, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=4, num_experts=64, num_experts_per_tok=6, moe_intermediate_size=96,
             shared_expert_intermediate_size=96, max_position_embeddings=512)
MODES = ("plain", "experts", "experts+probs")
CLOCKS = ("cpu", "wall")


def build(seed: int) -> transformers.PreTrainedModel:
    """The random-weight float32 Qwen2-MoE under test."""
    torch.manual_seed(seed)
    model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**MODEL))
    return model.eval()


def prompts(batch: int, seed: int) -> dict[str, torch.Tensor]:
    """A left-padded batch of random prompts of different lengths (16 to 40 tokens)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(16, 40, batch).long()
    ids = torch.zeros(batch, int(lengths.max()), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths.tolist()):
        ids[b, -n:] = torch.randint(1, MODEL["vocab_size"], (n,), generator=g)
        mask[b, -n:] = 1
    return {"input_ids": ids, "attention_mask": mask}


def generate_seconds(model, inputs, new_tokens: int, mode: str) -> dict[str, float]:
    """Wall and process CPU seconds of one greedy generate of exactly `new_tokens` tokens, recording per `mode`."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        if mode == "plain":
            model.generate(**inputs, **kwargs)
        else:
            with record_routing(model, record_probs=mode == "experts+probs") as recorder:
                model.generate(**inputs, **kwargs)
            recorder.calls()  # the one transfer and conversion at the end belongs to the cost
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def run(repeats: int, batch: int, new_tokens: int, threads: int, seed: int) -> dict:
    """Interleaved repeats (mode order rotated each repeat); overhead = median over repeats of recorded / plain,
    on process CPU time (robust to other jobs on a shared CPU) and on wall time."""
    torch.set_num_threads(threads)
    model, inputs = build(seed), prompts(batch, seed)
    for mode in MODES:  # warm-up
        generate_seconds(model, inputs, new_tokens, mode)
    runs = {mode: [] for mode in MODES}
    for r in range(repeats):
        for mode in MODES[r % 3:] + MODES[:r % 3]:
            runs[mode].append(generate_seconds(model, inputs, new_tokens, mode))
    seconds = {clock: {mode: [run[clock] for run in runs[mode]] for mode in MODES} for clock in CLOCKS}
    ratios = {clock: {mode: [t / p for t, p in zip(s[mode], s["plain"])] for mode in MODES[1:]}
              for clock, s in seconds.items()}
    overhead = {clock: {mode: statistics.median(r) - 1 for mode, r in per_mode.items()}
                for clock, per_mode in ratios.items()}
    quartiles = {clock: {mode: [q - 1 for q in statistics.quantiles(r, n=4)[::2]] for mode, r in per_mode.items()}
                 for clock, per_mode in ratios.items()}
    return {"seconds": seconds, "ratios": ratios, "median_overhead": overhead, "overhead_quartiles": quartiles}


def markdown(result: dict, args: argparse.Namespace) -> str:
    lines = ["# Routing-recording overhead on generation", "",
             f"Qwen2-MoE (6 layers, hidden 128, 64 experts top-6, shared expert, vocab 8192, random float32), batch "
             f"{args.batch}, {args.new_tokens} new tokens, greedy, {args.threads} torch thread(s), {args.repeats} "
             "interleaved repeats; overhead = median over repeats of (recorded time / plain time) - 1. Process CPU "
             "time is the headline: wall time also counts other jobs sharing the CPU.", "",
             "| recording | overhead (CPU time) | its quartiles | overhead (wall) | median CPU s | median wall s |",
             "| --- | --- | --- | --- | --- | --- |"]
    median = {clock: {mode: statistics.median(s) for mode, s in per_mode.items()}
              for clock, per_mode in result["seconds"].items()}
    lines.append(f"| plain | - | - | - | {median['cpu']['plain']:.3f} | {median['wall']['plain']:.3f} |")
    for mode in MODES[1:]:
        low, high = result["overhead_quartiles"]["cpu"][mode]
        lines.append(f"| {mode} | {result['median_overhead']['cpu'][mode]:+.1%} | {low:+.1%} .. {high:+.1%} | "
                     f"{result['median_overhead']['wall'][mode]:+.1%} | {median['cpu'][mode]:.3f} | "
                     f"{median['wall'][mode]:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT, help="output stem (.json and .md are written)")
    args = parser.parse_args()
    result = run(args.repeats, args.batch, args.new_tokens, args.threads, args.seed)
    config = {"model": MODEL, "dtype": "float32", **{k: v for k, v in vars(args).items() if k != "out"}}
    write_json_atomic(args.out.with_suffix(".json"), sidecar(config, args.seed, **result))
    write_text_atomic(args.out.with_suffix(".md"), text := markdown(result, args))
    print(text, end="")


if __name__ == "__main__":
    main()
