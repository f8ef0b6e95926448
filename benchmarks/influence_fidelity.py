"""Influence fidelity: how well each estimator ranks candidate chunks by their true effect, at what cost.

N candidate chunks of c pairs are drawn from a real synthesized pool (``--pairs``, or a pool grown here by
tree search on the embedded model over built-in training tasks). θ is a fresh LoRA (B = 0: the base model,
as in ``dits run``'s first iteration). For every chunk z the ground truth is

    ΔM(z) = M_S(θ_z) − M_S(θ)

with M_S the mean task metric of S sampled conversations (``--gt-temperature``, 0.7; 0 is one greedy
conversation per task) on each of G validation tasks, the SAME seeds before and after the step (common
random numbers: a conversation changes only where the step changes a sampled token). The G ground-truth
tasks are dev tasks disjoint from the V tasks the estimators see, so an estimator is judged on the
validation distribution, not on its own sample. Then each estimator (``rollout``, ``likelihood``,
``gradient``, ``retention``), prepared once on the V tasks from the same θ, scores the same chunks with the
same step (optimizer, lr, β).

Prints one JSON object: per estimator the Spearman correlation with the ground truth (and its bootstrap
interval over the candidates), the agreement on the top half (share of the ground truth's top N/2 chunks
the estimator also puts in its top half), and the cost
(ledger FLOPs and seconds, preparation included), plus ``cost_ratio_vs_rollout`` (FLOPs and seconds, and the
FLOPs of one more candidate, preparation left out) for every estimator but ``rollout``; and, for the ground
truth itself, a split-half Spearman (its G tasks in two halves) and the whole's Spearman-Brown reliability:
how much rank signal the ground truth holds at all (``has_signal``: split-half ≥ 0.6; below it, the
estimators' correlations are mostly noise).

With ``--work-dir`` the ground truth (per candidate) and each estimator's scores are checkpoints: a cut run
resumes, and a rerun with other ``--estimators`` reuses the ground truth.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from common import Checkpoints
from dits.artifacts import read_jsonl
from dits.config import RunConfig, load_config
from dits.engine.hf import HFEngine
from dits.engine.precision import DTYPES, resolve_dtype
from dits.influence import (
    ESTIMATORS,
    InfluenceConfig,
    InfluenceScore,
    chunk_pairs,
    make_estimator,
    pair_key,
)
from dits.influence.base import metered
from dits.influence.inputs import probe_adapter
from dits.mas.dialogue import run_dialogues
from dits.mas.protocol import ProtocolConfig
from dits.records import PreferencePair
from dits.seeding import derive_seed
from dits.stages.search import grow_pool
from dits.stats import (
    spearman,
    spearman_brown,
    spearman_interval,
    task_reliability,
    tasks_for,
    top_half_agreement,
)
from dits.tasks.example import Example
from dits.tasks.source import examples_for
from dits.train.step import one_step

log = logging.getLogger("influence_fidelity")
_NOT_RESULTS = frozenset({"threads", "work_dir", "progress", "estimators"})
"""Arguments that change no checkpointed result (each estimator's scores are a checkpoint of their own)."""


class GroundTruth:
    """Per-conversation metrics of S seeded samples on each of G tasks, under θ and under each θ_z."""

    def __init__(self, engine: HFEngine, examples: list[Example], samples: int, protocol: ProtocolConfig,
                 seed: int, temperature: float = 0.7) -> None:  # fmt: skip
        self.engine, self.protocol, self.temperature = engine, protocol, temperature
        self.examples = [ex for ex in examples for _ in range(samples)]
        self.task = [t for t in range(len(examples)) for _ in range(samples)]
        self.seeds = [derive_seed(seed, "ground-truth", t, j) for t in range(len(examples))
                      for j in range(samples)]  # fmt: skip

    def metrics(self) -> list[float]:
        transcripts = run_dialogues(self.engine, self.examples, self.protocol, temperature=self.temperature,
                                    seeds=self.seeds)  # fmt: skip
        return [t.metric for t in transcripts]

    def per_task(self, values: Sequence[float]) -> list[float]:
        """Mean metric of each ground-truth task over its S samples."""
        sums = [0.0] * (self.task[-1] + 1)
        for v, t in zip(values, self.task, strict=True):
            sums[t] += v
        return [x * (len(sums) / len(values)) for x in sums]

    def half(self, values: Sequence[float], which: int) -> float:
        """Mean metric over the even (0) or odd (1) ground-truth tasks."""
        sel = [v for v, t in zip(values, self.task, strict=True) if t % 2 == which]
        return statistics.fmean(sel)


def draw_chunks(pool: list[PreferencePair], args: argparse.Namespace) -> list[list[PreferencePair]]:
    """N candidates of c pairs: disjoint chunks of the shuffled pool (``partition``), or N distinct seeded
    random c-subsets (``random``: candidates may share pairs, so a small pool still gives N of size c)."""
    c, n = args.chunk_size, args.candidates
    if args.draw == "partition":
        chunks = [ch for ch in chunk_pairs(pool, c, seed=args.seed) if len(ch) == c][:n]
    else:
        if len(pool) < c:
            raise SystemExit(f"the pool ({len(pool)} pairs) is smaller than a chunk ({c})")
        rng, seen, chunks = random.Random(args.seed), set(), []
        for _ in range(100 * n):
            if len(chunks) == n:
                break
            idx = tuple(sorted(rng.sample(range(len(pool)), c)))
            if idx not in seen:
                seen.add(idx)
                chunks.append([pool[i] for i in idx])
    if len(chunks) < 4:
        raise SystemExit(f"the pool ({len(pool)} pairs) gives {len(chunks)} chunks of {c}; grow a larger one")
    return chunks


def run_config(args: argparse.Namespace) -> RunConfig:
    """The one config of the benchmark: the pool's search, the protocol, the task and θ's LoRA."""
    return load_config(None, {
        "seed": args.seed, "task.dataset": args.dataset, "task.train": args.train_tasks,
        "search.explore": args.explore, "search.expand": args.expand,
        "protocol.max_turns": args.max_turns, "protocol.max_new_tokens": args.max_new_tokens,
    })  # fmt: skip


def get_pool(args: argparse.Namespace, cfg: RunConfig, engine: HFEngine, work: Path) -> list[PreferencePair]:
    if args.pairs:  # several files: the union of their pools (a pair in two of them counted once)
        union = {pair_key(p): p for path in args.pairs for p in read_jsonl(path, PreferencePair)}
        return list(union.values())
    train = examples_for(cfg.task, "train")
    log.info("synthesizing a pool on %d train tasks into %s", len(train), work / "pool")
    summary = grow_pool(engine, train, cfg, work / "pool", pairs=cfg.pairs, progress=args.progress)
    return list(read_jsonl(summary.pairs_path, PreferencePair))


def ground_truth_part(
    engine: HFEngine,
    gt: GroundTruth,
    theta: str,
    chunk: list[PreferencePair] | None,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The ground truth's conversations under θ (``chunk`` None) or under θ_z, one step on ``chunk``."""
    with metered(engine) as cost:
        if chunk is None:
            metrics, norm = gt.metrics(), 0.0
        else:
            with one_step(engine, theta, chunk, lr=args.lr, beta=args.beta, optimizer=args.optimizer) as step:
                metrics = gt.metrics()
            norm = step.update_norm
    return {"metrics": metrics, "update_norm": norm, "flops": cost.flops, "seconds": cost.seconds}


def run_estimator(
    engine: HFEngine,
    kind: str,
    theta: str,
    val: list[Example],
    protocol: ProtocolConfig,
    chunks: list[list[PreferencePair]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One estimator prepared on θ and the V tasks, scoring every candidate: its scores and cost."""
    icfg = InfluenceConfig(
        estimator=kind,  # type: ignore[arg-type]
        chunk_size=args.chunk_size, lr=args.lr, beta=args.beta, optimizer=args.optimizer,
        val_tasks=args.val_tasks, samples_per_task=args.samples, seed=args.seed,
        step_geometry="optimizer" if args.optimizer == "adamw" else "sgd",
    )  # fmt: skip
    est = make_estimator(icfg)
    est.prepare(engine, theta, val, protocol)
    scores: list[InfluenceScore] = est.score(chunks)
    return {
        "values": [s.score for s in scores],
        "flops": est.prepare_cost.flops + sum(s.cost.flops for s in scores),
        "seconds": est.prepare_cost.seconds + sum(s.cost.seconds for s in scores),
        "prepare_flops": est.prepare_cost.flops,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="auto", choices=DTYPES, help="compute dtype (auto: bf16 where native)")
    ap.add_argument("--dataset", default="facts", help="a built-in task")
    ap.add_argument("--pairs", action="append", help="a pairs.jsonl pool, repeatable (default: synthesize)")
    ap.add_argument("--train-tasks", type=int, default=16, help="trees grown for the pool (no --pairs)")
    ap.add_argument("--explore", type=int, default=2)
    ap.add_argument("--expand", type=int, default=2)
    ap.add_argument("--candidates", type=int, default=16, help="N chunks scored (at most the pool's)")
    ap.add_argument("--chunk-size", type=int, default=5, help="c: pairs per chunk (one step on all)")
    ap.add_argument(
        "--draw",
        choices=["partition", "random"],
        default="partition",
        help="disjoint chunks, or distinct random c-subsets (a small pool, many candidates)",
    )
    ap.add_argument("--val-tasks", type=int, default=20, help="V: dev tasks the estimators see")
    ap.add_argument("--samples", type=int, default=4, help="K samples per task (likelihood, gradient)")
    ap.add_argument("--gt-tasks", type=int, default=24, help="G: dev tasks of the ground truth")
    ap.add_argument("--gt-samples", type=int, default=2, help="S: samples per ground-truth task")
    ap.add_argument(
        "--gt-temperature",
        type=float,
        default=0.7,
        help="of the ground truth's conversations (0: greedy, S 1)",
    )
    ap.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    ap.add_argument("--lr", type=float, default=1e-3, help="the probe step (every estimator, ground truth)")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--max-turns", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--estimators",
        default=",".join(ESTIMATORS),
        help="which to run (rollout always runs), or none: the ground truth alone",
    )
    ap.add_argument("--work-dir", default=None, help="keep the pool and checkpoints here: a rerun resumes")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    args.dtype = resolve_dtype(args.dtype)  # a work dir records the dtype it ran in
    if args.gt_temperature == 0 and args.gt_samples != 1:
        raise SystemExit("--gt-temperature 0 is greedy: every sample would be the same; use --gt-samples 1")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    engine = HFEngine(args.model, dtype=args.dtype)
    tmp = None if args.work_dir else tempfile.TemporaryDirectory(prefix="dits-fidelity-")
    work = Path(args.work_dir or tmp.name)  # type: ignore[union-attr]
    cfg = run_config(args)
    protocol = cfg.protocol
    pool = get_pool(args, cfg, engine, work)
    chunks = draw_chunks(pool, args)
    # The dev size stays out of the pool's config: the trees' digest covers the task section.
    dev = examples_for(cfg.task.model_copy(update={"dev": args.val_tasks + args.gt_tasks}), "dev")
    val, gt_tasks = dev[: args.val_tasks], dev[args.val_tasks :]
    theta = probe_adapter(engine, cfg.train.lora, seed=args.seed)

    # The ground truth and each estimator's scores are checkpoints in --work-dir: a run of hours can be cut
    # and rerun, and adding an estimator to a finished run reuses the ground truth.
    ckpt = Checkpoints(work, args, keep=args.work_dir is not None, not_results=_NOT_RESULTS)
    # Ground truth: common random numbers before and after each step.
    gt = GroundTruth(engine, gt_tasks, args.gt_samples, protocol, args.seed, args.gt_temperature)
    engine.set_adapter(theta)
    base_part = ckpt.get("ground_truth/base", ground_truth_part, engine, gt, theta, None, args)
    base = base_part["metrics"]
    parts = [base_part]
    truth, halves, per_task = [], [], []
    for i, chunk in enumerate(chunks):
        part = ckpt.get(f"ground_truth/candidate_{i}", ground_truth_part, engine, gt, theta, chunk, args)
        parts.append(part)
        after = part["metrics"]
        truth.append(statistics.fmean(after) - statistics.fmean(base))
        halves.append([gt.half(after, h) - gt.half(base, h) for h in (0, 1)])
        per_task.append([a - b for a, b in zip(gt.per_task(after), gt.per_task(base), strict=True)])
        log.info("ground truth %d/%d: %+.4f (update norm %.3g)", i + 1, len(chunks), truth[-1],
                 part["update_norm"])  # fmt: skip
    engine.set_adapter(None)

    split_half = spearman([h[0] for h in halves], [h[1] for h in halves])
    alpha = task_reliability(per_task)
    # What the split-half would be expected at (its G/2 tasks), and the G at which it would reach 0.6.
    half_alpha = None if alpha is None else spearman_brown(alpha, 0.5)
    g_needed = None if alpha is None else tasks_for(alpha, len(gt_tasks), 0.6)
    report: dict[str, Any] = {
        "benchmark": "influence_fidelity",
        "settings": vars(args),
        "pool_pairs": len(pool),
        "candidates": len(chunks),
        "ground_truth": {
            "baseline_metric": statistics.fmean(base),
            "scores": truth,
            "distinct": len(set(truth)),
            "split_half_spearman": split_half,
            # Spearman-Brown: the rank reliability of the whole G tasks, from that of each half.
            "reliability": None if split_half is None else max(0.0, spearman_brown(split_half, 2)),
            "has_signal": split_half is not None and split_half >= 0.6,
            "task_reliability": alpha,
            "expected_split_half": half_alpha,
            "gt_tasks_for_split_half_0.6": None if g_needed is None else 2 * g_needed,
            "flops": sum(p["flops"] for p in parts),
            "seconds": sum(p["seconds"] for p in parts),
        },
    }
    # "none": the ground truth alone (sizing its step and tasks); otherwise rollout always runs (the
    # cost ratios are against it).
    wanted = args.estimators.split(",")
    others = [k for k in ESTIMATORS if k != "rollout" and k in wanted]
    kinds = [] if wanted == ["none"] else ["rollout", *others]
    for kind in kinds:
        got = ckpt.get(f"estimator_{kind}", run_estimator, engine, kind, theta, val, protocol, chunks, args)
        values = got["values"]
        report[kind] = {
            "spearman": spearman(values, truth),
            "spearman_95": spearman_interval(values, truth),
            "top_half_agreement": top_half_agreement(values, truth),
            "distinct_scores": len(set(values)),
            "flops": got["flops"],
            "seconds": got["seconds"],
            "prepare_flops": got["prepare_flops"],
            "scores": values,
        }
        log.info("%s: spearman %s, %.3g FLOPs, %.0f s", kind, report[kind]["spearman"], got["flops"],
                 got["seconds"])  # fmt: skip

    def per_candidate(kind: str) -> float:  # the cost of one more candidate: preparation left out
        return (report[kind]["flops"] - report[kind]["prepare_flops"]) / len(chunks)

    for kind in kinds[1:]:  # kinds[0] is rollout
        report[kind]["cost_ratio_vs_rollout"] = {
            "flops": report[kind]["flops"] / report["rollout"]["flops"],
            "seconds": report[kind]["seconds"] / report["rollout"]["seconds"],
            "flops_per_extra_candidate": per_candidate(kind) / per_candidate("rollout"),
        }
    report["seconds"] = time.perf_counter() - t_start
    print(json.dumps(report, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
