"""float32 against the resolved ``engine.dtype: auto`` on the embedded model, side by side in one process.

Both engines are loaded once; each piece of work runs on both, the order alternating between repeats so
neither dtype always runs first (``--repeats``). Measured, with the demo's protocol (4 turns, 32 tokens):

- generation: greedy tokens/s on Alice's first-turn views of ``--views`` facts test tasks;
- scoring: ``engine.score`` of ``--score-views`` views each with a ``--score-tokens``-token completion
  (sampled once from the float32 engine, not timed);
- training: one LoRA SFT step through TRL (the path ``dits`` trains on: bf16 autocast over the float32
  adapter where the compute is bf16) on ``--train-rows`` rows of ``--train-tokens`` tokens, one row per
  micro-batch as the demo trains; timed from ``trainer.train()`` to its end;
- greedy agreement: the share of the generation views whose greedy completion is identical in both dtypes;
- the two-agent metric (greedy, the demo's protocol) on ``--tasks`` test tasks for both dtypes, and the paired
  difference with its 95% bootstrap interval.

On a machine without native bf16 ``auto`` is float32 and the ratios are ~1. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from dits.engine.base import SamplingParams
from dits.engine.hf import HFEngine
from dits.engine.precision import cpu_bf16_flags, resolve_dtype
from dits.mas.dialogue import run_dialogues
from dits.mas.protocol import render_view, turn_prefix
from dits.pipeline import demo_config
from dits.stats import paired_bootstrap
from dits.tasks.builtin import make_builtin
from dits.train import TrainConfig
from dits.train.sft import sft_trainer


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def train_rows(engine: HFEngine, n: int, tokens: int) -> list[dict[str, Any]]:
    """SFT rows of about ``tokens`` tokens: a facts view as the prompt, its notes repeated as completion."""
    rows = []
    proto = demo_config().protocol
    for ex in make_builtin("facts", "train", n):
        view = render_view(ex, [], 0, proto)
        room = max(1, tokens - len(engine.encode_view(view)))
        text = " ".join(ex.contexts)
        while engine.count_tokens(text) < room:
            text += " " + text
        text = engine.tokenizer.decode(engine.tokenizer.encode(text, add_special_tokens=False)[:room])
        rows.append({"prompt": view, "completion": [{"role": "assistant", "content": text}]})
    return rows


def train_step(engine: HFEngine, rows: list[dict[str, Any]], steps: int) -> float:
    cfg = TrainConfig.model_validate(
        {"sft": {"lr": 1e-4, "batch_size": 1, "grad_accum": len(rows), "max_steps": steps}}
    )
    with sft_trainer(engine, rows, cfg) as trainer:
        _, seconds = timed(trainer.train)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--views", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--score-views", type=int, default=32)
    ap.add_argument("--score-tokens", type=int, default=60)
    ap.add_argument("--train-rows", type=int, default=8)
    ap.add_argument("--train-tokens", type=int, default=400)
    ap.add_argument("--tasks", type=int, default=64, help="test tasks of the two-agent metric")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    auto = resolve_dtype("auto", "cpu")
    engines = {"float32": HFEngine("smollm2-135m", dtype="float32", device="cpu")}
    engines["auto"] = HFEngine("smollm2-135m", dtype=auto, device="cpu")
    proto = demo_config().protocol
    tests = make_builtin("facts", "test", max(args.views, args.tasks))
    views = [render_view(ex, [], 0, proto) for ex in tests[: args.views]]
    prefix = turn_prefix(0, proto)
    greedy = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, prefix=prefix)
    sampled = SamplingParams(max_new_tokens=args.score_tokens, temperature=1.0, seed=1, prefix=prefix)
    score_views = views[: args.score_views]
    completions = [c[0].text for c in engines["float32"].generate(score_views, sampled)]
    rows = train_rows(engines["float32"], args.train_rows, args.train_tokens)
    for engine in engines.values():  # warm-up: first calls pay one-off costs (oneDNN kernel selection)
        engine.generate(views[:4], SamplingParams(max_new_tokens=4, temperature=0.0))
        train_step(engine, rows[:1], 1)

    secs: dict[str, dict[str, float]] = {k: {"gen": 0.0, "score": 0.0, "train": 0.0} for k in engines}
    tokens: dict[str, int] = dict.fromkeys(engines, 0)
    texts: dict[str, list[str]] = {}
    for rep in range(args.repeats):
        order = list(engines) if rep % 2 == 0 else list(engines)[::-1]
        for name in order:
            e = engines[name]
            out, s = timed(lambda e=e: e.generate(views, greedy))
            secs[name]["gen"] += s
            tokens[name] += sum(c[0].completion_tokens for c in out)
            texts[name] = [c[0].text for c in out]
            secs[name]["score"] += timed(lambda e=e: e.score(score_views, completions, prefix))[1]
            secs[name]["train"] += train_step(e, rows, 1)
    metric: dict[str, list[float]] = {}
    for name, e in engines.items():
        transcripts = run_dialogues(e, tests[: args.tasks], proto, seeds=[0] * args.tasks)
        metric[name] = [t.metric for t in transcripts]
    diff = paired_bootstrap(metric["auto"], metric["float32"])
    tps = {k: tokens[k] / secs[k]["gen"] for k in engines}
    print(
        json.dumps(
            {
                "dtype_auto": auto,
                "cpu_bf16_flags": sorted(cpu_bf16_flags()),
                "threads": torch.get_num_threads(),
                "gen_tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
                "score_s": {k: round(v["score"] / args.repeats, 2) for k, v in secs.items()},
                "train_step_s": {k: round(v["train"] / args.repeats, 2) for k, v in secs.items()},
                "ratio_gen": round(tps["auto"] / tps["float32"], 2),
                "ratio_score": round(secs["float32"]["score"] / secs["auto"]["score"], 2),
                "ratio_train": round(secs["float32"]["train"] / secs["auto"]["train"], 2),
                "greedy_identical": round(
                    sum(a == b for a, b in zip(texts["float32"], texts["auto"], strict=True)) / len(views), 3
                ),
                "metric_fp32": round(sum(metric["float32"]) / args.tasks, 3),
                "metric_auto": round(sum(metric["auto"]) / args.tasks, 3),
                "metric_auto_minus_fp32": diff.model_dump(),
                "settings": vars(args),
            }
        )
    )


if __name__ == "__main__":
    main()
