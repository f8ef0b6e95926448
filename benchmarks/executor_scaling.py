"""The same search work under the ``local`` executor and on 1 and 2 Ray actors, one torch thread each.

Workload: the search stage's ``grow_pool`` with the demo's search settings (built-in facts tasks, 4 turns
of at most 32 tokens, explore 2 x expand 2, the reward's readability NLLs), ``--tasks`` trees cut into
shards of ``--shard-size`` (the work units), ``T_norm`` fixed so nothing runs on the driver but the
dispatch. ``local`` runs in this process with ``torch.set_num_threads(1)``. Each Ray setting starts its
actors and loads their engines first (``start_s``, not in ``wall_s``); the three runs write their trees
to separate directories and the script checks that they are identical. Prints one JSON object with the
wall times, ``ratio_2_vs_1`` (1-actor wall / 2-actor wall) and ``overhead_1_vs_local`` (1-actor wall /
local wall - 1).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from dits.config import RunConfig
from dits.executor import Executor
from dits.pipeline import demo_config
from dits.ray_executor import RayExecutor
from dits.stages.context import EngineHolder, HolderBench, ModelRef, executor_for
from dits.stages.search import grow_pool
from dits.tasks.source import examples_for

T_NORM = 40.0


def run(cfg: RunConfig, executor: Executor | None, holder: EngineHolder, args: argparse.Namespace, out: Path):
    examples = examples_for(cfg.task, "train")[: args.tasks]
    t0 = time.perf_counter()
    summary = grow_pool(holder.engine, examples, cfg, out, seed=args.seed, t_norm=T_NORM, progress=False,
                        shard_size=args.shard_size, executor=executor, model=ModelRef.base(cfg))  # fmt: skip
    return time.perf_counter() - t0, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", type=int, default=16, help="train tasks (one tree each)")
    ap.add_argument("--shard-size", type=int, default=2, help="trees per work unit")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    figures: dict[str, dict[str, float]] = {}
    trees: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, workers in (("local", 0), ("ray_1", 1), ("ray_2", 2)):
            kind = "local" if workers == 0 else "ray"
            cfg = demo_config({"executor": {"kind": kind, "workers": max(workers, 1), "num_cpus": 1}})
            holder = EngineHolder(cfg)
            executor = executor_for(cfg, holder)
            t0 = time.perf_counter()
            if isinstance(executor, RayExecutor):  # start the actors and load their engines: not timed
                warm = examples_for(cfg.task, "train")[: workers * args.shard_size]
                cold = RunConfig.model_validate({**cfg.model_dump(), "search": {"explore": 0, "expand": 1}})
                grow_pool(holder.engine, warm, cold, Path(tmp) / f"warm-{name}", t_norm=T_NORM,
                          progress=False, shard_size=args.shard_size, executor=executor,
                          model=ModelRef.base(cfg))  # fmt: skip
            else:
                HolderBench(holder, ModelRef.base(cfg)).engine()
            start = time.perf_counter() - t0
            wall, summary = run(cfg, executor, holder, args, Path(tmp) / name)
            executor.close()
            trees[name] = Path(summary.trees_path).read_bytes()
            figures[name] = {"wall_s": round(wall, 1), "start_s": round(start, 1), "trees": summary.trees,
                             "rollouts": summary.rollouts, "tokens": summary.generated_tokens}  # fmt: skip
    same = trees["ray_1"] == trees["local"] and trees["ray_2"] == trees["local"]
    print(json.dumps({
        "tasks": args.tasks,
        "units": -(-args.tasks // args.shard_size),
        **figures,
        "identical_trees": same,
        "ratio_2_vs_1": round(figures["ray_1"]["wall_s"] / figures["ray_2"]["wall_s"], 2),
        "overhead_1_vs_local": round(figures["ray_1"]["wall_s"] / figures["local"]["wall_s"] - 1, 3),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
