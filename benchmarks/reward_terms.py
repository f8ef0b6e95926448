"""The reward's three terms on a searched pool, under the old and the new readability rule, side by side.

Every rollout of every tree of a ``trees.jsonl`` is rewarded twice on the same transcript with the same
initial model: (old) each utterance's NLL scored after the speaker's whole view (system prompt, private
notes, worked example, the conversation), no bound on ``λ_read / max NLL``; (new) each utterance scored on
its own (:meth:`~dits.engine.base.Engine.score_alone`) and the term clipped at ``reward.read_clip``. The
task and token terms do not depend on the rule. Prints one JSON object: per rule the distribution of each
term, how often the readability term exceeds the task term's maximum (1), and how well the total reward
ranks correctness (Spearman of reward with the task metric, and the mean reward of correct vs. wrong
rollouts).

    .venv/bin/python benchmarks/reward_terms.py --trees runs/demo/iter_0/search/trees.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from pathlib import Path

import numpy as np
from scipy import stats

from dits.artifacts import read_jsonl
from dits.engine import engine_from_config
from dits.mas.dialogue import Transcript, Turn, speaks_for_both
from dits.mas.protocol import continuation, render_view, speaker_of, turn_prefix
from dits.pipeline import demo_config
from dits.reward import utterance_nlls, weights_for
from dits.search.tree import Tree
from dits.tasks.example import examples_by_id
from dits.tasks.source import examples_for

log = logging.getLogger("reward_terms")


def in_context_nlls(engine, examples, transcripts, protocol) -> list[list[float]]:  # type: ignore[no-untyped-def]
    """The old rule: every utterance scored after its speaker's view (what ``utterance_nlls`` did)."""
    out = [[math.nan] * len(tr.turns) for tr in transcripts]
    for speaker in (0, 1):
        prefix = turn_prefix(speaker, protocol)
        items = [(i, k, render_view(ex, tr.texts[:k], t.speaker, protocol), continuation(prefix, t.text))
                 for i, (ex, tr) in enumerate(zip(examples, transcripts, strict=True))
                 for k, t in enumerate(tr.turns) if t.speaker == speaker]  # fmt: skip
        if items:
            scored = engine.score([x[2] for x in items], [x[3] for x in items], prefix)
            for (i, k, *_), sc in zip(items, scored, strict=True):
                if sc.logprobs:
                    out[i][k] = -float(np.mean(sc.logprobs))
    return out


def summary(values: list[float]) -> dict[str, float]:
    p10, p50, p90 = (round(float(x), 4) for x in np.percentile(values, [10, 50, 90]))
    return {"mean": round(statistics.fmean(values), 4), "p10": p10, "p50": p50, "p90": p90,
            "max": round(max(values), 4)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", required=True, help="a search stage's trees.jsonl")
    ap.add_argument("--t-norm", type=float, help="default: the t_norm.json beside the trees")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = demo_config()  # the pool's protocol and reward settings (the demo's)
    trees = read_jsonl(args.trees, Tree, repair=False)
    t_norm = args.t_norm or json.loads((Path(args.trees).parent / "t_norm.json").read_text())["t_norm"]
    by_id = examples_by_id(examples_for(cfg.task, "train", limit=len(trees) * 8))
    engine = engine_from_config(cfg.engine)
    examples, transcripts = [], []
    for tree in trees:
        for i, ro in enumerate(tree.rollouts):
            texts = tree.transcript(i)
            turns = [Turn(speaker=speaker_of(k), text=t, tokens=0) for k, t in enumerate(texts)]
            examples.append(by_id[tree.task_id])
            transcripts.append(Transcript(example_id=tree.task_id, turns=turns, stop_reason="agreed",
                                          answer=None, metric=ro.metric))  # fmt: skip
    tokens = [ro.tokens for tree in trees for ro in tree.rollouts]
    t0 = time.perf_counter()
    rules = {"old_in_context": in_context_nlls(engine, examples, transcripts, cfg.protocol),
             "new_alone_clipped": utterance_nlls(engine, transcripts, cfg.protocol)}  # fmt: skip
    seconds = time.perf_counter() - t0
    out: dict[str, object] = {"rollouts": len(transcripts), "trees": len(trees), "t_norm": t_norm}
    for name, nlls in rules.items():
        task, token, read, total = [], [], [], []
        for ex, tr, nll, T in zip(examples, transcripts, nlls, tokens, strict=True):
            lt, lr = weights_for(ex, cfg.reward)
            tk = 0.0 if any(speaks_for_both(t.text, t.speaker) for t in tr.turns) else tr.metric
            tok = -1.0 if cfg.reward.min_tokens >= T else lt * T / t_norm  # truncation is not stored
            finite = [x for x in nll if math.isfinite(x)]
            rd = 0.0 if (len(set(tr.texts)) < len(tr.texts) or not finite) else lr / max(max(finite), 1e-6)
            if name.startswith("new"):
                rd = min(rd, cfg.reward.read_clip)
            task.append(tk)
            token.append(tok)
            read.append(rd)
            total.append(tk + tok + rd)
        metric = [tr.metric for tr in transcripts]
        right = [r for r, m in zip(total, metric, strict=True) if m >= 0.5]
        wrong = [r for r, m in zip(total, metric, strict=True) if m < 0.5]
        out[name] = {
            "task": summary(task), "token": summary(token), "read": summary(read),
            "read_above_1": round(sum(r > 1 for r in read) / len(read), 4),
            "spearman_reward_vs_metric": round(float(stats.spearmanr(total, metric).statistic), 4),
            "mean_reward_correct": round(statistics.fmean(right), 4) if right else None,
            "mean_reward_wrong": round(statistics.fmean(wrong), 4) if wrong else None,
        }  # fmt: skip
    out["scoring_seconds_both_rules"] = round(seconds, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
