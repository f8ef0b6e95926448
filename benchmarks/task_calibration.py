"""Difficulty calibration of the built-in tasks on a model (default: the embedded SmolLM2-135M).

For each (dataset, knobs) setting: the greedy two-agent metric on the test split, and the fraction of
training tasks where the best of k sampled conversations (temperature 0.7) succeeds. Self-training needs
both: a greedy metric between 5% and 60% (room to improve, not hopeless) and best-of-k success on at least
30% of training tasks (something to learn from). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

from dits.engine.hf import HFEngine
from dits.mas.dialogue import run_dialogues
from dits.mas.protocol import ProtocolConfig
from dits.tasks.builtin import make_builtin

SETTINGS = [
    ("facts", {"hops": 1, "n_distractor": 1}),
    ("facts", {"hops": 2, "n_distractor": 1}),  # the default
    ("arith", {"n_operands": 2, "max_value": 10, "operations": ["+"]}),  # the default
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=16, help="tasks per split")
    ap.add_argument("--k", type=int, default=10, help="samples per training task")
    ap.add_argument("--success", type=float, default=1.0, help="a conversation succeeds at metric >= this")
    ap.add_argument("--max-turns", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--only", default=None, help="run only settings of this dataset")
    ap.add_argument(
        "--setting",
        action="append",
        default=None,
        help='replaces the settings: DATASET=JSON, facts={"hops":1}',
    )
    args = ap.parse_args()
    engine = HFEngine("smollm2-135m")
    cfg = ProtocolConfig(max_turns=args.max_turns, max_new_tokens=args.max_new_tokens)
    rows = []
    settings = SETTINGS
    if args.setting:
        settings = [(d, json.loads(k)) for d, k in (s.split("=", 1) for s in args.setting)]
    for dataset, knobs in settings:
        if args.only and dataset != args.only:
            continue
        t0 = time.perf_counter()
        test = make_builtin(dataset, "test", args.n, 0, **knobs)
        greedy = run_dialogues(engine, test, cfg)
        train = make_builtin(dataset, "train", args.n, 0, **knobs)
        many = [ex for ex in train for _ in range(args.k)]
        sampled = run_dialogues(engine, many, cfg, temperature=0.7, seeds=list(range(len(many))))
        best = [max(t.metric for t in sampled[i * args.k : (i + 1) * args.k]) for i in range(args.n)]
        rows.append({
            "dataset": dataset,
            "knobs": knobs,
            "greedy_test_metric": round(sum(t.metric for t in greedy) / args.n, 3),
            "greedy_test_exact": round(sum(t.metric >= args.success for t in greedy) / args.n, 3),
            "best_of_k_train_success": round(sum(b >= args.success for b in best) / args.n, 3),
            "sampled_train_metric": round(sum(t.metric for t in sampled) / len(sampled), 3),
            "agreed_fraction": round(sum(t.stop_reason == "agreed" for t in greedy) / args.n, 3),
            "seconds": round(time.perf_counter() - t0, 1),
        })  # fmt: skip
    print(json.dumps({"model": "smollm2-135m", "n": args.n, "k": args.k, "protocol": cfg.model_dump(),
                      "settings": rows}))  # fmt: skip


if __name__ == "__main__":
    main()
