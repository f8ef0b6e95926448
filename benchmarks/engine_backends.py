"""The same tree-search workload through the ``hf`` and ``vllm`` engines, side by side in one process.

Workload: the search stage's ``grow_pool`` with the demo's settings (built-in facts tasks, 4 turns of at
most 32 tokens, explore 2 x expand 2, rollouts at T = 0.7, the reward's readability NLLs scored on the same
engine), the same train tasks and seed for both backends. Sampled tokens differ between the backends
(different random streams), so the trees are not the same; the figures are rates over each run's own
tokens. Engine start is not timed. Per backend: wall seconds, generated tokens per second, prompt tokens
*computed* (prompt minus prefix-cache hits) per generated token, and the pool's size. Prints one JSON
object with ``ratio_vllm_vs_hf`` (generated tokens/s).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from dits.engine import engine_from_config
from dits.engine.config import EngineConfig
from dits.pipeline import demo_config
from dits.stages.search import grow_pool
from dits.tasks.source import examples_for


def run(backend: str, tasks: int, seed: int, out: Path) -> dict[str, float]:
    cfg = demo_config({"engine": {"backend": backend}})
    examples = examples_for(cfg.task, "train")[:tasks]
    t0 = time.perf_counter()
    engine = engine_from_config(EngineConfig(backend=backend), lora_rank=cfg.train.lora.r)
    start = time.perf_counter() - t0
    before = engine.ledger.snapshot()
    t0 = time.perf_counter()
    summary = grow_pool(engine, examples, cfg, out / backend, seed=seed, progress=False)
    wall = time.perf_counter() - t0
    spent = engine.ledger.snapshot() - before
    if hasattr(engine, "close"):
        engine.close()
    computed = spent.prompt_tokens - spent.cached_tokens
    return {
        "start_s": round(start, 1),
        "wall_s": round(wall, 1),
        "generated_tokens": spent.generated_tokens,
        "generated_tok_per_s": round(spent.generated_tokens / wall, 2),
        "prompt_tokens": spent.prompt_tokens,
        "cached_tokens": spent.cached_tokens,
        "prompt_computed_per_generated": round(computed / max(spent.generated_tokens, 1), 2),
        "scored_tokens": spent.scored_tokens,
        "trees": summary.trees,
        "rollouts": summary.rollouts,
        "pairs": summary.pairs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tasks", type=int, default=8, help="train tasks (one tree each)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        hf = run("hf", args.tasks, args.seed, Path(tmp))
        vllm = run("vllm", args.tasks, args.seed, Path(tmp))
    ratio = vllm["generated_tok_per_s"] / hf["generated_tok_per_s"]
    print(json.dumps({"tasks": args.tasks, "hf": hf, "vllm": vllm, "ratio_vllm_vs_hf": round(ratio, 2)}))


if __name__ == "__main__":
    main()
