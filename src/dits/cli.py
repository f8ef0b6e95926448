"""The ``dits`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable

log = logging.getLogger("dits")

Command = Callable[[argparse.Namespace], int]


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="smollm2-135m", help="hub id, local HF dir, .gguf file, or smollm2-135m"
    )
    p.add_argument("--backend", default="hf", choices=["hf", "vllm"])


def cmd_smoke(args: argparse.Namespace) -> int:
    """Load the model and run one batched generation: proves the install works end to end."""
    from dits.engine import SamplingParams, make_engine

    t0 = time.perf_counter()
    engine = make_engine(args.backend, args.model)
    load_s = time.perf_counter() - t0
    views = [
        [{"role": "user", "content": f"In one sentence, what is {a} plus {b}?"}]
        for a, b in [(2, 3), (4, 4), (10, 5)]
    ] + [[{"role": "user", "content": "Name one planet of the solar system."}]]
    t0 = time.perf_counter()
    outs = engine.generate(views, SamplingParams(max_new_tokens=args.max_new_tokens))
    gen_s = time.perf_counter() - t0
    for view, out in zip(views, outs, strict=True):
        print(f"> {view[-1]['content']}\n  {out[0].text!r} ({out[0].finish_reason})")
    summary = {
        "model": args.model,
        "load_s": round(load_s, 2),
        "generate_s": round(gen_s, 2),
        "generated_tokens_per_s": round(engine.ledger.counts.generated_tokens / gen_s, 1),
        "ledger": engine.ledger.to_dict(),
    }
    print(json.dumps(summary, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dits", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("smoke", help="load a model and generate a few answers")
    _engine_args(p)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.set_defaults(func=cmd_smoke)

    from dits import evaluate, influence_cmd, select_cmd, synthesize

    evaluate.add_parser(sub)
    synthesize.add_parser(sub)
    influence_cmd.add_parser(sub)
    select_cmd.add_parser(sub)

    from dits import pipeline, report

    pipeline.add_parser(sub)
    report.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
