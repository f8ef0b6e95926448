"""The typed run configuration: one YAML file, validated with messages that name the bad key.

Each stage reads only its own section; sections are small pydantic models so a typo ("explor: 8") or a
bad value ("backend: tpu") fails at load time with the dotted key and the allowed values.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidatorFunctionWrapHandler,
    model_validator,
)

from dits.engine.config import EngineConfig
from dits.executor import ExecutorConfig
from dits.influence.base import InfluenceConfig
from dits.mas.protocol import ProtocolConfig
from dits.registry import Registry
from dits.reward import RewardConfig
from dits.search.guided import GuideConfig
from dits.search.mcts import SearchConfig
from dits.search.pairs import PairConfig
from dits.select import SelectConfig, Strategy, budget_matched, needs_scores
from dits.tasks.example import SPLITS
from dits.tasks.loaders import DATASETS, method_defaults
from dits.train.config import TrainConfig


class ConfigError(ValueError):
    """A config that does not validate; the message lists every bad key with what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TaskConfig(_Section):
    """Which dataset and how many tasks of each split. ``path`` is a local file/dir in the original format."""

    dataset: Annotated[str, AfterValidator(DATASETS.check)] = "facts"
    path: str | None = None
    seed: int = 0
    train: int = Field(32, ge=0)
    dev: int = Field(16, ge=0, description="validation tasks (influence); disjoint from train and test")
    test: int = Field(32, ge=0)
    knobs: dict[str, Any] = Field(default_factory=dict, description="difficulty knobs of built-in tasks")


class SftDataConfig(_Section):
    """iSFT data knobs (best-of-n conversations per task); ``None`` takes the dataset's published default
    (:mod:`dits.tasks.defaults`)."""

    n_samples: int = Field(10, ge=1, description="conversations sampled per task")
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    threshold: float | None = Field(None, description="ε, the min reward of a kept best conversation")
    keep_slice: tuple[float, float] | None = Field(
        None,
        description="the ranks kept of the tasks' best conversations sorted by reward, as fractions "
        "[from, to) of the tasks (top 70%: [0, 0.7]; MATH [0.1, 0.8])",
    )
    token_norm: Literal["task_max", "percentile"] = Field(
        "task_max",
        description="T_norm of the iSFT reward: the task's longest sample (the reference) or the "
        "reward.t_norm_percentile of all samples",
    )

    @model_validator(mode="after")
    def _slice_in_order(self) -> SftDataConfig:
        if self.keep_slice is not None and not 0 <= self.keep_slice[0] < self.keep_slice[1] <= 1:
            raise ValueError(f"keep_slice must satisfy 0 <= from < to <= 1, got {list(self.keep_slice)}")
        return self

    def threshold_for(self, dataset: str) -> float:
        return self.threshold if self.threshold is not None else method_defaults(dataset).isft_threshold

    def slice_for(self, dataset: str) -> tuple[float, float]:
        return self.keep_slice if self.keep_slice is not None else method_defaults(dataset).isft_slice


class SamplingConfig(_Section):
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)


RECIPES: Registry[tuple[str, ...]] = Registry("pipeline.recipe")
"""Each recipe by name: the stages one iteration runs, in order (:data:`dits.pipeline.STAGES` names them)."""
RECIPES.add("isft", ("sft-data", "sft", "evaluate"))
RECIPES.add("idpo", ("search", "influence", "budget", "select", "dpo", "evaluate"))
RECIPES.add("isft-dpo", ("sft-data", "sft", "search", "influence", "budget", "select", "dpo", "evaluate"))


class PipelineConfig(_Section):
    """The loop of docs/design.md section 2: which stages, how many iterations, which selection strategies.

    Every method in ``methods`` starts from the same model and shares iteration 0's pool (sft-data, sft,
    search, pairs, influence); from its ``select`` stage on, each method trains and evaluates its own model.
    """

    recipe: Annotated[str, AfterValidator(RECIPES.check)] = "isft-dpo"
    iterations: int = Field(3, ge=1)
    methods: list[Strategy] = Field(
        default_factory=lambda: ["mix"], min_length=1, description="q is Optima, mix is DITS"
    )
    evaluate_base: bool = Field(True, description="also evaluate the untrained model on the test split")
    baselines: list[Literal["cot", "sc", "debate"]] = Field(
        default_factory=list, description="evaluation baselines run on the untrained model (sc: 5 samples)"
    )
    scaling: list[int] = Field(
        default_factory=list,
        description="K values of mas-sc (K conversations at T 0.5, majority vote) run on the untrained model "
        "and each method's final model: Optima's inference-scaling curve in the report",
    )

    @model_validator(mode="after")
    def _budget_has_a_match(self) -> PipelineConfig:
        if any(budget_matched(m) for m in self.methods) and not any(needs_scores(m) for m in self.methods):
            raise ValueError(
                "methods: q-budget matches the compute of a method that reads influence; add mix or influence"
            )
        return self


DATASET_KEYS: tuple[str, ...] = ("train.dpo.beta", "train.sft_from", "influence.beta")
"""The keys a run config fills when they are unset (or ``null``): ``train.dpo.beta`` and ``train.sft_from``
from the dataset's published defaults (:mod:`dits.tasks.defaults`), ``influence.beta`` from
``train.dpo.beta``. :meth:`RunConfig.to_yaml` writes a key it filled as ``null``, so the printed or recorded
config, loaded with another ``task.dataset`` (or another ``train.dpo.beta``), fills it again."""


def _plain_name(name: str) -> str:
    """``name`` names the run's directory under the runs root: one plain path component."""
    if (
        not name.strip()
        or name in (".", "..")
        or any(c in name for c in "/\\\0")
        or PurePosixPath(name).is_absolute()
        or PureWindowsPath(name).drive
    ):
        raise ValueError(
            f"{name!r} is not allowed; a plain name (the run's directory under the runs root): not empty, "
            "no path separator or drive, not '.' or '..'"
        )
    return name


class RunConfig(_Section):
    name: Annotated[str, AfterValidator(_plain_name)] = "run"
    seed: int = 0
    engine: EngineConfig = EngineConfig()
    task: TaskConfig = TaskConfig()
    protocol: ProtocolConfig = ProtocolConfig()
    reward: RewardConfig = RewardConfig()
    search: SearchConfig = SearchConfig()
    guide: GuideConfig = GuideConfig()
    rollout: SamplingConfig = SamplingConfig()
    pairs: PairConfig = PairConfig()
    sft_data: SftDataConfig = SftDataConfig()
    train: TrainConfig = TrainConfig()
    influence: InfluenceConfig = InfluenceConfig()
    select: SelectConfig = SelectConfig()
    pipeline: PipelineConfig = PipelineConfig()
    executor: ExecutorConfig = ExecutorConfig()

    _from_dataset: frozenset[str] = PrivateAttr(default_factory=frozenset)
    """The :data:`DATASET_KEYS` this config filled (the rest were set): written as ``null`` by ``to_yaml``."""

    @model_validator(mode="wrap")
    @classmethod
    def _dataset_defaults(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> RunConfig:
        """Fill the keys whose published value depends on the dataset and that no stage can resolve from an
        example (:data:`DATASET_KEYS`) and remember which were filled. A key the config sets is kept; a
        dataset without published defaults fails here when one of them is left out."""
        if not isinstance(data, dict):
            return handler(data)
        data, filled = _fill_dataset_defaults(data)
        cfg = handler(data)
        cfg._from_dataset = frozenset(filled)
        return cfg

    @model_validator(mode="after")
    def _finite(self) -> RunConfig:
        """No NaN or infinity anywhere, also where a section does not say ``allow_inf_nan=False``
        (``select``) and in ``task.knobs``: JSON (``config.yaml``'s numbers, stage inputs) holds neither, and
        no key reads infinity as "unbounded"."""
        bad = [f"{key}: must be a finite number, got {value!r}" for key, value in _leaves(self.model_dump())
               if isinstance(value, float) and not math.isfinite(value)]  # fmt: skip
        if bad:
            raise ValueError("\n  ".join(bad))
        return self

    @model_validator(mode="after")
    def _fits_the_recipe(self) -> RunConfig:
        """Every split the recipe reads has tasks and exists in the dataset: checked here, not by the stage
        that reads it after the stages before it ran."""
        problems = []
        splits = DATASETS[self.task.dataset].splits
        for split, why in needed_splits(self).items():
            if getattr(self.task, split) < 1:
                problems.append(f"task.{split}: must be >= 1 (got 0): {why}")
            if split not in splits:
                problems.append(f"task.dataset: {self.task.dataset!r} has no {split} split, but {why}")
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    @property
    def from_dataset(self) -> frozenset[str]:
        """The :data:`DATASET_KEYS` this config filled rather than set."""
        return self._from_dataset

    def to_yaml(self) -> str:
        """The config as YAML, every key spelled out except the :data:`DATASET_KEYS` it filled, which are
        ``null`` (a comment gives their values): loading the text gives this config back, and loading it
        with another dataset fills them with that dataset's values."""
        data = self.model_dump(mode="json")
        values = []
        for key in DATASET_KEYS:
            if key in self._from_dataset:
                *parents, leaf = key.split(".")
                node = data
                for part in parents:
                    node = node[part]
                values.append(f"{key}={node[leaf]}")
                node[leaf] = None
        header = ""
        if values:
            header = (
                "# null: filled when loaded (train.dpo.beta, train.sft_from: the dataset's published values; "
                f"influence.beta: train.dpo.beta)\n# here, for {self.task.dataset}: {', '.join(values)}\n"
            )
        return header + yaml.safe_dump(data, sort_keys=False)

    def sections(self, *names: str) -> dict[str, Any]:
        """The named sections as JSON data: what a stage's inputs record of the config."""
        data = self.model_dump(mode="json")
        return {n: data[n] for n in names}


def needed_splits(cfg: RunConfig) -> dict[str, str]:
    """``split -> what reads it``: the task splits a run of ``cfg`` reads (:mod:`dits.pipeline`)."""
    recipe, p = cfg.pipeline.recipe, cfg.pipeline
    stages = RECIPES[recipe]
    readers: dict[str, list[str]] = {split: [] for split in SPLITS}
    drawing = [s for s in ("sft-data", "search") if s in stages]
    if drawing:
        readers["train"].append(
            f"pipeline.recipe {recipe!r} ({', '.join(drawing)}: task.train per iteration)"
        )
    scored = [m for m in p.methods if needs_scores(m)]
    if "influence" in stages and "select" in stages and scored:
        readers["dev"].append(f"the influence stage (pipeline.methods {scored} read influence)")
    if "search" in stages and cfg.guide.lam != 0:
        readers["dev"].append("the influence-guided search (guide.lam != 0)")
    if "evaluate" in stages:
        readers["test"].append(f"pipeline.recipe {recipe!r} (evaluate)")
    for key, on in (("evaluate_base", p.evaluate_base), ("baselines", p.baselines), ("scaling", p.scaling)):
        if on:
            readers["test"].append(f"pipeline.{key}")
    return {s: f"the {s} split is read by {', '.join(r)}" for s, r in readers.items() if r}


def _fill_dataset_defaults(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``data`` with the unset :data:`DATASET_KEYS` filled, and those keys. A section that is not a mapping
    (``task: 5``) or a dataset that is not a name is left for the model to report, naming the key."""
    data = {k: _unset_as_dict(v) for k, v in data.items()}
    task, train, influence = (data.get(k) or {} for k in ("task", "train", "influence"))
    if not all(isinstance(s, dict) for s in (task, train, influence)):
        return data, []
    dpo = _unset_as_dict(train.get("dpo")) or {}
    dataset = task.get("dataset", TaskConfig.model_fields["dataset"].default)
    if not isinstance(dpo, dict) or not isinstance(dataset, str):
        return data, []
    train, dpo, influence = dict(train), dict(dpo), dict(influence)
    filled: list[str] = []
    if dpo.get("beta") is None or train.get("sft_from") is None:
        try:
            published = method_defaults(dataset)
        except KeyError as err:  # an unknown dataset: a config error naming the key
            raise ValueError(f"task.dataset: {err.args[0]}") from None
        if dpo.get("beta") is None:
            dpo["beta"] = published.dpo_beta
            filled.append("train.dpo.beta")
        if train.get("sft_from") is None:
            train["sft_from"] = published.sft_from
            filled.append("train.sft_from")
    if influence.get("beta") is None:
        influence["beta"] = dpo["beta"]
        filled.append("influence.beta")
    return {**data, "train": {**train, "dpo": dpo}, "influence": influence}, filled


def _unset_as_dict(value: Any) -> Any:
    """A section given as a model instance, as the dict of the keys it was given (so defaults stay unset)."""
    return value.model_dump(exclude_unset=True) if isinstance(value, BaseModel) else value


def _leaves(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted key, value)`` of every leaf of nested mappings and lists (list items by index)."""
    items = data.items() if isinstance(data, dict) else enumerate(data)
    out: list[tuple[str, Any]] = []
    for key, value in items:
        if isinstance(value, dict | list | tuple):
            out += _leaves(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif e["type"] == "literal_error":
            allowed = e.get("ctx", {}).get("expected", "")
            lines.append(f"  {key}: {e['input']!r} is not allowed; allowed values: {allowed}")
        elif not e["loc"]:  # a whole-config check: its message names the key
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
        elif e["type"] == "value_error":  # a field's own check: its message says what is allowed
            lines.append(f"  {key}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def parse_config(data: dict[str, Any], source: str = "<dict>") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["search.explore=2", "task.knobs={hops: 2}"]`` → ``{"search.explore": 2, ...}``; values are YAML."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE with a dotted key, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(
                f"--set {key.strip()}: {value!r} is not a YAML value ({_yaml_problem(err)})"
            ) from None
    return out


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error in one line, with its line and column when it has them (not ``<unicode string>``)."""
    mark = getattr(err, "problem_mark", None)
    problem = " ".join(str(getattr(err, "problem", None) or err).split())
    context = getattr(err, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}" + (f" ({context})" if context else "")


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` laid on ``base``: mappings merge key by key, anything else (lists included) replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_config_file(path: str | Path, *, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's mapping, with ``base: other.yaml`` (relative to the file) resolved: the base's keys,
    then this file's laid over them (sections merge key by key), so per-dataset files hold only what
    differs from a shared one. A missing or unreadable file or a YAML syntax error is a
    :class:`ConfigError` naming the file (and the line)."""
    p = Path(path)
    if p.resolve() in _seen:
        raise ConfigError(f"invalid config {p}: base files form a cycle ({' -> '.join(map(str, _seen))})")
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"no config file {p}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"invalid config {p}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"cannot read config {p}: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"invalid config {p}: YAML syntax error at {_yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {p}: the top level must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"invalid config {p}: base: a file name, got {base!r}")
    base_path = p.parent / base
    if not base_path.is_file():
        raise ConfigError(f"invalid config {p}: base: no file {base_path}")
    return _deep_merge(read_config_file(base_path, _seen=(*_seen, p.resolve())), data)


def load_config(
    path: str | Path | None,
    overrides: dict[str, Any] | None = None,
    *,
    defaults: dict[str, Any] | None = None,
) -> RunConfig:
    """Read YAML (:func:`read_config_file`, or start from ``defaults``, else the built-in defaults, when
    ``path`` is None), apply dotted ``overrides`` (``{"search.explore": 4}``), validate."""
    data: dict[str, Any] = copy.deepcopy(defaults) if defaults else {}
    source = "(defaults + overrides)" if overrides else "(defaults)"
    if path is not None:
        data, source = read_config_file(path), f"{path} + overrides" if overrides else str(path)
    for key, value in overrides.items() if overrides else ():
        *parents, leaf = key.split(".")
        if not all(part.strip() for part in key.split(".")):
            raise ConfigError(f"invalid config {source}: {key!r} is not a dotted key such as search.explore")
        node = data
        for depth, part in enumerate(parents):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif isinstance(child, BaseModel):
                child = node[part] = child.model_dump(exclude_unset=True)
            if not isinstance(child, dict):
                section = ".".join(parents[: depth + 1])
                raise ConfigError(
                    f"invalid config {source}: {key}: {section} is {child!r}, not a section with keys"
                )
            node = child
        node[leaf] = value
    return parse_config(data, source)
