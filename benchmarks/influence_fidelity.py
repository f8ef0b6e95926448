"""How well the cheap influence estimators track the reference one, and what each costs, in one process.

The same candidates (chunks of preference pairs: from a ``pairs.jsonl`` given with ``--pairs``, else
synthetic ones on built-in ``train`` tasks: the gold answer preferred to a refusal or a wrong answer) are
scored by (a) ``rollout`` (take the step, greedy dialogues on V validation tasks), (b) ``likelihood``
(importance-weighted K samples per task) and (c) ``gradient`` (one backward), all from the same adapter θ.
Prints one JSON object: per estimator the scores, the one-off and per-candidate cost (ledger FLOPs and
seconds), and Pearson / Spearman correlation and sign agreement with the rollout scores and with each other.

``--metric hash`` replaces the task metric by a hash of the conversation text: a model too small to solve
the tasks scores 0 everywhere, and the correlations are then undefined; the hash metric still exercises the
likelihood-vs-gradient agreement (not the rollout one, whose greedy metric is then near-random).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random

import torch

from dits.engine.hf import HFEngine
from dits.influence import InfluenceConfig, InfluenceScore, chunk_pairs, make_estimator
from dits.influence.base import MetricFn
from dits.mas.dialogue import Transcript
from dits.mas.protocol import ProtocolConfig, render_view
from dits.search.pairs import PairCandidate
from dits.tasks.builtin import make_builtin
from dits.tasks.example import Example
from dits.train.common import adapter_parameters
from dits.train.config import LoraSettings


def hash_metric(example: Example, transcript: Transcript) -> float:
    return int(hashlib.sha256("|".join(transcript.texts).encode()).hexdigest()[:8], 16) / 2**32


def synthetic_pairs(dataset: str, n: int, protocol: ProtocolConfig, seed: int) -> list[PairCandidate]:
    rng = random.Random(seed)
    out = []
    for i, ex in enumerate(make_builtin(dataset, "train", n, seed=seed)):
        rejected = rng.choice(["I do not know.", "<A>nobody</A>", f"Maybe <A>{ex.answers[0][::-1]}</A>"])
        out.append(
            PairCandidate(
                tree_task_id=ex.id,
                node_id=f"n{i}",
                prefix=[],
                speaker=0,
                chosen=f"My notes say <A>{ex.answers[0]}</A>",
                rejected=rejected,
                chosen_id=f"c{i}",
                rejected_id=f"r{i}",
                q_chosen=1.0,
                q_rejected=0.0,
                visits_chosen=1,
                visits_rejected=1,
                prompt=render_view(ex, [], 0, protocol),
            )
        )
    return out


def _ranks(x: list[float]) -> list[float]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    ranks = [0.0] * len(x)
    i = 0
    while i < len(order):  # average ranks over ties
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def pearson(a: list[float], b: list[float]) -> float | None:
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    va, vb = sum((x - ma) ** 2 for x in a), sum((y - mb) ** 2 for y in b)
    if va == 0 or vb == 0:
        return None  # a constant series has no correlation
    return sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True)) / math.sqrt(va * vb)


def compare(a: list[float], b: list[float]) -> dict[str, float | None]:
    signs = [(x > 0) == (y > 0) for x, y in zip(a, b, strict=True) if x != 0 and y != 0]
    return {
        "pearson": pearson(a, b),
        "spearman": pearson(_ranks(a), _ranks(b)),
        "sign_agreement": sum(signs) / len(signs) if signs else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dataset", default="facts")
    ap.add_argument("--pairs", default=None, help="a pairs.jsonl (default: synthetic pairs)")
    ap.add_argument("--candidates", type=int, default=6)
    ap.add_argument("--chunk-size", type=int, default=2)
    ap.add_argument("--val-tasks", type=int, default=4)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--optimizer", choices=["adamw", "sgd"], default="sgd")
    ap.add_argument("--max-turns", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--metric", choices=["task", "hash"], default="task")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    engine = HFEngine(args.model, device=args.device)
    protocol = ProtocolConfig(max_turns=args.max_turns, max_new_tokens=args.max_new_tokens)
    if args.pairs:
        from dits.synthesize import read_pairs

        pairs: list[PairCandidate] = list(read_pairs(args.pairs))
    else:
        pairs = synthetic_pairs(args.dataset, args.candidates * args.chunk_size, protocol, args.seed)
    chunks = chunk_pairs(pairs, args.chunk_size, seed=args.seed)[: args.candidates]
    val = make_builtin(args.dataset, "dev", args.val_tasks, seed=args.seed)

    name = "influence_probe"
    engine.add_adapter(name, LoraSettings(r=8, alpha=16).to_peft())
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():  # θ: a non-trivial adapter (B = 0 would make every first step move A not at all)
        for n, p in adapter_parameters(engine, name).items():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    engine.model.eval()

    metric: MetricFn | None = hash_metric if args.metric == "hash" else None
    results: dict[str, list[InfluenceScore]] = {}
    report: dict[str, object] = {"args": vars(args), "candidates": len(chunks)}
    for kind in ("rollout", "likelihood", "gradient"):
        cfg = InfluenceConfig(
            estimator=kind,  # type: ignore[arg-type]
            chunk_size=args.chunk_size,
            lr=args.lr,
            optimizer=args.optimizer,
            val_tasks=args.val_tasks,
            samples_per_task=args.samples,
            seed=args.seed,
        )
        est = make_estimator(cfg, metric)
        est.prepare(engine, name, val, protocol)
        scores = est.score(chunks)
        results[kind] = scores
        report[kind] = {
            "scores": [s.score for s in scores],
            "prepare_flops": est.prepare_cost.flops,
            "prepare_seconds": est.prepare_cost.seconds,
            "flops_per_candidate": sum(s.cost.flops for s in scores) / len(scores),
            "seconds_per_candidate": sum(s.cost.seconds for s in scores) / len(scores),
        }
    values = {k: [s.score for s in v] for k, v in results.items()}
    report["likelihood_vs_rollout"] = compare(values["likelihood"], values["rollout"])
    report["gradient_vs_rollout"] = compare(values["gradient"], values["rollout"])
    report["gradient_vs_likelihood"] = compare(values["gradient"], values["likelihood"])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
