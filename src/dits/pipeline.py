"""The DITS loop (docs/design.md section 2): a recipe is a list of stages, run per iteration for each lineage.

Directory layout under ``runs/<name>/``::

    config.yaml                      the config of the latest invocation
    base/evaluate/                   the untrained model on the test split
    iter_<i>/<stage>/                a stage shared by every method (iteration 0, before selection)
    iter_<i>/<stage>-<method>/       a stage of one method's lineage

Every method starts from the same model; in iteration 0 the stages before ``budget`` (sft-data, sft,
search, influence) are run once and shared, so Optima (``q``) and DITS (``mix``) are trained on the same
synthesized pool. From ``budget`` on, and in every later iteration, each method has its own stages; the
``budget`` stage does work only for ``q-budget`` (Optima given the compute of the iteration's first
influence-reading method, :mod:`dits.stages.budget`), which therefore runs after the methods it matches.

Iteration ``i`` draws its training tasks from block ``i`` of the train split: ``task.train`` tasks for
iSFT, then ``task.train`` other tasks for the search (as both references do), so no stage searches a
task an earlier one trained on; ``q-budget``'s extra trees take the
train tasks after all iterations' slices, each budget stage after the last. Influence is measured on the
dev split, evaluation on the test split; the three are disjoint.

The loop knows no stage by name: :data:`STAGES` maps each name to a function of the context and the
lineage's :class:`Step` (its model, its tasks, the products of the stages before), and to whether it
yields the lineage's next model or a product. A new stage is a module under ``dits/stages/`` and a row
here; a recipe is a tuple of stage names registered in :data:`dits.config.RECIPES`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from dits.artifacts import PAIRS_FILE, StageManifest, write_text_atomic
from dits.config import RECIPES, RunConfig, load_config, needed_splits
from dits.engine.base import Engine
from dits.search.pairs import keep_count
from dits.select import budget_matched, needs_scores
from dits.stages.budget import POOL_FILE, budget_stage
from dits.stages.context import EngineHolder, ModelRef, Product, StageContext
from dits.stages.evaluate import evaluate_stage
from dits.stages.influence import influence_stage
from dits.stages.search import search_stage
from dits.stages.select import select_stage
from dits.stages.sft_data import sft_data_stage
from dits.stages.train import train_stage
from dits.tasks.example import Example
from dits.tasks.source import examples_for

__all__ = ["DEMO", "RECIPES", "STAGES", "Pipeline", "RunResult", "demo_config", "iteration_tasks"]

log = logging.getLogger(__name__)

DEMO: dict[str, Any] = {
    "name": "demo",
    "seed": 0,
    "task": {"dataset": "facts", "train": 24, "dev": 8, "test": 128},
    "protocol": {"max_turns": 4, "max_new_tokens": 32},
    "sft_data": {"n_samples": 4, "keep_slice": [0.0, 1.0]},
    "search": {"explore": 2, "expand": 2},
    "influence": {"estimator": "gradient", "chunk_size": 2, "val_tasks": 8, "samples_per_task": 2},
    # One row per micro-batch: TRL's peak memory on this model grows ~1.5 GB (SFT) / 2.2 GB (DPO) per row of a
    # micro-batch (peak 5.6 vs 2.1 GB and 9.5 vs 3.2 GB for batch 4x1 vs 1x4, same loss, faster).
    "train": {
        "sft": {"lr": 2e-4, "epochs": 3, "batch_size": 1, "grad_accum": 4},
        "dpo": {"lr": 1e-4, "epochs": 2, "batch_size": 1, "grad_accum": 4},
    },
    "select": {"ratio": 0.5},
    "pipeline": {"recipe": "isft-dpo", "iterations": 1, "methods": ["q", "q-budget", "mix"]},
}
"""The demo: iSFT, then Optima (``q``), Optima at DITS's compute (``q-budget``) and DITS (``mix``) trained
from one pool, on the embedded model and the built-in information-exchange task, sized for a 2-core laptop
(docs/design.md section 10). Every qualifying best-of-4 conversation is kept for iSFT (``keep_slice`` [0, 1]):
the untrained model solves few tasks, and the rows are what teaches the format."""


def demo_config(overrides: dict[str, Any] | None = None) -> RunConfig:
    return load_config(None, overrides, defaults=DEMO)


@dataclass
class Step:
    """What a stage of one lineage's iteration reads: the lineage's model, its tasks, earlier products."""

    iteration: int
    owner: str | None
    """The method whose directory the stage writes (None: shared by every method)."""
    readers: frozenset[str]
    """The methods that will read this stage's output."""
    model: ModelRef
    tasks: dict[str, list[Example]]
    """The train tasks of the stages that draw them (``sft-data``, ``search``), by stage."""
    test: list[Example]
    products: dict[str, Product | None] = field(default_factory=dict)
    budget_of: Product | None = None
    """The influence stage a budget-matched method matches (a scored lineage's, same iteration)."""
    first_spare: int = 0
    """The first train task no iteration's slice and no earlier budget stage uses."""

    def product(self, stage: str) -> Product:
        p = self.products.get(stage)
        if p is None:
            raise ValueError(f"stage {stage!r} must run before this one in the recipe")
        return p


def _influence(ctx: StageContext, s: Step) -> Product | None:
    if not any(needs_scores(m) for m in s.readers):  # nobody reads the scores: not computed
        return None
    search = s.product("search")
    return influence_stage(ctx, s.iteration, s.owner, s.model, search.file(PAIRS_FILE), search.digest)


def _budget(ctx: StageContext, s: Step) -> Product | None:
    """Only a budget-matched method (``q-budget``) grows extra trees, to match ``s.budget_of``'s
    influence stage."""
    (method,) = s.readers
    if not budget_matched(method):
        return None
    if s.budget_of is None:
        raise ValueError(f"{method} needs an influence stage of a scored method in this iteration")
    return budget_stage(ctx, s.iteration, method, s.model, s.product("search"), s.budget_of, s.first_spare)


def _select(ctx: StageContext, s: Step) -> Product:
    (method,) = s.readers
    budget = s.products.get("budget")
    if budget is not None:  # q-budget: the enlarged pool, keeping as many pairs as mix keeps
        keep = keep_count(int(budget.counts["base_pairs"]), ctx.cfg.select.ratio)
        return select_stage(ctx, s.iteration, method, budget.file(POOL_FILE), budget.digest, None, keep=keep)
    search = s.product("search")
    return select_stage(ctx, s.iteration, method, search.file(PAIRS_FILE), search.digest,
                        s.products.get("influence"))  # fmt: skip


def _sft(ctx: StageContext, s: Step) -> ModelRef:
    """iSFT on the lineage's samples, starting from the lineage's model or, with ``train.sft_from:
    initial``, from the initial model (the samples still come from the lineage's model)."""
    start = ModelRef.base(ctx.cfg) if ctx.cfg.train.sft_from == "initial" else s.model
    return train_stage(ctx, s.iteration, s.owner, start, s.product("sft-data"), "sft")


def _evaluate(ctx: StageContext, s: Step) -> None:
    evaluate_stage(ctx, s.iteration, s.owner, s.model, s.test)


@dataclass(frozen=True)
class StageSpec:
    run: Callable[[StageContext, Step], Any]
    yields_model: bool = False


STAGES: dict[str, StageSpec] = {
    "sft-data": StageSpec(lambda c, s: sft_data_stage(c, s.iteration, s.owner, s.model, s.tasks["sft-data"])),
    "sft": StageSpec(_sft, True),
    "search": StageSpec(lambda c, s: search_stage(c, s.iteration, s.owner, s.model, s.tasks["search"])),
    "influence": StageSpec(_influence),
    "budget": StageSpec(_budget),
    "select": StageSpec(_select),
    "dpo": StageSpec(
        lambda c, s: train_stage(c, s.iteration, s.owner, s.model, s.product("select"), "dpo"), True
    ),
    "evaluate": StageSpec(_evaluate),
}
SHARED_UNTIL = "budget"
"""In iteration 0, stages before this one are shared by all methods (same model, same tasks)."""


TASK_STAGES: tuple[str, ...] = ("sft-data", "search")
"""The stages that draw train tasks, in the order their slices are laid out within an iteration."""


def iteration_tasks(cfg: RunConfig, iteration: int) -> dict[str, list[Example]]:
    """The train tasks of each task-drawing stage of the recipe in ``iteration``, ``task.train`` each:
    iteration i takes the i-th block of the train split, and within it the search tasks come after the
    iSFT tasks (as both references draw them), so no stage sees a task an earlier one trained on."""
    n = cfg.task.train
    stages = [st for st in TASK_STAGES if st in RECIPES[cfg.pipeline.recipe]]
    width = n * len(stages)
    pool = examples_for(cfg.task, "train", limit=width * (iteration + 1), up_to=True)
    if len(pool) < width * (iteration + 1):
        raise ValueError(
            f"iteration {iteration} needs train tasks {width * iteration}..{width * (iteration + 1) - 1} "
            f"({n} for each of {', '.join(stages)}), but the {cfg.task.dataset} train split has {len(pool)}; "
            "lower task.train or pipeline.iterations"
        )
    start = width * iteration
    return {st: pool[start + k * n : start + (k + 1) * n] for k, st in enumerate(stages)}


def tasks_per_iteration(cfg: RunConfig) -> int:
    return cfg.task.train * sum(st in RECIPES[cfg.pipeline.recipe] for st in TASK_STAGES)


class RunResult(BaseModel):
    """Every stage manifest of a run, in the order the stages ran."""

    run_dir: str
    manifests: list[StageManifest]


class Pipeline:
    """Runs (or resumes) the stages of ``cfg`` under ``runs_root/<cfg.name>``."""

    def __init__(
        self,
        cfg: RunConfig,
        runs_root: str | Path = "runs",
        *,
        force: bool = False,
        engine: Engine | None = None,
        progress: bool = True,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(runs_root) / cfg.name
        self.ctx = StageContext(cfg, self.run_dir, EngineHolder(cfg, engine), force=force, progress=progress)

    def run(self) -> RunResult:
        try:
            return self._run()
        finally:
            self.ctx.close()

    def _check(self) -> list[Example]:
        """What validating the config cannot tell (:func:`dits.config.needed_splits` checked the counts),
        checked before any work: the recipe's stages exist, the train split holds every iteration's tasks,
        and the splits the run reads hold tasks. Returns the test tasks."""
        cfg = self.cfg
        unknown = [st for st in RECIPES[cfg.pipeline.recipe] if st not in STAGES]
        if unknown:
            raise ValueError(
                f"pipeline.recipe {cfg.pipeline.recipe!r} names stages that do not exist: {unknown}"
            )
        iteration_tasks(cfg, cfg.pipeline.iterations - 1)  # raises naming the keys when the split is short
        test = examples_for(cfg.task, "test")
        needed = needed_splits(cfg)
        for split in ("dev", "test"):
            if split in needed and not (test if split == "test" else examples_for(cfg.task, split, 1)):
                raise ValueError(
                    f"task.{split}: the {cfg.task.dataset} {split} split holds no tasks, but {needed[split]}"
                )
        return test

    def _run(self) -> RunResult:
        cfg, ctx = self.cfg, self.ctx
        test = self._check()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.run_dir / "config.yaml", cfg.to_yaml())
        log.info("run %s: artifacts under %s", cfg.name, self.run_dir.resolve())

        base = ModelRef.base(cfg)
        if cfg.pipeline.evaluate_base:
            evaluate_stage(ctx, None, None, base, test)
        for method in cfg.pipeline.baselines:
            evaluate_stage(ctx, None, method, base, test, method=method, k=5, stage="baseline")
        recipe = RECIPES[cfg.pipeline.recipe]
        cut = recipe.index(SHARED_UNTIL) if SHARED_UNTIL in recipe else len(recipe)
        methods: list[str | None] = (
            [None] if "select" not in recipe else list(dict.fromkeys(cfg.pipeline.methods))
        )
        methods.sort(key=lambda m: m is not None and budget_matched(m))  # after those they match
        everyone = frozenset(m for m in methods if m is not None)
        models: dict[str | None, ModelRef] = dict.fromkeys(methods, base)
        first_spare = tasks_per_iteration(cfg) * cfg.pipeline.iterations
        for it in range(cfg.pipeline.iterations):
            tasks = iteration_tasks(cfg, it)
            shared: dict[str, Any] = {}
            scored: Product | None = None  # the first scored lineage's influence stage this iteration
            for method in methods:
                step = Step(it, method, everyone, models[method], tasks, test, budget_of=scored,
                            first_spare=first_spare)  # fmt: skip
                for index, stage in enumerate(recipe):
                    step.owner = None if (it == 0 and index < cut) or method is None else method
                    step.readers = everyone if step.owner is None else frozenset({method} - {None})
                    spec = STAGES[stage]
                    if step.owner is None and stage in shared:
                        result = shared[stage]
                    else:
                        result = spec.run(ctx, step)
                        if step.owner is None:
                            shared[stage] = result
                    if spec.yields_model:
                        step.model = result
                    else:
                        step.products[stage] = result
                if method is not None and needs_scores(method) and scored is None:
                    scored = step.products.get("influence")
                if step.products.get("budget") is not None:
                    first_spare += int(step.products["budget"].counts["trees"])
                models[method] = step.model
        last = cfg.pipeline.iterations - 1
        for k in cfg.pipeline.scaling:  # the inference-scaling curve of the untrained and each final model
            evaluate_stage(ctx, None, f"k{k}", base, test, method="mas-sc", k=k, stage="scaling")
            for method, model in models.items():
                evaluate_stage(ctx, last, f"{method or 'model'}-k{k}", model, test, method="mas-sc", k=k,
                               stage="scaling")  # fmt: skip
        return RunResult(run_dir=str(self.run_dir), manifests=ctx.manifests)
