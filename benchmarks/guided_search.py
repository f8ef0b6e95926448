"""Influence-guided search, measured: does steering the tree search by ``Q + λ·Î`` give better data than
spending the same compute on more Q-value search?

Each arm grows a pool by tree search on the embedded model and built-in training tasks, then trains a DPO
model from it the same way, and every model is evaluated greedily on the same test tasks:

- ``lam_0`` (Optima's search): λ = 0 on the first ``--train-tasks`` tasks, then more trees, from train tasks
  no guided arm uses, until its ledger FLOPs reach the guided arms' mean (the ``q-budget`` rule: the count
  of extra trees is fixed up front from the mean cost of a tree);
- ``lam_<λ>`` for each ``--lam``: the influence-guided search (:mod:`dits.search.guided`) on the same first
  tasks, its guide's estimator prepared on θ = a fresh LoRA (the base model) and the dev split; its
  preparation and scoring are in its FLOPs.

All arms share one ``T_norm`` (calibrated once, not charged to any arm), so Q is on one scale. From each pool
the top ``K`` pairs by Q are kept, ``K`` the smallest pool's size times ``--ratio`` (equal DPO cost), and
a fresh LoRA (same seed) is trained on them with the same DPO steps, batch and lr.

With ``--work-dir`` a run of hours can be cut and rerun: pools resume tree by tree (a pool's FLOPs are its
trees' recorded cost plus its guide's preparation, so the budget rule sees an uninterrupted run's), and the
pools' figures, the untrained evaluation and each arm's training and evaluation are kept as checkpoints;
a work dir of other result-changing arguments is refused.

Prints one JSON object: per arm the pool (trees, rollouts, pairs, FLOPs, seconds, the mean task metric of the
chosen responses over the pool and over the kept pairs, the mean metric of all rollouts), training (pairs,
steps, loss) and the test metric with its interval, and the share of its trees whose selections differ
from λ = 0's on the same task (the same selection seeds: 0 means the guide changed nothing); per guided arm
the paired difference against ``lam_0`` on the same test tasks (with ``--train-seed``, every arm is
trained once per DPO seed and the difference is pooled over seeds and tasks); ``best_lam``, chosen by the
pool's chosen-response metric (not by the test metric, which would select on the test set).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from common import Checkpoints, evaluate, flops, paired_difference, parse_seeds, pooled_metric, public
from dits.artifacts import PAIRS_FILE, TREES_FILE, read_jsonl
from dits.config import RunConfig, load_config
from dits.engine.hf import HFEngine
from dits.engine.precision import DTYPES, resolve_dtype
from dits.records import PreferencePair
from dits.search.guided import InfluenceGuide
from dits.search.tree import Tree
from dits.select import SelectConfig, select_pairs
from dits.stages.context import ModelRef
from dits.stages.search import grow_pool, load_or_calibrate_t_norm, prepared_guide
from dits.tasks.example import Example
from dits.tasks.source import examples_for
from dits.train.config import TrainConfig
from dits.train.dpo import train_dpo

log = logging.getLogger("guided_search")
_NOT_RESULTS = frozenset({"threads", "work_dir", "progress", "train_seed"})
"""Arguments that change no result (unlike selection_quality's, the seed does here: no per-seed parts).
``--train-seed`` is among them because each training seed's models have checkpoints of their own."""


def run_config(args: argparse.Namespace, lam: float, train_tasks: int) -> RunConfig:
    thresholds = {"pairs.tau": args.tau, "pairs.min_gap": args.min_gap}
    return load_config(
        None,
        {
            **{k: v for k, v in thresholds.items() if v is not None},
            "name": "guided-search",
            "seed": args.seed,
            "task.dataset": "facts",
            "task.train": train_tasks,
            "task.dev": args.val_tasks,
            "task.test": args.test_tasks,
            "search.explore": args.explore,
            "search.expand": args.expand,
            "protocol.max_turns": args.max_turns,
            "protocol.max_new_tokens": args.max_new_tokens,
            "influence.val_tasks": args.val_tasks,
            "influence.samples_per_task": args.samples,
            "influence.lr": args.influence_lr,
            "guide.lam": lam,
            "guide.estimator": args.estimator,
        },
    )


def chosen_metrics(trees: list[Tree], pairs: list[PreferencePair]) -> list[float]:
    """Per pair, the mean task metric of the rollouts through its chosen utterance."""
    by_task = {t.task_id: t for t in trees}
    out = []
    for p in pairs:
        tree = by_task[p.tree_task_id]
        node = tree.nodes[p.chosen_id]
        out.append(statistics.fmean(tree.rollouts[i].metric for i in node.rollouts) if node.rollouts else 0.0)
    return out


def grow(
    engine: HFEngine, cfg: RunConfig, out: Path, n: int, t_norm: float, progress: bool
) -> dict[str, Any]:
    """Grow (or finish) the first ``n`` train tasks' trees in ``out``, guided when ``cfg`` is; the pool's
    figures. ``flops`` is what an uninterrupted run would have spent: the recorded cost of its trees (each
    carries its share of its shard's rollouts and guide scoring, and keeps it when a cut shard is re-run)
    plus the guide's preparation, if a tree was left to grow here."""
    train = examples_for(cfg.task, "train")[:n]
    wanted = {ex.id for ex in train}
    found = sum(1 for t in read_jsonl(out / TREES_FILE, Tree) if t.task_id in wanted)
    prepare = {"flops": 0.0}

    @contextmanager
    def make_guide() -> Iterator[InfluenceGuide]:
        before = engine.ledger.snapshot()
        with prepared_guide(engine, cfg, ModelRef.base(cfg), train) as guide:
            prepare["flops"] = flops(engine, before)
            yield guide

    summary = grow_pool(
        engine, train, cfg, out, t_norm=t_norm, progress=progress,
        make_guide=make_guide if cfg.guide.lam else None,
    )  # fmt: skip
    trees = [t for t in read_jsonl(out / TREES_FILE, Tree) if t.task_id in wanted]
    return {
        "trees": summary.trees,
        "rollouts": summary.rollouts,
        "pairs": summary.pairs,
        "flops": sum(t.flops for t in trees) + prepare["flops"],
        "guide_flops": summary.guide_flops,
        "guide_pairs_scored": summary.guide_pairs_scored,
        "guide_moved": summary.guide_moved,
        "seconds": summary.seconds,
        "trees_found": found,  # on disk before this call: the guide_* figures and seconds are the rest's
    }


def pool_of(out: Path, n: int, cfg: RunConfig) -> tuple[list[Tree], list[PreferencePair]]:
    """The first ``n`` train tasks' trees in ``out`` and the pairs mined from them."""
    wanted = {ex.id for ex in examples_for(cfg.task, "train")[:n]}
    trees = [t for t in read_jsonl(out / TREES_FILE, Tree) if t.task_id in wanted]
    pairs = [p for p in read_jsonl(out / PAIRS_FILE, PreferencePair) if p.tree_task_id in wanted]
    return trees, pairs


def train_arm(
    engine: HFEngine,
    name: str,
    pool: tuple[list[Tree], list[PreferencePair]],
    keep: int,
    tcfg: TrainConfig,
    cfg: RunConfig,
    test: list[Example],
    root: Path,
) -> dict[str, Any]:
    """DPO on the pool's top ``keep`` pairs by Q from a fresh LoRA (the same initial draw for every arm),
    then the greedy test evaluation."""
    trees, pairs = pool
    kept = select_pairs(pairs, None, SelectConfig(strategy="q", seed=tcfg.seed), keep=keep)
    log.info("%s: DPO on %d of %d pairs", name, len(kept), len(pairs))
    torch.manual_seed(tcfg.seed)
    adapter = f"gs_{name}"
    before = engine.ledger.snapshot()
    result = train_dpo(engine, kept, tcfg, root / "dpo" / name, adapter_name=adapter)
    train_flops = flops(engine, before)
    try:
        ev = evaluate(engine, test, cfg, adapter)
    finally:
        engine.delete_adapter(adapter)
    return {
        "kept_metric": statistics.fmean(chosen_metrics(trees, kept)),
        "train": {
            "pairs": result.rows,
            "steps": result.steps,
            "loss": result.train_loss,
            "flops": train_flops,
        },
        **ev,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--lam", type=float, action="append", default=[], help="λ > 0, repeatable (default 1.0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--train-seed", action="append", default=[],
        help="DPO seeds (LoRA init, data order), repeatable or a list; each arm is trained once per seed and "
        "the differences are pooled over (seed, test task) (default: --seed)",
    )  # fmt: skip
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="auto", choices=DTYPES, help="compute dtype (auto: bf16 where native)")
    ap.add_argument("--train-tasks", type=int, default=16, help="tasks every arm searches (one tree each)")
    ap.add_argument("--val-tasks", type=int, default=8, help="dev tasks the guide's Î is measured on")
    ap.add_argument("--samples", type=int, default=2, help="K sampled conversations per dev task")
    ap.add_argument("--estimator", choices=["likelihood", "gradient", "retention"], default="gradient")
    ap.add_argument("--influence-lr", type=float, default=5e-5)
    ap.add_argument("--test-tasks", type=int, default=128)
    ap.add_argument("--explore", type=int, default=4, help="≥ 2: step 0 always selects the root")
    ap.add_argument("--expand", type=int, default=2)
    ap.add_argument("--max-turns", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument(
        "--tau", type=float, default=None, help="pair threshold on Q(chosen) (default per dataset)"
    )
    ap.add_argument("--min-gap", type=float, default=None, help="pair threshold on the Q gap (default 0.2)")
    ap.add_argument("--ratio", type=float, default=1.0, help="K = ratio × the smallest pool")
    ap.add_argument("--dpo-steps", type=int, default=4)
    ap.add_argument("--dpo-batch", type=int, default=1)
    ap.add_argument("--dpo-accum", type=int, default=4)
    ap.add_argument("--dpo-lr", type=float, default=5e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument(
        "--work-dir",
        default=None,
        help="keep pools, adapters and checkpoints here: a rerun resumes (default: a temp dir)",
    )
    ap.add_argument("--progress", action="store_true", help="progress bars on stderr")
    args = ap.parse_args()
    args.dtype = resolve_dtype(args.dtype)  # a work dir records the dtype it ran in
    lams = args.lam or [1.0]
    if any(lam <= 0 for lam in lams):
        raise SystemExit("--lam: the guided arms need λ > 0 (λ = 0 is always run)")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    if args.explore < 2:
        # Step 0 always selects the root: the guide has nothing to steer before step 1.
        log.warning("--explore %d: the guide cannot change a selection before step 1", args.explore)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    engine = HFEngine(args.model, dtype=args.dtype)
    tmp = None if args.work_dir else tempfile.TemporaryDirectory(prefix="dits-guided-")
    root = Path(args.work_dir or tmp.name)  # type: ignore[union-attr]
    # Pools resume tree by tree; pool figures, the untrained evaluation and each arm's training and
    # evaluation are kept as checkpoints, so a run of hours can be cut and resumed.
    ckpt = Checkpoints(root, args, keep=args.work_dir is not None, not_results=_NOT_RESULTS)
    n = args.train_tasks
    # Spare tasks for the λ = 0 arm's extra trees: the guided search costs a few times a plain one here.
    spare = 4 * n
    cfg0 = run_config(args, 0.0, n + spare)
    cal = load_or_calibrate_t_norm(
        engine, examples_for(cfg0.task, "train")[:n], cfg0, root / "t_norm.json", seed=cfg0.seed
    )
    test = examples_for(cfg0.task, "test")

    infos: dict[str, dict[str, Any]] = {}
    for lam in lams:
        name = f"lam_{lam:g}"
        log.info("guided search, λ = %g, on %d tasks", lam, n)
        infos[name] = ckpt.get(f"pool_{name}", grow, engine, run_config(args, lam, n + spare), root / name, n,
                               cal.t_norm, args.progress)  # fmt: skip
    log.info("Q-value search on %d tasks", n)
    base_info = ckpt.get("pool_lam_0_first", grow, engine, cfg0, root / "lam_0", n, cal.t_norm, args.progress)
    target = statistics.fmean(info["flops"] for info in infos.values())
    per_tree = base_info["flops"] / n
    extra = min(spare, max(0, round((target - base_info["flops"]) / per_tree)))
    log.info("λ = 0: %d extra trees to reach %.3g FLOPs (%.3g per tree)", extra, target, per_tree)
    more = ckpt.get("pool_lam_0", grow, engine, cfg0, root / "lam_0", n + extra, cal.t_norm, args.progress)
    more.update(extra_trees=extra, flops_vs_guided=more["flops"] / target,
                seconds=base_info["seconds"] + more["seconds"])  # fmt: skip
    infos = {"lam_0": more, **infos}
    pools = {name: pool_of(root / name, info["trees"], cfg0) for name, info in infos.items()}

    smallest = min(len(p) for _, p in pools.values())
    if smallest == 0:
        raise SystemExit("a pool has no pairs: use more --train-tasks or --explore")
    keep = max(1, round(args.ratio * smallest))
    train_seeds = parse_seeds(args.train_seed) if args.train_seed else [args.seed]
    log.info("evaluating the untrained model on %d test tasks", len(test))
    untrained = ckpt.get("untrained", evaluate, engine, test, cfg0, None)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in pools}
    for seed in train_seeds:
        tcfg = TrainConfig.model_validate(
            {
                "seed": seed,
                "dpo": {
                    "lr": args.dpo_lr, "beta": args.beta, "batch_size": args.dpo_batch,
                    "grad_accum": args.dpo_accum, "max_steps": args.dpo_steps, "epochs": 1000,
                },
            }
        )  # fmt: skip
        for name, pool in pools.items():
            # (--seed's models keep the name they had before --train-seed existed)
            key = f"train_{name}" if seed == args.seed else f"train_{name}_seed{seed}"
            runs[name].append(ckpt.get(key, train_arm, engine, name, pool, keep, tcfg, cfg0, test, root))
    arms: dict[str, dict[str, Any]] = {}
    for name, (trees, pairs) in pools.items():
        entries = runs[name]
        arms[name] = {
            "pool": {
                **infos[name],
                "chosen_metric": statistics.fmean(chosen_metrics(trees, pairs)),
                "chosen_metric_kept": entries[0]["kept_metric"],
                "rollout_metric": statistics.fmean(r.metric for t in trees for r in t.rollouts),
            },
            **pooled_metric(entries),  # over every (training seed, test task)
            "per_train_seed": [{k: v for k, v in public(e).items() if k != "kept_metric"} for e in entries],
        }
    for name, arm in arms.items():
        if name != "lam_0":
            arm["minus_lam_0"] = paired_difference(runs[name], runs["lam_0"])
    plain = {t.task_id: t.selected for t in pools["lam_0"][0]}
    for name, (trees, _) in pools.items():  # did the guide change any selection? (same seeds as λ = 0)
        arms[name]["pool"]["selections_differ"] = statistics.fmean(
            t.selected != plain[t.task_id] for t in trees
        )
    guided = [a for a in arms if a != "lam_0"]
    best = max(guided, key=lambda a: arms[a]["pool"]["chosen_metric"])
    report = {
        "benchmark": "guided_search",
        "settings": {
            **vars(args),
            "lam": lams,
            "train_seed": train_seeds,
            "t_norm": cal.t_norm,
            "keep": keep,
        },
        "untrained": public(untrained),
        "arms": arms,
        "best_lam": best,
        "best_minus_lam_0": arms[best]["minus_lam_0"],
        "seconds": time.perf_counter() - t_start,
    }
    print(json.dumps(report, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
