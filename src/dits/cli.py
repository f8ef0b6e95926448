"""The ``dits`` command line: argument parsing only; every command calls a stage, the pipeline or the report.

Every command that runs work reads a run config: ``run`` from its positional file, ``demo`` from the demo's
defaults, the others from ``--config`` (the defaults if omitted); all take repeatable ``--set KEY=VALUE``.
``smoke``, ``evaluate``, ``synthesize``, ``influence`` and ``select`` also get one ``--SECTION.KEY`` flag per
key of the config sections they read, built from the config models (help from the field's description,
choices from its ``Literal`` or its registry, :mod:`dits.registry`), plus short aliases such as
``--strategy``; a flag beats ``--set``, which beats the file. Flags and ``--set`` values are validated by the
same config model as the file (:func:`dits.config.load_config`).

Every known error (a config that does not validate, a YAML syntax error, a missing file, a stage that holds
other inputs' artifacts, a malformed dataset file, a bad value a stage refuses) prints one line
``dits: error: ...`` naming the file, key or path, and exits 2; ``--debug`` also prints the traceback. Any
other exception is a bug and shows its traceback.

The single-stage commands (``synthesize``, ``influence``, ``select``) build a
:class:`~dits.stages.context.StageContext` on their ``--out`` directory and call the same stage functions
the pipeline calls, so a stage gives the same artifacts from the command line and inside ``dits run``.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, get_args

log = logging.getLogger("dits")


_FLAG = "cfg:"
"""The ``dest`` prefix of a flag that sets a config key (its dotted key follows)."""


def _config_args(
    p: argparse.ArgumentParser,
    *sections: str,
    short: dict[str, str] | None = None,
    path: bool = True,
) -> None:
    """``--config`` (a run config YAML; its defaults if omitted), repeatable ``--set KEY=VALUE``, and one
    ``--SECTION.KEY`` flag per key of each named config section (nested sections included), built from the
    config model itself: its description is the help, its ``Literal`` or registry the choices. ``short``
    adds plain aliases (``{"strategy": "select.strategy"}``). A flag given beats ``--set`` and the file."""
    from dits.config import RunConfig

    if path:
        p.add_argument("--config", help="run config YAML (the built-in defaults if omitted)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted config override, value parsed as YAML (repeatable), e.g. --set search.explore=2",
    )
    aliases: dict[str, list[str]] = {}
    for alias, key in (short or {}).items():
        aliases.setdefault(key, []).append(f"--{alias.replace('_', '-')}")
    group = p.add_argument_group("config keys (each overrides --config and --set)") if sections else p
    for section in sections:
        for key, field in _fields(RunConfig, section):
            choices = _choices(field)
            group.add_argument(
                f"--{key}",
                *aliases.pop(key, []),
                dest=_FLAG + key,
                default=argparse.SUPPRESS,  # only the flags given override (`--pairs.tau null` included)
                metavar=None if choices else "VALUE",
                choices=choices,
                type=str if choices or field.annotation in (str, str | None) else _yaml,
                help=(field.description or "").replace("%", "%%") or None,
            )
    if aliases:
        raise ValueError(f"short flags for keys of no listed section: {sorted(aliases)}")


def _fields(model: Any, prefix: str) -> list[tuple[str, Any]]:
    """``(dotted key, FieldInfo)`` of every leaf key under ``prefix`` of ``model``."""
    from pydantic import BaseModel

    node = model
    for part in prefix.split("."):
        node = node.model_fields[part].annotation
    out: list[tuple[str, Any]] = []
    for name, field in node.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _fields(model, f"{prefix}.{name}")
        else:
            out.append((f"{prefix}.{name}", field))
    return out


def _choices(field: Any) -> Any:
    """A field's allowed values for argparse: its ``Literal``'s, or the registry its check reads."""
    from typing import Literal, get_origin

    from pydantic import AfterValidator

    from dits.registry import Registry

    if get_origin(field.annotation) is Literal:
        return [str(v) for v in get_args(field.annotation)]
    for meta in field.metadata:
        if isinstance(meta, AfterValidator) and isinstance(getattr(meta.func, "__self__", None), Registry):
            return meta.func.__self__
    return None


def _yaml(value: str) -> Any:
    """A flag's value as ``--set`` reads one (YAML: numbers, booleans, lists), for keys that are not text."""
    import yaml

    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a YAML value") from None


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``--set`` items, then the ``--SECTION.KEY`` flags given (every one given, whatever its value)."""
    from dits.config import parse_overrides

    out = parse_overrides(args.set)
    out.update({d.removeprefix(_FLAG): v for d, v in vars(args).items() if d.startswith(_FLAG)})
    return out


def _load(args: argparse.Namespace) -> Any:
    from dits.config import load_config

    return load_config(getattr(args, "config", None), _overrides(args))


class CommandError(Exception):
    """A command's refusal of its arguments (a missing input file, nothing to do): one line, exit 2."""


def _adapter(path: str) -> str:
    """``--adapter``'s directory, checked before any model is loaded."""
    if not (Path(path) / "adapter_config.json").is_file():
        raise CommandError(f"--adapter {path}: not an adapter directory (no adapter_config.json)")
    return path


def _existing(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise CommandError(f"no {what} file {p}")
    return p


# -- commands ----------------------------------------------------------------------------------------


def cmd_smoke(args: argparse.Namespace) -> int:
    """Load the model and run one batched generation: proves the install works end to end."""
    from dits.engine import SamplingParams, engine_from_config

    cfg = _load(args)
    t0 = time.perf_counter()
    engine = engine_from_config(cfg.engine)
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
        "model": cfg.engine.model,
        "dtype": cfg.engine.dtype,
        "load_s": round(load_s, 2),
        "generate_s": round(gen_s, 2),
        "generated_tokens_per_s": round(engine.ledger.counts.generated_tokens / gen_s, 1),
        "ledger": engine.ledger.to_dict(),
    }
    print(json.dumps(summary, indent=2))
    engine.close()
    return 0


def _split_tasks(cfg: Any, args: argparse.Namespace, verb: str) -> list[Any]:
    """The ``--split`` tasks a single-stage command works on (``--limit`` of them, else the config's)."""
    from dits.tasks.source import examples_for

    examples = examples_for(cfg.task, args.split, args.limit)
    if not examples:
        raise CommandError(
            f"no {cfg.task.dataset} {args.split} tasks to {verb} (check --limit, task.{args.split})"
        )
    return examples


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dits.engine import engine_from_config
    from dits.evaluate import SAMPLED, format_table
    from dits.stages.evaluate import evaluate_to_dir

    cfg = _load(args)
    examples = _split_tasks(cfg, args, "evaluate")
    if args.adapter:
        _adapter(args.adapter)
    engine = engine_from_config(cfg.engine)
    if args.adapter:
        # Not "eval": PEFT registers adapters as submodules, and nn.Module.eval is taken.
        engine.load_adapter("evaluated", args.adapter)
        engine.set_adapter("evaluated")
    summaries = []
    for method in args.method or ["mas"]:
        tag = f"{method}-k{args.k}" if method in SAMPLED else method  # each k is its own evaluation
        out = Path(args.out) / f"{cfg.task.dataset}-{args.split}-{tag}"
        summaries.append(
            evaluate_to_dir(engine, examples, method, cfg.protocol, out, k=args.k, seed=cfg.task.seed)
        )
    engine.close()
    print(format_table(summaries))
    print(f"transcripts and summaries under {args.out}/")
    return 0


def cmd_synthesize(args: argparse.Namespace) -> int:
    """Handler of ``dits synthesize``: the search stage on a task split."""
    from dits.artifacts import SEARCH_SUMMARY_FILE
    from dits.stages.context import ModelRef, StageContext
    from dits.stages.search import SearchSummary, search_stage

    cfg = _load(args)
    examples = _split_tasks(cfg, args, "search")
    out = Path(args.out) if args.out else Path("runs") / cfg.name / "synthesize"
    with StageContext.single(cfg, out, progress=not args.no_progress) as ctx:
        product = search_stage(ctx, 0, None, ModelRef.base(cfg), examples, shard_size=args.shard_size)
    summary = SearchSummary.model_validate_json(product.file(SEARCH_SUMMARY_FILE).read_text())
    print(summary.line())
    return 0


def cmd_influence(args: argparse.Namespace) -> int:
    """Handler of ``dits influence``: the influence stage on a pool."""
    from dits.artifacts import SCORES_FILE, StageIncomplete, file_digest, read_jsonl
    from dits.records import InfluenceScore
    from dits.stages.context import ModelRef, StageContext
    from dits.stages.influence import influence_stage

    cfg = _load(args)
    pairs = _existing(args.pairs, "pairs")
    model = ModelRef.adapter_dir(_adapter(args.adapter)) if args.adapter else ModelRef.base(cfg)
    out = Path(args.out) if args.out else Path("runs") / cfg.name / "influence"
    try:
        with StageContext.single(cfg, out, progress=not args.no_progress) as ctx:
            influence_stage(ctx, 0, None, model, pairs, file_digest(pairs), limit=args.limit)
    except StageIncomplete as cut:
        print(f"influence ({cfg.influence.estimator}): {cut}")
        return 0
    scores = read_jsonl(out / SCORES_FILE, InfluenceScore)
    print(
        f"influence ({cfg.influence.estimator}): all {len(scores)} chunks scored; scores: {out / SCORES_FILE}"
    )
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    """Handler of ``dits select``."""
    from dits.stages.select import select_to_dir

    cfg = _load(args)
    scores = _existing(args.scores, "scores") if args.scores is not None else None
    summary = select_to_dir(_existing(args.pairs, "pairs"), scores, cfg.select, args.out)
    print(summary.line())
    return 0


def _finish(cfg: Any, args: argparse.Namespace) -> int:
    from dits.pipeline import Pipeline
    from dits.report import RESULTS_FILE, write_report

    result = Pipeline(cfg, args.runs_dir, force=args.force, progress=not args.no_progress).run()
    report = write_report(Path(result.run_dir))
    print(report.read_text(encoding="utf-8"))
    run_dir = Path(result.run_dir).resolve()
    print(f"run artifacts: {run_dir}\nreport: {report.resolve()}\nresults: {run_dir / RESULTS_FILE}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    return _finish(_load(args), args)


def cmd_demo(args: argparse.Namespace) -> int:
    from dits.pipeline import demo_config

    cfg = demo_config(_overrides(args))
    if args.print_config:
        print(cfg.to_yaml())
        return 0
    return _finish(cfg, args)


def cmd_report(args: argparse.Namespace) -> int:
    from dits.report import write_report

    path = write_report(Path(args.run))
    print(path.read_text(encoding="utf-8"))
    print(f"report: {path.resolve()}")
    return 0


# -- the parser --------------------------------------------------------------------------------------


def _sub(sub: Any, name: str, help: str, doc_of: str | None = None) -> argparse.ArgumentParser:
    """A sub-command; ``doc_of`` names the stage module whose docstring is the command's description."""
    description = None
    if doc_of is not None:
        import importlib

        description = importlib.import_module(doc_of).__doc__
    p = sub.add_parser(
        name, help=help, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # SUPPRESS: given after the command it sets args.debug, else the top-level flag's value stays.
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    return p


def _pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs-dir", default="runs", help="runs are written to RUNS_DIR/<name>/")
    p.add_argument("--force", action="store_true", help="redo finished stages whose config changed")
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    from dits.evaluate import METHODS

    parser = argparse.ArgumentParser(prog="dits", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    engine_flags = {"model": "engine.model", "backend": "engine.backend"}

    p = _sub(sub, "smoke", "load a model and generate a few answers")
    p.add_argument("--max-new-tokens", type=int, default=32)
    _config_args(p, "engine", short=engine_flags)
    p.set_defaults(func=cmd_smoke)

    p = _sub(sub, "evaluate", "evaluate a model on a task split with one or more methods", "dits.evaluate")
    p.add_argument("--adapter", default=None, help="a PEFT LoRA adapter directory to apply")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=32, help="number of tasks")
    p.add_argument("--method", action="append", choices=list(METHODS), help="repeatable; default: mas")
    p.add_argument(
        "--k", "--samples", type=int, default=5, help="samples per task for sc, conversations for mas-sc"
    )
    p.add_argument("--out", default="runs/evaluate", help="output directory (one subdirectory per method)")
    _config_args(p, "engine", "task", "protocol", short={
        **engine_flags, "dataset": "task.dataset", "path": "task.path", "seed": "task.seed",
        "max_turns": "protocol.max_turns", "max_new_tokens": "protocol.max_new_tokens"})  # fmt: skip
    p.set_defaults(func=cmd_evaluate)

    p = _sub(sub, "synthesize", "grow one conversation tree per task and mine preference pairs (resumable)",
             "dits.stages.search")  # fmt: skip
    p.add_argument("--out", help="output directory (default runs/<name>/synthesize)")
    p.add_argument("--split", default="train", help="task split to search (default train)")
    p.add_argument("--limit", type=int, help="number of tasks (default: the config's count for the split)")
    p.add_argument("--shard-size", type=int, default=8, help="trees grown in lockstep (default 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    pair_flags = {"tau": "pairs.tau", "min_gap": "pairs.min_gap", "keep_fraction": "pairs.keep_top_fraction"}
    _config_args(p, "engine", "task", "search", "pairs", short=pair_flags)
    p.set_defaults(func=cmd_synthesize)

    p = _sub(sub, "influence", "score preference pairs by their estimated influence on the validation metric "
             "(resumable)", "dits.stages.influence")  # fmt: skip
    p.add_argument("--pairs", required=True, help="pairs.jsonl (from dits synthesize)")
    p.add_argument(
        "--adapter", help="θ: a saved LoRA adapter directory (default: the base model, via a fresh LoRA)"
    )
    p.add_argument("--out", help="output directory (default runs/<name>/influence)")
    p.add_argument("--limit", type=int, help="score at most this many chunks now (rerun to continue)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _config_args(p, "engine", "influence", short={"estimator": "influence.estimator"})
    p.set_defaults(func=cmd_influence)

    p = _sub(sub, "select", "keep a share of the pairs by Q, influence or both", "dits.stages.select")
    p.add_argument("--pairs", required=True, help="pairs.jsonl (from dits synthesize)")
    p.add_argument("--scores", help="scores.jsonl (from dits influence); needed by strategies that read it")
    p.add_argument("--out", required=True, help="output directory")
    _config_args(p, "select", short={k: f"select.{k}" for k in ("strategy", "ratio", "weight", "seed")})
    p.set_defaults(func=cmd_select)

    p = _sub(sub, "run", "run (or resume) the whole loop of a config, then write the report")
    p.add_argument("config", help="YAML run config (see configs/)")
    _config_args(p, path=False)
    _pipeline_args(p)
    p.set_defaults(func=cmd_run)

    p = _sub(sub, "demo", "Optima vs DITS on the embedded model and a built-in task (~17 min on 2 cores)")
    _config_args(p, path=False)
    _pipeline_args(p)
    p.add_argument("--print-config", action="store_true", help="print the demo's config and exit")
    p.set_defaults(func=cmd_demo)

    p = _sub(sub, "report", "markdown report and plots of a run directory", "dits.report")
    p.add_argument("run", help="the run directory, e.g. runs/demo")
    p.set_defaults(func=cmd_report)
    return parser


_DEBUG_HELP = "on an error, print the traceback too"


class ErrorExit(SystemExit):
    """The exit of a known error: status 2; ``str()`` is the one line printed (after ``dits: error: ``)."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _known_errors() -> tuple[type[BaseException], ...]:
    """What a user's input raises: bad config, YAML, files, datasets, stage inputs, unknown names. The
    config/dataset errors and ``CommandError`` are ``ValueError``s or listed for the record."""
    import yaml

    from dits.artifacts import RunLocked, StageChanged, StageCorrupt
    from dits.config import ConfigError
    from dits.tasks.files import DatasetFormatError, RecordError

    return (
        ConfigError, yaml.YAMLError, StageChanged, StageCorrupt, RunLocked, DatasetFormatError, RecordError,
        CommandError,
        FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
        ValueError,  # a stage's refusal of a value (a split name, a limit, a scores file that does not match)
        KeyError,  # an unknown name (a registry's, an adapter's)
    )  # fmt: skip


def _error_line(err: BaseException) -> str:
    """The error as one line naming what it is about."""
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]
    elif isinstance(err, OSError) and err.filename is not None:
        text = f"{err.strerror or type(err).__name__}: {err.filename}"
    else:
        text = str(err) or type(err).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    out = lines[0] if lines else type(err).__name__
    for line in lines[1:]:  # "invalid config x.yaml:" then one key per line -> "...: a: ...; b: ..."
        out += (" " if out.endswith(":") else "; ") + line
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # A polite kill (SIGTERM) exits like Ctrl-C: finalizers run, so the vllm engine's worker process is
    # stopped with us instead of outliving the run (stages already resume from what they wrote).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        return int(args.func(args) or 0)
    except _known_errors() as err:  # KeyboardInterrupt and SystemExit (SIGTERM: 143) pass through
        if args.debug:
            traceback.print_exc(file=sys.stderr)
        line = _error_line(err)
        print(f"dits: error: {line}", file=sys.stderr)
        raise ErrorExit(line) from None


if __name__ == "__main__":
    sys.exit(main())
