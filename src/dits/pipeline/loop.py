"""The DITS loop (DESIGN.md section 2): stages per iteration, one lineage of models per selection method.

Directory layout under ``runs/<name>/``::

    config.yaml                      the config of the latest invocation
    base/evaluate/                   the untrained model on the test split
    iter_<i>/<stage>/                a stage shared by every method (iteration 0, before selection)
    iter_<i>/<stage>-<method>/       a stage of one method's lineage

Every method starts from the same model; in iteration 0 the stages before ``select`` (sft-data, sft,
search, influence) are run once and shared, so Optima (``q``) and DITS (``mix``) are trained on the same
synthesized pool. From ``select`` on, and in every later iteration, each method has its own stages.

Iteration ``i`` draws its training tasks from slice ``i`` of the train split (``task.train`` tasks per
iteration), so no iteration searches a task an earlier one trained on. Influence is measured on the dev
split, evaluation on the test split; the three are disjoint.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from dits.config import RunConfig, dump_config
from dits.engine.base import Engine
from dits.pipeline.stage import StageManifest, run_stage
from dits.tasks.example import Example
from dits.tasks.source import examples_for

log = logging.getLogger(__name__)

STAGES: dict[str, tuple[str, ...]] = {
    "isft": ("sft-data", "sft", "evaluate"),
    "idpo": ("search", "influence", "select", "dpo", "evaluate"),
    "isft-dpo": ("sft-data", "sft", "search", "influence", "select", "dpo", "evaluate"),
}
SHARED_UNTIL = "select"
"""In iteration 0, stages before this one are shared by all methods (same model, same tasks)."""
NEEDS_INFLUENCE = {"influence", "mix"}


class ModelRef(BaseModel):
    """A model of a lineage: the base, a saved LoRA adapter, or saved full weights."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["base", "adapter", "full"]
    path: str | None = None
    digest: str
    """Digest of the stage that produced it (the base: of the engine config): part of later inputs."""

    @property
    def adapter_name(self) -> str:
        return f"m{self.digest[:10]}"


class EngineHolder:
    """The run's engine, rebuilt only when a lineage's full fine-tuned weights must replace the base.

    The rebuilt engine keeps the same ledger object, so stage costs stay on one run-wide account."""

    def __init__(self, cfg: RunConfig, engine: Engine | None = None) -> None:
        self.cfg = cfg
        self._engine = engine
        self._base_path: str | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            from dits.synthesize import engine_from_config

            self._engine = engine_from_config(self.cfg.engine)
        return self._engine

    def adopt_full(self, path: str) -> None:
        """Full fine-tuning changed the engine's base in place: it now holds the weights saved at ``path``."""
        self._base_path = path

    def activate(self, ref: ModelRef) -> Engine:
        """Make ``ref`` the model that generate/score/train use."""
        engine = self.engine
        if ref.kind == "full":
            if self._base_path != ref.path:
                from dits.synthesize import engine_from_config

                ledger = engine.ledger
                engine = engine_from_config(self.cfg.engine.model_copy(update={"model": ref.path}))
                engine.ledger = ledger
                self._engine, self._base_path = engine, ref.path
            engine.set_adapter(None)
            return engine
        if ref.kind == "base":
            if self._base_path is not None:  # a full fine-tune replaced the base: go back to the original
                self._engine, self._base_path = None, None
                ledger = engine.ledger
                engine = self.engine
                engine.ledger = ledger
            engine.set_adapter(None)
            return engine
        from dits.train.common import adapter_names

        assert ref.path is not None
        if ref.adapter_name not in adapter_names(engine):
            engine.load_adapter(ref.adapter_name, ref.path)
        engine.set_adapter(ref.adapter_name)
        return engine


def stage_dir_name(stage: str, method: str | None) -> str:
    return stage if method is None else f"{stage}-{method}"


def iteration_tasks(cfg: RunConfig, iteration: int) -> list[Example]:
    """Slice ``iteration`` of the train split, ``task.train`` tasks long."""
    n = cfg.task.train
    pool = examples_for(cfg.task, "train", limit=n * (iteration + 1))
    tasks = pool[n * iteration : n * (iteration + 1)]
    if len(tasks) < n:
        raise ValueError(
            f"iteration {iteration} needs train tasks {n * iteration}..{n * (iteration + 1) - 1}, but the "
            f"{cfg.task.dataset} train split has {len(pool)}; lower task.train or pipeline.iterations"
        )
    return tasks


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
        self.force = force
        self.progress = progress
        self.holder = EngineHolder(cfg, engine)
        self.manifests: list[StageManifest] = []

    # -- helpers -----------------------------------------------------------------------------------

    def _stage(
        self,
        stage: str,
        iteration: int | None,
        method: str | None,
        inputs: Mapping[str, Any],
        body: Any,
    ) -> StageManifest:
        folder = "base" if iteration is None else f"iter_{iteration}"
        stage_dir = self.run_dir / folder / stage_dir_name(stage, method)
        manifest = run_stage(
            stage_dir,
            stage=stage,
            iteration=iteration,
            method=method,
            inputs=inputs,
            body=body,
            ledger=lambda: self.holder.engine.ledger,
            force=self.force,
        )
        self.manifests.append(manifest)
        log.info(
            "stage %s: %s (%.0fs, %.3g FLOPs) -> %s",
            stage_dir.relative_to(self.run_dir),
            ", ".join(f"{k}={v:g}" for k, v in manifest.counts.items()),
            manifest.seconds,
            manifest.ledger.get("flops", 0.0),
            stage_dir,
        )
        return manifest

    def _section(self, *names: str) -> dict[str, Any]:
        data = self.cfg.model_dump(mode="json")
        return {n: data[n] for n in names}

    def _model_key(self) -> dict[str, Any]:
        e = self.cfg.engine
        return {"backend": e.backend, "model": e.model, "dtype": e.dtype, "seed": self.cfg.seed}

    # -- the loop ----------------------------------------------------------------------------------

    def run(self) -> RunResult:
        from dits.jsonl import write_text_atomic

        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / "config.yaml.tmp"
        dump_config(self.cfg, tmp)
        write_text_atomic(self.run_dir / "config.yaml", tmp.read_text())
        tmp.unlink()
        log.info("run %s: artifacts under %s", self.cfg.name, self.run_dir.resolve())

        from dits.pipeline.stages import Stages

        stages = Stages(self)
        base = ModelRef(kind="base", digest=stages.digest(self._model_key()))
        test = examples_for(self.cfg.task, "test")
        if self.cfg.pipeline.evaluate_base:
            stages.evaluate(None, None, base, test)
        recipe = STAGES[self.cfg.pipeline.recipe]
        methods: Sequence[str | None] = (
            [None] if "select" not in recipe else list(dict.fromkeys(self.cfg.pipeline.methods))
        )
        models: dict[str | None, ModelRef] = dict.fromkeys(methods, base)
        for it in range(self.cfg.pipeline.iterations):
            tasks = iteration_tasks(self.cfg, it)
            shared: dict[str, Any] = {}
            for method in methods:
                models[method] = stages.iteration(it, method, models[method], tasks, test, shared)
        return RunResult(run_dir=str(self.run_dir), manifests=self.manifests)
