"""Scoring sampled conversations turn by turn against one forward per speaker, side by side in one process.

What the likelihood and gradient estimators pay per candidate (likelihood) and once (gradient's validation
gradient): ``log π`` of V × K sampled validation conversations. The old path scored every turn on its own
view, so a speaker's later turns re-read the whole conversation before them; ``score_turns`` scores each
speaker's turns of a conversation in one row (:func:`dits.engine.prompts.chain_turns`). Per turn limit:
the same conversations (sampled once at the estimators' temperature, not timed) scored both ways on the
base model, with the ledger's FLOPs, wall seconds, the largest difference in a conversation's ``log π``
and the ratios (joined / per turn). The per-turn path is timed first and second in alternate repeats.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dits.engine.hf import HFEngine
from dits.engine.prompts import chain_turns
from dits.influence.likelihood import Dialogue, speaker_dialogues
from dits.mas.dialogue import run_dialogues
from dits.mas.protocol import ProtocolConfig
from dits.seeding import derive_seed
from dits.tasks.builtin import make_builtin


def per_turn(
    engine: HFEngine, dialogues: list[tuple[int, Dialogue]], n: int, temperature: float
) -> list[float]:
    """The old path: every turn of every conversation on its own view, one call per forced prefix."""
    sums = [0.0] * n
    for prefix in sorted({d.prefix for _, d in dialogues}):
        items = [(i, turn) for i, d in dialogues if d.prefix == prefix for turn in d.turns]
        scored = engine.score(
            [v for _, (v, _) in items], [c for _, (_, c) in items], prefix, temperature=temperature
        )
        for (i, _), sc in zip(items, scored, strict=True):
            sums[i] += sum(sc.logprobs)
    return sums


def joined(
    engine: HFEngine, dialogues: list[tuple[int, Dialogue]], n: int, temperature: float
) -> list[float]:
    """The new path: one row per speaker and conversation."""
    sums = [0.0] * n
    with torch.inference_mode(), engine.adapter_scope():
        for prefix in sorted({d.prefix for _, d in dialogues}):
            items = [(i, d) for i, d in dialogues if d.prefix == prefix]
            scored = engine.score_turns([d.turns for _, d in items], prefix, temperature=temperature)
            for (i, _), turns in zip(items, scored, strict=True):
                sums[i] += sum(sum(sc.logprobs) for sc in turns)
    return sums


def measure(engine: HFEngine, max_turns: int, args: argparse.Namespace) -> dict[str, object]:
    proto = ProtocolConfig(
        max_turns=max_turns, max_new_tokens=args.max_new_tokens, turn_prefix=args.turn_prefix
    )
    examples = make_builtin(args.task, "dev", args.tasks, seed=args.seed)
    batch = [ex for ex in examples for _ in range(args.samples)]
    seeds = [derive_seed(args.seed, "turn_scoring", i) for i in range(len(batch))]
    transcripts = run_dialogues(engine, batch, proto, temperature=args.temperature, seeds=seeds)
    dialogues = [(i, d) for i, (ex, tr) in enumerate(zip(batch, transcripts, strict=True))
                 for d in speaker_dialogues(ex, tr, proto)]  # fmt: skip
    rows = sum(
        len(chain_turns(engine.prompts.pairs([v for v, _ in d.turns], [c for _, c in d.turns], d.prefix)))
        for _, d in dialogues
    )  # also warms the prompt-encoding cache for both paths
    figures: dict[str, dict[str, float]] = {
        "per_turn": {"seconds": 0.0, "flops": 0.0},
        "joined": {"seconds": 0.0, "flops": 0.0},
    }
    values: dict[str, list[float]] = {}
    for rep in range(args.repeats):
        order = [("per_turn", per_turn), ("joined", joined)]
        for name, fn in order if rep % 2 == 0 else order[::-1]:
            before = engine.ledger.snapshot()
            t0 = time.perf_counter()
            values[name] = fn(engine, dialogues, len(batch), args.temperature)
            figures[name]["seconds"] += (time.perf_counter() - t0) / args.repeats
            figures[name]["flops"] += engine.ledger.flops(engine.ledger.snapshot() - before) / args.repeats
    diff = max(abs(a - b) for a, b in zip(values["per_turn"], values["joined"], strict=True))
    return {
        "max_turns": max_turns,
        "conversations": len(batch),
        "mean_turns": round(sum(len(t.turns) for t in transcripts) / len(batch), 2),
        "turns": sum(len(d.turns) for _, d in dialogues),
        "rows_joined": rows,
        "per_turn": {k: float(f"{v:.4g}") for k, v in figures["per_turn"].items()},
        "joined": {k: float(f"{v:.4g}") for k, v in figures["joined"].items()},
        "max_abs_logp_difference": float(f"{diff:.3g}"),
        "flops_ratio_joined_vs_per_turn": round(figures["joined"]["flops"] / figures["per_turn"]["flops"], 3),
        "seconds_ratio_joined_vs_per_turn": round(
            figures["joined"]["seconds"] / figures["per_turn"]["seconds"], 3
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--task", default="facts")
    ap.add_argument("--tasks", type=int, default=20, help="validation tasks V (the reference's 20)")
    ap.add_argument("--samples", type=int, default=4, help="conversations per task K")
    ap.add_argument("--max-turns", default="4,10", help="comma-separated turn limits")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--turn-prefix", action="store_true", help="force 'Alice:' / 'Bob:' (the paper configs)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = HFEngine("smollm2-135m")
    results = [measure(engine, int(t), args) for t in args.max_turns.split(",")]
    print(
        json.dumps(
            {
                "tasks": args.tasks,
                "samples": args.samples,
                "turn_prefix": args.turn_prefix,
                "settings": results,
            }
        )
    )


if __name__ == "__main__":
    main()
