"""Engine throughput vs. plain ``model.generate``, side by side in one process on the same model.

(a) the dits engine on all prompts, (b) ``model.generate`` one prompt at a time (how a naive tree search
calls a model), (c) ``model.generate`` at the engine's batch size with left padding. Same prompts, same
greedy decoding, same number of new tokens; EOS is suppressed in all three so every row really produces
``--new-tokens`` tokens and the token counts are equal. Prints one JSON object.

``--protocol``: the prompts are real agent views of the two-agent protocol instead (Alice's first turn on
built-in ``facts`` test tasks, with the worked examples): they share a long prefix, which the engine computes
and stores once (:mod:`dits.engine.shared_prefix`) while plain ``generate`` computes and caches it per row.
The process's peak resident memory is read after (a) and after (c).

``--sampled``: also the engine sampling at temperature 0.7 with top_p 1 (inverse CDF in vocabulary order)
and with top_p 0.999999 (the nucleus path, which sorts each row's probabilities; it keeps all but a
negligible tail, so both sample almost the same distribution), same views and token counts.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from dits.engine.base import SamplingParams
from dits.engine.hf import HFEngine
from dits.mas.protocol import ProtocolConfig, render_view
from dits.tasks.builtin import make_builtin

TOPICS = [
    "the moon",
    "a river",
    "bread",
    "trains",
    "a violin",
    "winter",
    "bees",
    "a lighthouse",
    "chess",
    "volcanoes",
    "paper",
    "owls",
    "the desert",
    "a bicycle",
    "glass",
    "tea",
]


def prompts(n: int) -> list[list[dict[str, str]]]:
    """Prompts of varied length, as a tree search sees them (different prefixes, different sizes)."""
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        filler = " ".join(["Please be vivid and specific."] * (i % 5))
        out.append([{"role": "user", "content": f"Write a short story about {topic}. {filler}".strip()}])
    return out


def protocol_views(n: int) -> list[list[dict[str, str]]]:
    """Alice's first-turn views on ``n`` built-in facts test tasks (system prompt, worked examples, task)."""
    return [render_view(ex, [], 0, ProtocolConfig()) for ex in make_builtin("facts", "test", n)]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64, help="the engine's max batch (also used for (c))")
    ap.add_argument(
        "--sequential-sample",
        type=int,
        default=16,
        help="run (b) on this many prompts and extrapolate tokens/s (it is the slow one)",
    )
    ap.add_argument("--protocol", action="store_true", help="real agent views sharing a long prefix")
    ap.add_argument("--sampled", action="store_true", help="also time sampling without and with the sort")
    args = ap.parse_args()
    torch.manual_seed(0)
    engine = HFEngine("smollm2-135m", max_batch=args.batch, token_budget=1 << 20)
    eos = sorted(engine.eos_ids)
    engine.eos_ids = set()  # (a): no early stop, like suppress_tokens in (b)/(c)
    views = protocol_views(args.prompts) if args.protocol else prompts(args.prompts)
    tok, model = engine.tokenizer, engine.base

    engine.generate(views[:2], SamplingParams(max_new_tokens=4))  # warm-up
    t = time.perf_counter()
    outs = engine.generate(views, SamplingParams(max_new_tokens=args.new_tokens))
    a_s = time.perf_counter() - t
    a_tokens = sum(len(o[0].token_ids) for o in outs)
    rss_a = peak_rss_gb()
    sampled: dict[str, float] = {}
    if args.sampled:
        for name, top_p in (("top_p_1", 1.0), ("nucleus_sorted", 0.999999)):
            sp = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.7, top_p=top_p, seed=1)
            t = time.perf_counter()
            n = sum(len(o[0].token_ids) for o in engine.generate(views, sp))
            sampled[f"{name}_tokens_per_s"] = round(n / (time.perf_counter() - t), 1)
        sampled["ratio_unsorted_vs_sorted"] = round(
            sampled["top_p_1_tokens_per_s"] / sampled["nucleus_sorted_tokens_per_s"], 2
        )

    gen_kw = dict(
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        suppress_tokens=eos,
        pad_token_id=engine.pad_id,
    )
    encoded = [engine.encode_view(v) for v in views]
    seq = encoded[: args.sequential_sample]
    t = time.perf_counter()
    b_tokens = 0
    with torch.inference_mode():
        for ids in seq:
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), **gen_kw)
            b_tokens += y.shape[1] - x.shape[1]
    b_s = time.perf_counter() - t

    tok.padding_side = "left"
    t = time.perf_counter()
    c_tokens = 0
    with torch.inference_mode():
        for i in range(0, len(encoded), args.batch):
            chunk = encoded[i : i + args.batch]
            batch = tok.pad({"input_ids": chunk}, return_tensors="pt", padding=True)
            y = model.generate(**batch, **gen_kw)
            c_tokens += (y.shape[1] - batch["input_ids"].shape[1]) * len(chunk)
    c_s = time.perf_counter() - t
    rss_c = peak_rss_gb()

    a, b, c = a_tokens / a_s, b_tokens / b_s, c_tokens / c_s
    print(
        json.dumps(
            {
                "prompts": args.prompts,
                "views": "protocol" if args.protocol else "stories",
                "prompt_tokens_mean": round(sum(map(len, encoded)) / len(encoded), 1),
                "new_tokens": args.new_tokens,
                "batch": args.batch,
                "engine_tokens_per_s": round(a, 1),
                "sequential_generate_tokens_per_s": round(b, 1),
                "batched_generate_tokens_per_s": round(c, 1),
                "ratio_vs_sequential": round(a / b, 2),
                "ratio_vs_plain_batched": round(a / c, 2),
                "peak_rss_gb_after_engine": round(rss_a, 2),
                "peak_rss_gb_after_batched": round(rss_c, 2),
                **({"sampled": sampled} if sampled else {}),
                "tokens": {
                    "engine": a_tokens,
                    "sequential": b_tokens,
                    "sequential_prompts": len(seq),
                    "batched": c_tokens,
                },
            }
        )
    )


if __name__ == "__main__":
    main()
