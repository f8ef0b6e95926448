"""Tree-search throughput: batched across trees vs. one tree at a time vs. the engine's raw generation.

In one process on the same model: (a) the search over all tasks as one shard (every rollout step of every tree
in one engine call per turn round), (b) the same search one tree at a time (shard size 1: what a per-tree
search loop does), (c) the engine's raw batched generation of the same views the search generated from, the
same number of tokens per view (greedy, end-of-turn suppressed), at the same max batch, and (d) the same raw
generation of (b)'s views call by call as (b) made them: (c)/(d) is what batching alone buys on this hardware,
the ceiling of (a)/(b). Same tasks, same search knobs, same seeds; T_norm is calibrated once beforehand and
shared (not timed). Token counts are the ledger's ``generated_tokens`` deltas. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from dits.engine.base import SamplingParams, View
from dits.engine.hf import HFEngine
from dits.mas.protocol import ProtocolConfig
from dits.reward import RewardConfig
from dits.search.mcts import SearchConfig, run_search
from dits.search.rollout import DialogueRollouter, calibrate_t_norm
from dits.search.tree import Tree
from dits.tasks.builtin import make_builtin
from dits.tasks.example import Example


def search(
    engine: HFEngine,
    examples: Sequence[Example],
    protocol: ProtocolConfig,
    cfg: SearchConfig,
    t_norm: float,
    shard_size: int,
    seed: int,
) -> tuple[dict[str, float], list[Tree], list[list[View]]]:
    """Run the search shard by shard; return figures, trees and the views of each engine call."""
    calls: list[list[View]] = []
    inner = engine.generate

    def recording(vs, sampling, seeds=None):  # type: ignore[no-untyped-def]
        calls.append(list(vs))
        return inner(vs, sampling, seeds=seeds)

    engine.generate = recording  # type: ignore[method-assign]
    roll = DialogueRollouter(engine, examples, protocol, RewardConfig(), t_norm, temperature=0.7, top_p=1.0)
    before = engine.ledger.snapshot()
    t0 = time.perf_counter()
    trees: list[Tree] = []
    try:
        for start in range(0, len(examples), shard_size):
            shard = [ex.id for ex in examples[start : start + shard_size]]
            trees += run_search(shard, roll, cfg, seed=seed)
            roll.forget(shard)
    finally:
        del engine.generate  # back to the class method
    dt = time.perf_counter() - t0
    spent = engine.ledger.snapshot() - before
    figures = {
        "generated_tokens": spent.generated_tokens,
        "prompt_tokens": spent.prompt_tokens,
        "scored_tokens": spent.scored_tokens,
        "seconds": round(dt, 2),
        "tokens_per_s": round(spent.generated_tokens / dt, 2),
        "generate_calls": len(calls),
        "utterances": sum(len(c) for c in calls),
        "rollouts": roll.stats.rollouts,
    }
    return figures, trees, calls


def raw_generation(engine: HFEngine, calls: list[list[View]], per_view: int) -> dict[str, float]:
    """Greedy generation of exactly ``per_view`` tokens from each view (end-of-turn suppressed), one
    engine call per entry of ``calls``."""
    eos = engine.eos_ids
    engine.eos_ids = set()
    try:
        before = engine.ledger.snapshot()
        t0 = time.perf_counter()
        for views in calls:
            engine.generate(views, SamplingParams(max_new_tokens=per_view))
        dt = time.perf_counter() - t0
    finally:
        engine.eos_ids = eos
    spent = engine.ledger.snapshot() - before
    return {
        "generated_tokens": spent.generated_tokens,
        "prompt_tokens": spent.prompt_tokens,
        "views": sum(len(v) for v in calls),
        "calls": len(calls),
        "tokens_per_view": per_view,
        "seconds": round(dt, 2),
        "tokens_per_s": round(spent.generated_tokens / dt, 2),
    }


def _shape(tree: Tree) -> list[tuple[str, str | None, str]]:
    """A tree without its float statistics: ids, parents, utterances (batching may move reward bits)."""
    return [(n.id, n.parent, n.utterance) for n in tree.nodes.values()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--explore", type=int, default=2)
    ap.add_argument("--expand", type=int, default=3)
    ap.add_argument("--max-turns", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--batch", type=int, default=64, help="the engine's max batch (every run)")
    ap.add_argument("--hops", type=int, default=1, help="facts task difficulty")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (0: torch's default). 1 by default: on a shared 2-core machine two "
        "OpenMP threads made decoding 10-25x slower (measured), which would swamp the comparison",
    )
    ap.add_argument("--dump", help="write both runs' trees here (trees_batched.jsonl, trees_single.jsonl)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    engine = HFEngine("smollm2-135m", max_batch=args.batch)
    examples = make_builtin("facts", "train", args.tasks, args.seed, hops=args.hops)
    protocol = ProtocolConfig(max_turns=args.max_turns, max_new_tokens=args.max_new_tokens)
    cfg = SearchConfig(explore=args.explore, expand=args.expand)
    t_norm = calibrate_t_norm(engine, examples, protocol, seed=args.seed).t_norm  # also warms the model up

    batched, trees_a, calls_a = search(engine, examples, protocol, cfg, t_norm, len(examples), args.seed)
    single, trees_b, calls_b = search(engine, examples, protocol, cfg, t_norm, 1, args.seed)

    # (c) the views of (a), the same tokens per view, in one batched generate call with EOS suppressed;
    # (d) the views of (b), call by call as (b) made them, the same tokens per view: c/d is what batching
    # alone buys on this hardware, with no search around it (the ceiling of ratio_vs_one_tree_at_a_time).
    views = [v for call in calls_a for v in call]
    per_view = max(1, round(batched["generated_tokens"] / max(1, len(views))))
    raw = raw_generation(engine, [views], per_view)
    raw_small = raw_generation(engine, calls_b, per_view)
    if args.dump:
        out = Path(args.dump)
        out.mkdir(parents=True, exist_ok=True)
        for name, trees in (("batched", trees_a), ("single", trees_b)):
            (out / f"trees_{name}.jsonl").write_text("".join(t.to_json() + "\n" for t in trees))
    same = [t.to_json() for t in trees_a] == [t.to_json() for t in trees_b]
    same_texts = [_shape(t) for t in trees_a] == [_shape(t) for t in trees_b]
    reward_diff = max(
        (
            abs(x.reward - y.reward)
            for a, b in zip(trees_a, trees_b, strict=True)
            for x, y in zip(a.rollouts, b.rollouts, strict=False)
        ),
        default=0.0,
    )
    print(
        json.dumps(
            {
                "tasks": args.tasks,
                "explore": args.explore,
                "expand": args.expand,
                "max_turns": args.max_turns,
                "max_new_tokens": args.max_new_tokens,
                "t_norm": t_norm,
                "batched": batched,
                "one_tree_at_a_time": single,
                "raw_engine": raw,
                "raw_engine_one_tree_at_a_time": raw_small,
                "engine_batching_ceiling": round(raw["tokens_per_s"] / raw_small["tokens_per_s"], 2),
                "same_trees": same,
                "same_tree_texts": same_texts,
                "max_reward_diff": reward_diff,
                "ratio_vs_one_tree_at_a_time": round(batched["tokens_per_s"] / single["tokens_per_s"], 2),
                "ratio_vs_raw_engine": round(batched["tokens_per_s"] / raw["tokens_per_s"], 2),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
