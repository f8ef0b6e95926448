"""Selection quality: the paper's main claim, measured. Which pairs to train on, at the same training budget?

From ONE synthesized pool (tree search on the embedded model over built-in training tasks, pairs mined
from the trees) this trains one DPO model per selection strategy -- ``all``, ``random``, ``q`` (Optima),
``q-budget`` (Optima given DITS's compute), ``influence``, ``mix`` (DITS) -- each a fresh LoRA from the
same base model, the same number of DPO steps at the same batch size, learning rate and seed; only the kept
pairs differ (``ratio`` of the pool, except ``all``). Each model and the untrained one are evaluated
greedily on the held-out test split. Influence is estimated once per pool (from θ = a fresh LoRA, i.e. the
base model the training starts from, on the dev split) and shared by ``influence`` and ``mix``.
``q-budget`` is the pipeline's rule (:mod:`dits.stages.budget`): extra trees on train tasks the pool does
not use, as many as cost the influence estimate at the pool's mean FLOPs per tree, mined with the pool's
``T_norm``; it ranks the enlarged pool by Q and keeps as many pairs as ``mix`` keeps, so the two differ
only in where the extra compute went.

Prints one JSON object: per strategy the test metric with a 95% bootstrap interval (over test tasks, pooled
over seeds), communication tokens per task, pairs kept, and ledger FLOPs (synthesis + influence where the
strategy uses it, or the extra search for ``q-budget``, + training), per seed and pooled; ``mix_minus_q``,
``mix_minus_q_budget``, and (does influence beat chance?) ``influence_minus_random`` and
``mix_minus_random``, with paired bootstrap intervals over every (seed, test task).

With several ``--seed`` values each seed grows its own pool (``--shared-pool``: one pool from the first
seed, the seeds then vary influence chunking, random selection and training only). Everything runs in this
process through the library (synthesize, influence, select, train, evaluate); nothing is a subprocess.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from common import Checkpoints, evaluate, flops, paired_difference, parse_seeds, pooled_metric, public
from dits.artifacts import PAIRS_FILE, TREES_FILE, read_jsonl
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
from dits.records import PreferencePair
from dits.search.pairs import keep_count
from dits.select import SelectConfig, Strategy, select_pairs
from dits.stages.budget import plan_extra_trees
from dits.stages.search import grow_pool
from dits.tasks.example import Example
from dits.tasks.source import examples_for
from dits.train.config import TrainConfig

log = logging.getLogger("selection_quality")

STRATEGIES: tuple[Strategy, ...] = ("all", "random", "q", "q-budget", "influence", "mix")
USES_INFLUENCE = frozenset({"influence", "mix"})
PROBE = "sq_theta"


def run_config(args: argparse.Namespace, seed: int) -> RunConfig:
    """The run config the pool is synthesized under: library defaults plus the benchmark's sizes."""
    overrides: dict[str, Any] = {
        "name": f"selection-quality-s{seed}",
        "seed": seed,
        "task.dataset": args.dataset,
        "task.train": args.train_tasks,
        "task.dev": args.val_tasks,
        "task.test": args.test_tasks,
        "search.explore": args.explore,
        "search.expand": args.expand,
        "protocol.max_turns": args.max_turns,
        "protocol.max_new_tokens": args.max_new_tokens,
    }
    if args.knobs:
        overrides["task.knobs"] = json.loads(args.knobs)
    if args.tau is not None:
        overrides["pairs.tau"] = args.tau
    if args.min_gap is not None:
        overrides["pairs.min_gap"] = args.min_gap
    return load_config(None, overrides)


def synthesize_pool(engine: HFEngine, cfg: RunConfig, out: Path, progress: bool) -> dict[str, Any]:
    """Grow the pool into ``out`` (its pairs are ``out/pairs.jsonl``); returns its figures."""
    train = examples_for(cfg.task, "train")
    before = engine.ledger.snapshot()
    summary = grow_pool(engine, train, cfg, out, pairs=cfg.pairs, progress=progress)
    return {
        "seed": cfg.seed,
        "trees": summary.trees,
        "rollouts": summary.rollouts,
        "pairs": summary.pairs,
        "t_norm": summary.t_norm,
        "flops": flops(engine, before),
        "seconds": summary.seconds,
        "resumed": summary.trees_new < summary.trees,  # then flops and seconds are this process's part
    }


def budget_pool(
    engine: HFEngine, cfg: RunConfig, pool_dir: Path, t_norm: float, target_flops: float, progress: bool
) -> dict[str, Any]:
    """``q-budget``'s extra search into ``pool_dir/../budget``, planned by the budget stage's rule
    (:func:`plan_extra_trees`) on the train tasks after the pool's, mined with the pool's ``T_norm``."""
    n = cfg.task.train
    plan = plan_extra_trees(pool_dir / TREES_FILE, target_flops)
    tasks = examples_for(cfg.task, "train", limit=n + plan.trees)[n:]
    before = engine.ledger.snapshot()
    out = pool_dir.parent / "budget"
    summary = grow_pool(engine, tasks, cfg, out, pairs=cfg.pairs, t_norm=t_norm, progress=progress)
    info = {
        "target_flops": target_flops,
        "flops_per_tree": plan.flops_per_tree,
        "trees": summary.trees,
        "pairs": summary.pairs,
        "flops": flops(engine, before),
        "seconds": summary.seconds,
        "resumed": summary.trees_new < summary.trees,
    }
    info["flops_vs_target"] = info["flops"] / target_flops if target_flops else None
    return info


def estimate_influence(
    engine: HFEngine, pairs: list[PreferencePair], cfg: RunConfig, icfg: InfluenceConfig, seed: int
) -> tuple[list[InfluenceScore], dict[str, Any]]:
    """Score chunks of the pool from θ = a fresh LoRA (B = 0, so θ is the base model every DPO run starts
    from), drawn with the same seed as the trained adapters."""
    t0 = time.perf_counter()
    before = engine.ledger.snapshot()
    torch.manual_seed(seed)
    engine.add_adapter(PROBE, cfg.train.lora.to_peft())
    engine.model.eval()
    try:
        est = make_estimator(icfg)
        est.prepare(engine, PROBE, examples_for(cfg.task, "dev"), cfg.protocol)
        scores = est.score(chunk_pairs(pairs, icfg.chunk_size, seed=seed))
    finally:
        engine.set_adapter(None)
        engine.delete_adapter(PROBE)
    values = [s.score for s in scores]
    info = {
        "estimator": icfg.estimator,
        "chunks": len(scores),
        "distinct_scores": len(set(values)),
        "mean_score": statistics.fmean(values) if values else 0.0,
        "flops": flops(engine, before),
        "seconds": time.perf_counter() - t0,
    }
    return scores, info


def train_and_evaluate(
    engine: HFEngine,
    strategy: Strategy,
    pairs: list[PreferencePair],
    scores: list[InfluenceScore] | None,
    cfg: RunConfig,
    tcfg: TrainConfig,
    args: argparse.Namespace,
    test: list[Example],
    work: Path,
    keep: int | None = None,
) -> tuple[dict[str, Any], list[PreferencePair]]:
    from dits.train.dpo import train_dpo

    sel = SelectConfig(strategy=strategy, ratio=args.ratio, weight=args.weight, seed=cfg.seed)
    kept = select_pairs(pairs, scores if strategy in USES_INFLUENCE else None, sel, keep=keep)
    if len(kept) < tcfg.dpo.batch_size:
        log.warning(
            "%s keeps %d pairs < batch %d: its steps see fewer pairs than the others (see training_flops)",
            strategy, len(kept), tcfg.dpo.batch_size,
        )  # fmt: skip
    name = f"sq_{strategy}"
    before = engine.ledger.snapshot()
    torch.manual_seed(cfg.seed)  # the fresh LoRA's initial A: the same draw for every strategy
    result = train_dpo(engine, kept, tcfg, work / strategy, adapter_name=name)
    train_flops = flops(engine, before)
    try:
        ev = evaluate(engine, test, cfg, name)
    finally:
        engine.delete_adapter(name)
    ev.update(
        pairs_kept=len(kept),
        pairs_trained=result.rows,
        pairs_dropped_for_length=result.truncated,
        steps=result.steps,
        train_loss=result.train_loss,
        training_flops=train_flops,
        train_seconds=result.seconds,
    )
    return ev, kept


def influence_record(
    engine: HFEngine, pairs: list[PreferencePair], cfg: RunConfig, icfg: InfluenceConfig, seed: int
) -> dict[str, Any]:
    """:func:`estimate_influence` as JSON (its figures and the scores), for a checkpoint."""
    scores, info = estimate_influence(engine, pairs, cfg, icfg, seed)
    return {"info": info, "scores": [s.model_dump() for s in scores]}


def train_strategy(
    engine: HFEngine,
    strategy: Strategy,
    pairs: list[PreferencePair],
    budget_pairs: list[PreferencePair],
    scores: list[InfluenceScore],
    cfg: RunConfig,
    tcfg: TrainConfig,
    args: argparse.Namespace,
    test: list[Example],
    work: Path,
) -> dict[str, Any]:
    """One strategy's model trained and evaluated, with the keys of the pairs it kept (``_kept``)."""
    if strategy == "q-budget":  # the enlarged pool, keeping as many pairs as mix keeps
        keep = keep_count(len(pairs), args.ratio)
        entry, kept = train_and_evaluate(
            engine, strategy, pairs + budget_pairs, None, cfg, tcfg, args, test, work, keep=keep
        )
    else:
        entry, kept = train_and_evaluate(engine, strategy, pairs, scores, cfg, tcfg, args, test, work)
    return {**entry, "_kept": sorted(pair_key(p) for p in kept)}


def _pooled(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Across seeds: :func:`pooled_metric`, and means of the rest."""
    return {
        **pooled_metric(entries),
        "comm_tokens": statistics.fmean(e["comm_tokens"] for e in entries),
        "pairs_kept": statistics.fmean(e["pairs_kept"] for e in entries),
        "flops": {
            k: statistics.fmean(e["flops"][k] for e in entries)
            for k in ("synthesis", "influence", "budget", "training", "total")
        },
    }


# Arguments that do not change any result: a checkpoint written under other values of these is reused.
_NOT_RESULTS = frozenset({"seed", "threads", "work_dir", "progress"})


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--seed", action="append", default=[], help="repeatable, or a list: --seed 0,1,2")
    ap.add_argument("--shared-pool", action="store_true", help="one pool (first seed) for every seed")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="auto", choices=DTYPES, help="compute dtype (auto: bf16 where native)")
    ap.add_argument("--dataset", default="facts", help="a built-in task (facts, arith)")
    ap.add_argument("--knobs", default=None, help="task difficulty knobs as JSON, e.g. '{\"hops\": 1}'")
    ap.add_argument("--train-tasks", type=int, default=8, help="tasks searched for the pool (one tree each)")
    ap.add_argument("--val-tasks", type=int, default=4, help="dev tasks influence is measured on (V)")
    ap.add_argument("--test-tasks", type=int, default=16)
    ap.add_argument("--explore", type=int, default=2)
    ap.add_argument("--expand", type=int, default=3)
    ap.add_argument("--max-turns", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument(
        "--tau", type=float, default=None, help="pair threshold on Q(chosen) (default per dataset)"
    )
    ap.add_argument("--min-gap", type=float, default=None, help="pair threshold on Q gap; default 0.2")
    ap.add_argument("--estimator", choices=ESTIMATORS, default="gradient")
    ap.add_argument("--chunk-size", type=int, default=2, help="c: pairs per influence candidate")
    ap.add_argument("--samples", type=int, default=4, help="K samples per dev task (likelihood, gradient)")
    ap.add_argument("--influence-lr", type=float, default=None, help="probe step lr; default: --dpo-lr")
    ap.add_argument(
        "--step-geometry",
        choices=["sgd", "optimizer"],
        default=None,
        help="gradient/retention estimators' first-order step (default: InfluenceConfig's, sgd)",
    )
    ap.add_argument("--ratio", type=float, default=0.5, help="share of the pool kept (all but all)")
    ap.add_argument("--weight", type=float, default=1.0, help="w in norm(Q) + w*norm(I)")
    ap.add_argument("--dpo-steps", type=int, default=4, help="optimizer steps, the same for every strategy")
    ap.add_argument("--dpo-batch", type=int, default=2)
    ap.add_argument("--dpo-lr", type=float, default=5e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared 2-core CPU)")
    ap.add_argument("--work-dir", default=None, help="keep pools and adapters here (default: a temp dir)")
    ap.add_argument("--progress", action="store_true", help="progress bars on stderr")
    args = ap.parse_args()
    args.dtype = resolve_dtype(args.dtype)  # a work dir records the dtype it ran in
    seeds = parse_seeds(args.seed)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    engine = HFEngine(args.model, dtype=args.dtype)
    tmp = None if args.work_dir else tempfile.TemporaryDirectory(prefix="dits-selq-")
    root = Path(args.work_dir or tmp.name)  # type: ignore[union-attr]

    ckpt = Checkpoints(root, args, keep=args.work_dir is not None, not_results=_NOT_RESULTS)

    base_cfg = run_config(args, seeds[0])
    test = examples_for(base_cfg.task, "test")
    log.info("evaluating the untrained model on %d test tasks", len(test))
    untrained = ckpt.get("untrained", evaluate, engine, test, base_cfg, None)

    pools: list[dict[str, Any]] = []
    influence: list[dict[str, Any]] = []
    per_seed: dict[str, list[dict[str, Any]]] = {s: [] for s in STRATEGIES}
    pool: dict[str, Any] | None = None
    pool_dir = root
    budget: dict[str, Any] | None = None
    for seed in seeds:
        cfg = run_config(args, seed)
        work = root / f"seed_{seed}"
        if pool is None or not args.shared_pool:
            log.info("seed %d: synthesizing the pool (%d train tasks)", seed, cfg.task.train)
            pool_dir = work / "pool"
            pool = ckpt.get(f"seed_{seed}/pool", synthesize_pool, engine, cfg, pool_dir, args.progress)
            pools.append(pool)
            budget = None
        pairs = read_jsonl(pool_dir / PAIRS_FILE, PreferencePair)
        if not pairs:
            raise SystemExit(
                f"seed {seed}: the pool has no pairs (Q(best) > tau and gap > min_gap never held); "
                "use more --train-tasks / --explore, or lower --tau / --min-gap"
            )
        icfg = InfluenceConfig(
            estimator=args.estimator,
            chunk_size=args.chunk_size,
            lr=args.influence_lr if args.influence_lr is not None else args.dpo_lr,
            beta=args.beta,
            val_tasks=args.val_tasks,
            samples_per_task=args.samples,
            seed=seed,
            **({"step_geometry": args.step_geometry} if args.step_geometry else {}),
        )
        log.info("seed %d: influence of %d pairs (%s)", seed, len(pairs), icfg.estimator)
        scored = ckpt.get(f"seed_{seed}/influence", influence_record, engine, pairs, cfg, icfg, seed)
        scores = [InfluenceScore.model_validate(s) for s in scored["scores"]]
        infl = scored["info"]
        influence.append({"seed": seed, **infl})
        if budget is None:  # per pool (with --shared-pool: priced by the first seed's influence)
            log.info("seed %d: q-budget's extra search for %.3g FLOPs", seed, infl["flops"])
            budget = ckpt.get(
                f"seed_{seed}/budget", budget_pool, engine, cfg, pool_dir, pool["t_norm"], infl["flops"],
                args.progress,
            )  # fmt: skip
            pool["budget"] = budget
        budget_pairs = read_jsonl(pool_dir.parent / "budget" / PAIRS_FILE, PreferencePair)
        tcfg = TrainConfig.model_validate(
            {
                "seed": seed,
                "dpo": {
                    "lr": args.dpo_lr,
                    "beta": args.beta,
                    "batch_size": args.dpo_batch,
                    "max_steps": args.dpo_steps,
                    "epochs": 1000,  # max_steps decides; epochs only has to be large enough
                },
            }
        )
        kept_by: dict[str, set[str]] = {}
        for strategy in STRATEGIES:
            log.info("seed %d: %s", seed, strategy)
            entry = ckpt.get(
                f"seed_{seed}/train_{strategy}", train_strategy,
                engine, strategy, pairs, budget_pairs, scores, cfg, tcfg, args, test, work,
            )  # fmt: skip
            kept_by[strategy] = set(entry.pop("_kept"))
            infl_flops = infl["flops"] if strategy in USES_INFLUENCE else 0.0
            budget_flops = budget["flops"] if strategy == "q-budget" else 0.0
            entry["flops"] = {
                "synthesis": pool["flops"],
                "influence": infl_flops,
                "budget": budget_flops,
                "training": entry["training_flops"],
                "total": pool["flops"] + infl_flops + budget_flops + entry["training_flops"],
            }
            per_seed[strategy].append({"seed": seed, **entry})
        for strategy in STRATEGIES:
            q, mine = kept_by["q"], kept_by[strategy]
            per_seed[strategy][-1]["kept_overlap_with_q"] = len(q & mine) / len(q | mine)

    strategies = {
        s: {**_pooled(entries), "per_seed": [public(e) for e in entries]} for s, entries in per_seed.items()
    }
    report = {
        "benchmark": "selection_quality",
        "settings": {
            **vars(args),
            "seed": seeds,
            "influence_lr": icfg.lr,
            "tau": cfg.pairs.tau_for(args.dataset),
            "min_gap": cfg.pairs.min_gap,
        },
        "untrained": public(untrained),
        "strategies": strategies,
        "mix_minus_q": paired_difference(per_seed["mix"], per_seed["q"]),
        "mix_minus_q_budget": paired_difference(per_seed["mix"], per_seed["q-budget"]),
        "influence_minus_random": paired_difference(per_seed["influence"], per_seed["random"]),
        "mix_minus_random": paired_difference(per_seed["mix"], per_seed["random"]),
        "pools": [public(p) for p in pools],
        "influence": influence,
        "seconds": time.perf_counter() - t_start,
    }
    print(json.dumps(report, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
