"""The typed run configuration: one YAML file, validated with messages that name the bad key.

Each stage reads only its own section; sections are small pydantic models so a typo ("explor: 8") or a
bad value ("backend: tpu") fails at load time with the dotted key and the allowed values.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

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
from dits.tasks.loaders import DATASETS, method_defaults
from dits.train.config import TrainConfig


class ConfigError(ValueError):
    """A config that does not validate; the message lists every bad key with what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class RunConfig(_Section):
    name: str = "run"
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

    @model_validator(mode="before")
    @classmethod
    def _dataset_defaults(cls, data: Any) -> Any:
        """Fill the keys whose published value depends on the dataset and that no stage can resolve from an
        example (:mod:`dits.tasks.defaults`): ``train.dpo.beta``, ``train.sft_from`` and ``influence.beta``
        (the DPO β unless set). A key the config sets is kept; a dataset without published defaults
        fails here when one of them is left out."""
        if not isinstance(data, dict):
            return data
        data = {k: _unset_as_dict(v) for k, v in data.items()}
        task = data.get("task") or {}
        dataset = task.get("dataset", TaskConfig.model_fields["dataset"].default)
        train = dict(data.get("train") or {})
        dpo = dict(train.get("dpo") or {})
        influence = dict(data.get("influence") or {})
        if "beta" not in dpo or "sft_from" not in train:
            try:
                published = method_defaults(dataset)
            except KeyError as err:  # an unknown dataset: a config error naming the key
                raise ValueError(f"task.dataset: {err.args[0]}") from None
            dpo.setdefault("beta", published.dpo_beta)
            train.setdefault("sft_from", published.sft_from)
        influence.setdefault("beta", dpo["beta"])
        return {**data, "train": {**train, "dpo": dpo}, "influence": influence}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def sections(self, *names: str) -> dict[str, Any]:
        """The named sections as JSON data: what a stage's inputs record of the config."""
        data = self.model_dump(mode="json")
        return {n: data[n] for n in names}


def _unset_as_dict(value: Any) -> Any:
    """A section given as a model instance, as the dict of the keys it was given (so defaults stay unset)."""
    return value.model_dump(exclude_unset=True) if isinstance(value, BaseModel) else value


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
            raise ValueError(f"--set expects KEY=VALUE with a dotted key, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


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
    differs from a shared one."""
    p = Path(path)
    if p.resolve() in _seen:
        raise ConfigError(f"invalid config {p}: base files form a cycle ({' -> '.join(map(str, _seen))})")
    data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
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
    source = "(defaults + overrides)"
    if path is not None:
        data, source = read_config_file(path), str(path)
    for key, value in (overrides or {}).items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return parse_config(data, source)
