"""Quality of the bundled demo model on its held-out validation text, and what its routers learned.

Measures, with this engine in fp32 on the CPU:
- validation perplexity (consecutive windows of --window tokens, as in training) against a
  unigram baseline fitted on the validation text itself (the best any unigram model can do on
  that text, so the ratio is a conservative one);
- per layer: how often each expert is used, the entropy of that usage (3 bits = perfectly even
  over 8 experts), and the fraction of consecutive tokens that keep an expert (of the experts
  token t+1 uses, the share that token t also used), beside two baselines: a uniformly random
  router (K/E) and the same routing with the token order shuffled (same usage, no locality).

It does not measure speed; see bench_engine.py.

    python benchmarks/demo_quality.py [--model DIR] [--text FILE] [--max-tokens N] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from offload.demo import DEMO_MODEL_DIR
from offload.device import device_name
from offload.engine import Engine
from offload.experts.record import RecordLayout

DEFAULT_TEXT = Path(__file__).resolve().parent / "data" / "python-docs-valid.txt"


def keep_rate(chosen: torch.Tensor) -> float:
    """chosen [T, K] -> share of token t+1's experts that token t also chose."""
    prev, nxt = chosen[:-1], chosen[1:]  # [T-1, K]
    kept = (nxt[:, :, None] == prev[:, None, :]).any(-1)  # [T-1, K]
    return kept.float().mean().item()


def validation_stream(engine: Engine, args) -> torch.Tensor:
    ids = engine.tokenizer.encode(args.text.read_text(encoding="utf-8"), bos=True)
    if args.max_tokens:
        ids = ids[: args.max_tokens + 1]
    return torch.tensor(ids)


def negative_log_likelihood(engine: Engine, stream: torch.Tensor, window: int) -> tuple[float, int]:
    """Summed next-token NLL over consecutive windows of ``window`` tokens, and the token count."""
    nll, count = 0.0, 0
    for w in range((stream.numel() - 1) // window):
        chunk = stream[w * window : (w + 1) * window + 1]
        logits = engine.logits(chunk[:-1].tolist()).float()  # [W, V]
        nll += torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum").item()
        count += window
    return nll, count


def compare_formats(args) -> int:
    """Validation perplexity with the experts in each format, relative to the first."""
    rows = []
    for name in args.expert_formats.split(","):
        engine = Engine.load(
            args.model, device="cpu", dtype=args.dtype, context_length=args.window, expert_format=name
        )
        stream = validation_stream(engine, args)
        nll, count = negative_log_likelihood(engine, stream, args.window)
        rows.append({"expert_format": name, "perplexity": math.exp(nll / count), "tokens": count,
                     "expert_bytes": RecordLayout.for_config(engine.config, name).nbytes})
    base = rows[0]["perplexity"]
    for row in rows:
        row["relative"] = row["perplexity"] / base
    if args.json:
        print(json.dumps({"machine": device_name(torch.device("cpu")), "dtype": args.dtype, "rows": rows}, indent=2))
        return 0
    print(f"machine: {device_name(torch.device('cpu'))}, torch {torch.__version__}; compute dtype {args.dtype}; "
          f"{rows[0]['tokens']:,} validation tokens")
    print(f"{'experts':>8} {'bytes/expert':>13} {'perplexity':>11} {'vs ' + rows[0]['expert_format']:>9}")
    for row in rows:
        print(f"{row['expert_format']:>8} {row['expert_bytes']:>13,} {row['perplexity']:>11.3f} "
              f"{(row['relative'] - 1) * 100:>+8.2f}%")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR)
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=0, help="evaluate at most this many tokens (0 = all)")
    parser.add_argument("--seed", type=int, default=0, help="for the shuffled baseline")
    parser.add_argument("--dtype", default="float32", help="compute dtype")
    parser.add_argument(
        "--expert-formats",
        default="",
        help="comma list of expert formats (e.g. bf16,int8,nf4): print only the perplexity of each, "
        "relative to the first",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    if args.expert_formats:
        return compare_formats(args)
    engine = Engine.load(args.model, device="cpu", dtype=args.dtype, context_length=args.window)
    c = engine.config
    stream = validation_stream(engine, args)

    # ---- perplexity ---------------------------------------------------------------------------
    routed: dict[int, list[torch.Tensor]] = {layer: [] for layer in range(c.num_hidden_layers)}
    engine.model.routing_observer = lambda layer, experts, _w: routed[layer].append(experts.cpu())
    nll, count = negative_log_likelihood(engine, stream, args.window)
    engine.model.routing_observer = None
    windows = count // args.window
    evaluated = stream[1 : windows * args.window + 1]
    freq = torch.bincount(evaluated, minlength=c.vocab_size).double() / evaluated.numel()
    unigram_nll = -(freq[evaluated] .log()).mean().item()
    ppl, unigram_ppl = math.exp(nll / count), math.exp(unigram_nll)

    # ---- routing ------------------------------------------------------------------------------
    generator = torch.Generator().manual_seed(args.seed)
    layers = []
    for layer in range(c.num_hidden_layers):
        chosen = torch.cat(routed[layer])  # [N, K], windows back to back
        usage = torch.bincount(chosen.reshape(-1), minlength=c.num_local_experts).double()
        share = usage / usage.sum()
        entropy = -(share[share > 0] * share[share > 0].log2()).sum().item()
        shuffled = chosen[torch.randperm(chosen.shape[0], generator=generator)]
        layers.append({
            "layer": layer,
            "usage": [round(x, 4) for x in share.tolist()],
            "usage_entropy_bits": entropy,
            "keep_rate": keep_rate(chosen),
            "keep_rate_shuffled": keep_rate(shuffled),
        })
    random_keep = c.num_experts_per_tok / c.num_local_experts

    result = {
        "machine": device_name(torch.device("cpu")),
        "model": str(args.model),
        "text": str(args.text),
        "tokens": count,
        "perplexity": ppl,
        "unigram_perplexity": unigram_ppl,
        "unigram_over_model": unigram_ppl / ppl,
        "random_router_keep_rate": random_keep,
        "max_entropy_bits": math.log2(c.num_local_experts),
        "layers": layers,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0

    print(f"machine: {result['machine']}, torch {torch.__version__}")
    print(f"model: {args.model}  text: {args.text.name}, {count:,} tokens in windows of {args.window}")
    print(f"validation perplexity {ppl:.2f} | unigram baseline {unigram_ppl:.2f} | "
          f"unigram / model = {unigram_ppl / ppl:.2f}x")
    print()
    print(f"{'layer':>5}  {'usage per expert (share of assignments)':<48} {'entropy':>8} "
          f"{'keep':>6} {'shuffled':>9} {'random':>7}")
    for row in layers:
        usage = " ".join(f"{u:.2f}" for u in row["usage"])
        print(f"{row['layer']:>5}  {usage:<48} {row['usage_entropy_bits']:>7.3f}b "
              f"{row['keep_rate']:>6.3f} {row['keep_rate_shuffled']:>9.3f} {random_keep:>7.3f}")
    mean_keep = sum(r["keep_rate"] for r in layers) / len(layers)
    mean_shuffled = sum(r["keep_rate_shuffled"] for r in layers) / len(layers)
    print(f"{'mean':>5}  {'':<48} {'':>8} {mean_keep:>6.3f} {mean_shuffled:>9.3f} {random_keep:>7.3f}")
    print("entropy: of each layer's expert usage, 3 bits = even over 8 experts; keep: share of token "
          "t+1's experts also used by token t")
    return 0


if __name__ == "__main__":
    sys.exit(main())
