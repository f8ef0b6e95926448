"""``dits run`` and ``dits demo``: the whole loop from one config, resumable stage by stage."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from dits.config import RunConfig, load_config, parse_overrides
from dits.pipeline.loop import Pipeline, RunResult
from dits.pipeline.stage import StageChanged

__all__ = ["DEMO", "Pipeline", "RunResult", "StageChanged", "add_parser", "demo_config"]

log = logging.getLogger(__name__)

DEMO: dict[str, Any] = {
    "name": "demo",
    "seed": 0,
    "task": {"dataset": "facts", "train": 16, "dev": 8, "test": 32},
    "protocol": {"max_turns": 4, "max_new_tokens": 32},
    "search": {"explore": 2, "expand": 2},
    "influence": {"estimator": "gradient", "chunk_size": 2, "val_tasks": 8, "samples_per_task": 2},
    "train": {"dpo": {"lr": 1e-4, "epochs": 2, "batch_size": 4}},
    "select": {"ratio": 0.5},
    "pipeline": {"recipe": "idpo", "iterations": 1, "methods": ["q", "mix"]},
}
"""The demo: Optima (``q``) and DITS (``mix``) trained from one pool on the embedded model and the
built-in information-exchange task, small enough for a 2-core laptop (DESIGN.md section 10)."""


def demo_config(overrides: dict[str, Any] | None = None) -> RunConfig:
    return load_config(None, overrides, defaults=DEMO)


def _finish(cfg: RunConfig, args: argparse.Namespace) -> int:
    from dits.report import write_report

    try:
        result = Pipeline(cfg, args.runs_dir, force=args.force, progress=not args.no_progress).run()
    except StageChanged as err:
        raise SystemExit(str(err)) from None
    report = write_report(Path(result.run_dir))
    print(report.read_text(encoding="utf-8"))
    print(f"run artifacts: {Path(result.run_dir).resolve()}\nreport: {report.resolve()}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    return _finish(load_config(args.config, parse_overrides(args.set or [])), args)


def cmd_demo(args: argparse.Namespace) -> int:
    cfg = demo_config(parse_overrides(args.set or []))
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        return 0
    return _finish(cfg, args)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value (YAML)")
    p.add_argument("--runs-dir", default="runs", help="runs are written to RUNS_DIR/<name>/")
    p.add_argument("--force", action="store_true", help="redo finished stages whose config changed")
    p.add_argument("--no-progress", action="store_true")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("run", help="run (or resume) the whole loop of a config, then write the report")
    p.add_argument("config", help="YAML run config (see configs/)")
    _common(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser(
        "demo", help="Optima vs DITS on the embedded model and a built-in task (~20 min on 2 CPU cores)"
    )
    _common(p)
    p.add_argument("--print-config", action="store_true", help="print the demo's config and exit")
    p.set_defaults(func=cmd_demo)
