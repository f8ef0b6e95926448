"""What every stage is given: the run's config, its engine, where its directory is, how to run it.

A stage is a function ``(StageContext, its inputs) -> its outputs``; it decides what its output depends on
(the ``inputs`` mapping recorded in ``stage.json``), runs its body through :meth:`StageContext.run`
(skip / resume / refuse, :func:`dits.artifacts.run_stage`), and returns a :class:`Product` (its directory
and digest) or a :class:`ModelRef`. The pipeline and the single-stage commands (``dits synthesize``,
``dits influence``, ``dits select``) build a context and call the same stage functions, so the same config
gives the same artifacts whichever way it is run.

The one rule for the inputs the influence stage and the influence-guided search share lives here too:
:func:`validation_tasks` (the dev split cut to ``influence.val_tasks``) and :func:`influence_theta` (θ is
the lineage's adapter, or a fresh LoRA seeded with ``influence.seed``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from dits.artifacts import StageManifest, digest, file_digest, lock_dir, run_stage, unlock_dir
from dits.config import RunConfig
from dits.engine import BACKENDS, Engine, engine_from_config, policy_from_config
from dits.engine.policy import TrainablePolicy
from dits.engine.precision import weights_dtype
from dits.executor import Executor, LocalExecutor
from dits.influence.inputs import probe_adapter
from dits.ledger import Ledger
from dits.seeding import derive_seed
from dits.tasks.example import Example
from dits.tasks.source import examples_for
from dits.train.config import LoraSettings

__all__ = [
    "EngineHolder",
    "HolderBench",
    "ModelRef",
    "Product",
    "StageContext",
    "Theta",
    "example_ids",
    "executor_for",
    "influence_theta",
    "probe_shape",
    "validation_tasks",
]

log = logging.getLogger(__name__)


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

    @classmethod
    def base(cls, cfg: RunConfig) -> ModelRef:
        identity: dict[str, Any] = {**cfg.engine.identity(), "seed": cfg.seed}
        weights = weights_dtype(cfg.engine.dtype, cfg.train.full_finetune)
        if BACKENDS[cfg.engine.backend].trains and weights != cfg.engine.dtype:
            identity["weights"] = weights  # master weights under autocast: not the same numerics
        return cls(kind="base", digest=digest(identity))

    @classmethod
    def adapter_dir(cls, path: str | Path) -> ModelRef:
        """A saved adapter directory (``--adapter``), identified by the bytes of its weights."""
        p = Path(path).resolve()
        weights = sorted(p.glob("adapter_model.*"))
        if not (p / "adapter_config.json").is_file() or not weights:
            raise FileNotFoundError(f"{p} is not an adapter directory (no adapter_config.json / weights)")
        return cls(kind="adapter", path=str(p), digest=file_digest(p / "adapter_config.json", *weights))


class Product(BaseModel):
    """A finished stage's directory, digest and counts."""

    path: str
    digest: str
    counts: dict[str, float] = {}

    def file(self, name: str) -> Path:
        return Path(self.path) / name


class EngineHolder:
    """The engine that generates and scores, and the trainable side, each rebuilt only when a lineage's
    full fine-tuned weights must replace what it holds.

    With ``hf`` one engine does both. With ``vllm`` generation runs on vLLM and training (and the
    influence estimators, which train one step or differentiate) on an ``hf`` policy of the same model,
    built when first needed: adapters it trains reach vLLM as saved directories (a new vLLM name per load),
    full fine-tuned weights as the directory a new vLLM engine starts from. Every engine charges the same
    ledger, so stage costs stay on one run-wide account."""

    def __init__(self, cfg: RunConfig, engine: Engine | None = None) -> None:
        computes = getattr(engine, "dtype", None)
        if computes is not None and computes != cfg.engine.dtype:  # the stages' inputs record cfg's dtype
            raise ValueError(
                f"engine.dtype: the config says {cfg.engine.dtype}, the engine given computes in {computes}"
            )
        self.cfg = cfg
        self._engine = engine
        self._built = engine is None
        """The holder made the engine (so it may close it); a caller's engine is never closed."""
        self._base_path: str | None = None
        """Full fine-tuned weights the engine serves (None: the initial model)."""
        self._initial: Engine | None = None
        self._separate = not BACKENDS[cfg.engine.backend].trains
        """Generation and training on different engines (``vllm``)."""
        self._full = cfg.train.full_finetune
        """Full fine-tuning: the trainable side holds float32 master weights (dits.engine.precision)."""
        self._policy: TrainablePolicy | None = None
        self._policy_path: str | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = self._build(None, None)
        return self._engine

    def initial(self) -> Engine:
        """An engine on the initial weights (the reward's readability model): the run's engine while its
        base is the initial model, else (``vllm``) the policy while it is, else a second engine of the
        initial model (``hf``), kept for the run."""
        if self._base_path is None:
            return self.engine
        if self._separate and self._policy is not None and self._policy_path is None:
            return self._policy
        if self._initial is None:
            ledger = self.engine.ledger
            self._initial = (
                policy_from_config(self.cfg.engine, ledger=ledger, trainable_base=self._full)  # scoring only
                if self._separate
                else self._build(None, ledger)
            )
        return self._initial

    def adopt_full(self, path: str) -> None:
        """Full fine-tuning changed the trainable side's base in place: it now holds the weights saved at
        ``path``."""
        if self._separate:
            self._policy_path = path
            return
        if self._initial is self._engine:  # it was the initial model until now; it is not any more
            self._initial = None
        self._base_path = path

    def _build(self, model: str | None, ledger: Ledger | None) -> Engine:
        rank = self.cfg.train.lora.r
        return engine_from_config(
            self.cfg.engine, model=model, ledger=ledger, lora_rank=rank, trainable_base=self._full
        )

    def _serve(self, path: str | None) -> Engine:
        """The generation engine, on the weights at ``path`` (None: the initial model)."""
        if path == self._base_path:
            return self.engine
        ledger = self.engine.ledger
        if path is None and self._initial is not None and not self._separate:  # kept for the reward
            engine = self._initial
        else:
            old = self._engine
            if self._separate and self._built:
                old.close()  # one vLLM at a time: free its memory before the next starts
            engine = self._build(path, ledger)
        self._engine, self._base_path, self._built = engine, path, True
        return engine

    @staticmethod
    def _use(engine: Engine, ref: ModelRef) -> None:
        """Activate ``ref``'s adapter (loading it on first use) or none."""
        if ref.kind != "adapter":
            engine.set_adapter(None)
            return
        assert ref.path is not None
        if ref.adapter_name not in engine.adapter_names():
            engine.load_adapter(ref.adapter_name, ref.path)
        engine.set_adapter(ref.adapter_name)

    def activate(self, ref: ModelRef) -> Engine:
        """Make ``ref`` the model that generate/score use."""
        engine = self._serve(ref.path if ref.kind == "full" else None)
        self._use(engine, ref)
        return engine

    def policy(self, ref: ModelRef) -> TrainablePolicy:
        """The trainable side with ``ref`` active: the engine itself with ``hf``."""
        if not self._separate:
            return self.activate(ref)  # type: ignore[return-value]
        want = ref.path if ref.kind == "full" else None
        if self._policy is None or self._policy_path != want:
            self._policy = policy_from_config(
                self.cfg.engine, model=want, ledger=self.engine.ledger, trainable_base=self._full
            )
            self._policy_path = want
        self._use(self._policy, ref)  # type: ignore[arg-type]
        return self._policy


class HolderBench:
    """A :class:`~dits.executor.Workbench` on an :class:`EngineHolder` with ``model`` active: the driver's
    (``executor.kind: local``) or a Ray actor's."""

    def __init__(self, holder: EngineHolder, model: ModelRef | None) -> None:
        self.holder, self.model = holder, model

    def engine(self) -> Engine:
        return self.holder.engine if self.model is None else self.holder.activate(self.model)

    def initial(self) -> Engine:
        self.engine()  # the initial engine depends on which weights the engine serves
        return self.holder.initial()

    def policy(self) -> TrainablePolicy:
        if self.model is None:
            raise ValueError("a policy needs the model to activate")
        return self.holder.policy(self.model)

    @property
    def ledger(self) -> Ledger:
        return self.holder.engine.ledger


def executor_for(cfg: RunConfig, holder: EngineHolder) -> Executor:
    """``executor.kind``'s executor: units on ``holder`` here, or on Ray actors each holding an engine
    holder of their own (built from the same config, so the same model and the same adapters)."""
    if cfg.executor.kind == "local":
        return LocalExecutor(lambda model: HolderBench(holder, model))
    from dits.ray_executor import RayExecutor

    return RayExecutor(cfg.executor, holder=partial(EngineHolder, cfg), bench=HolderBench,
                       ledger=lambda: holder.engine.ledger)  # fmt: skip


def example_ids(examples: Sequence[Example]) -> list[str]:
    return [ex.id for ex in examples]


def validation_tasks(cfg: RunConfig) -> list[Example]:
    """The validation tasks influence is measured on: the first ``influence.val_tasks`` of the dev split
    (disjoint from train and test by construction for built-in tasks, by the split files otherwise)."""
    val = examples_for(cfg.task, "dev")[: cfg.influence.val_tasks]
    if not val:
        raise ValueError("influence needs validation tasks: set task.dev > 0")
    return val


def probe_shape(cfg: RunConfig, model: ModelRef) -> dict[str, Any] | None:
    """What θ depends on besides ``model``: the probe LoRA's shape and seed (None when θ is an adapter)."""
    if model.kind == "adapter":
        return None
    return {"lora": cfg.train.lora.model_dump(mode="json"), "seed": cfg.influence.seed}


@dataclass(frozen=True)
class Theta:
    """θ as any process can make it on its policy: an adapter already there or saved at ``path`` (named
    ``name``), or a fresh probe LoRA of shape ``lora`` seeded with ``seed``
    (:func:`~dits.influence.inputs.probe_adapter`)."""

    name: str | None = None
    path: str | None = None
    lora: LoraSettings | None = None
    seed: int = 0

    @classmethod
    def of(cls, cfg: RunConfig, model: ModelRef) -> Theta:
        """The run's θ for ``model``: its adapter when it is one, else a fresh LoRA (``train.lora``, B = 0, so
        the same function as the model) seeded with ``influence.seed``."""
        if model.kind == "adapter":
            return cls(name=model.adapter_name, path=model.path)
        return cls(lora=cfg.train.lora, seed=cfg.influence.seed)

    def make(self, policy: TrainablePolicy) -> tuple[str, bool]:
        """θ's adapter name on ``policy``, and whether it was added here (and so is to be removed)."""
        if self.lora is not None:
            return probe_adapter(policy, self.lora, seed=self.seed), True
        assert self.name is not None
        if self.name in policy.adapter_names():
            return self.name, False
        if self.path is None:
            raise ValueError(f"adapter {self.name!r} is not loaded and has no saved directory")
        policy.load_adapter(self.name, self.path)
        return self.name, True


@contextmanager
def influence_theta(engine: TrainablePolicy, cfg: RunConfig, model: ModelRef) -> Iterator[str]:
    """θ for the estimators (:meth:`Theta.of`), as an adapter name on ``engine``, removed again after the
    block if it was added for it; generation keeps using ``model``."""
    name, added = Theta.of(cfg, model).make(engine)
    try:
        yield name
    finally:
        if added:
            engine.delete_adapter(name)


@dataclass
class StageContext:
    """The run a stage belongs to. ``out_dir`` set: every stage writes there (single-stage commands);
    otherwise ``run_dir/(base|iter_<i>)/<stage>[-<method>]``."""

    cfg: RunConfig
    run_dir: Path
    holder: EngineHolder
    force: bool = False
    progress: bool = True
    out_dir: Path | None = None
    manifests: list[StageManifest] = field(default_factory=list)
    executor: Executor | None = None

    def __post_init__(self) -> None:
        # Absolute, so a model's path (a Product's) reads the same from any process or node.
        self.run_dir = self.run_dir.resolve()
        self.out_dir = self.out_dir.resolve() if self.out_dir is not None else None
        self._locked: Path | None = lock_dir(self.out_dir or self.run_dir)  # before anything is written
        if self.executor is None:
            self.executor = executor_for(self.cfg, self.holder)

    def close(self) -> None:
        """Stop the executor's workers (Ray actors) and give the run directory back; the engines stay."""
        if self.executor is not None:
            self.executor.close()
        if self._locked is not None:
            unlock_dir(self._locked)
            self._locked = None

    def __enter__(self) -> StageContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def single(
        cls, cfg: RunConfig, out_dir: str | Path, *, engine: Engine | None = None, progress: bool = True
    ) -> StageContext:
        """A context for one stage written to ``out_dir`` (the single-stage commands)."""
        out = Path(out_dir)
        return cls(cfg, out.parent, EngineHolder(cfg, engine), progress=progress, out_dir=out)

    def stage_dir(self, stage: str, iteration: int | None, method: str | None) -> Path:
        if self.out_dir is not None:
            return self.out_dir
        folder = "base" if iteration is None else f"iter_{iteration}"
        return self.run_dir / folder / (stage if method is None else f"{stage}-{method}")

    def seed(self, stage: str, iteration: int) -> int:
        """The seed of a stage's sampling in an iteration (iteration 0 of ``dits synthesize`` included)."""
        return derive_seed(self.cfg.seed, stage, iteration)

    def activate(self, model: ModelRef) -> Engine:
        """The engine that generates and scores, with ``model`` active."""
        return self.holder.activate(model)

    def policy(self, model: ModelRef) -> TrainablePolicy:
        """The engine that trains and runs the influence estimators, with ``model`` active."""
        return self.holder.policy(model)

    def run(
        self,
        stage: str,
        iteration: int | None,
        method: str | None,
        inputs: Mapping[str, Any],
        body: Callable[[Path], Mapping[str, float]],
    ) -> tuple[Product, StageManifest]:
        """Run (or skip, or resume) ``body`` in the stage's directory; log and keep its manifest."""
        stage_dir = self.stage_dir(stage, iteration, method)
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
            stage_dir.name if self.out_dir is not None else stage_dir.relative_to(self.run_dir),
            ", ".join(f"{k}={v:g}" for k, v in manifest.counts.items()),
            manifest.seconds,
            manifest.ledger.get("flops", 0.0),
            stage_dir,
        )
        return Product(path=str(stage_dir), digest=manifest.digest, counts=manifest.counts), manifest
