"""The typed run configuration: one YAML file, validated with messages that name the bad key.

Each stage reads only its own section; sections are small pydantic models so a typo ("explor: 8") or a
bad value ("backend: tpu") fails at load time with the dotted key and the allowed values.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dits.influence.base import InfluenceConfig
from dits.mas.protocol import ProtocolConfig
from dits.reward import RewardConfig
from dits.search.guided import GuideConfig
from dits.search.mcts import SearchConfig
from dits.search.pairs import PairConfig
from dits.select import SelectConfig, Strategy
from dits.sft_data import SftDataConfig
from dits.train.config import TrainConfig


class ConfigError(ValueError):
    """A config that does not validate; the message lists every bad key with what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineConfig(_Section):
    backend: Literal["hf", "vllm"] = "hf"
    model: str = "smollm2-135m"
    device: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    token_budget: int = Field(32768, ge=256)
    max_batch: int = Field(64, ge=1)
    trust_remote_code: bool = False


class TaskConfig(_Section):
    """Which dataset and how many tasks of each split. ``path`` is a local file/dir in the original format."""

    dataset: str = "facts"
    path: str | None = None
    seed: int = 0
    train: int = Field(32, ge=0)
    dev: int = Field(16, ge=0, description="validation tasks (influence); disjoint from train and test")
    test: int = Field(32, ge=0)
    knobs: dict[str, Any] = Field(default_factory=dict, description="difficulty knobs of built-in tasks")


class SamplingConfig(_Section):
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)


class PipelineConfig(_Section):
    """The loop of DESIGN.md section 2: which stages, how many iterations, which selection strategies.

    Every method in ``methods`` starts from the same model and shares iteration 0's pool (sft-data, sft,
    search, pairs, influence); from its ``select`` stage on, each method trains and evaluates its own model.
    """

    recipe: Literal["isft", "idpo", "isft-dpo"] = "isft-dpo"
    iterations: int = Field(3, ge=1)
    methods: list[Strategy] = Field(
        default_factory=lambda: ["mix"], min_length=1, description="q is Optima, mix is DITS"
    )
    evaluate_base: bool = Field(True, description="also evaluate the untrained model on the test split")


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

    def digest(self, *sections: str) -> str:
        """A short hash of the named sections (all if none): what decides whether an artifact is stale."""
        data = self.model_dump(mode="json")
        if sections:
            data = {k: data[k] for k in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        elif e["type"] == "literal_error":
            allowed = e.get("ctx", {}).get("expected", "")
            lines.append(f"  {key}: {e['input']!r} is not allowed; allowed values: {allowed}")
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


def load_config(
    path: str | Path | None,
    overrides: dict[str, Any] | None = None,
    *,
    defaults: dict[str, Any] | None = None,
) -> RunConfig:
    """Read YAML (or start from ``defaults``, else the built-in defaults, when ``path`` is None), apply
    dotted ``overrides`` (``{"search.explore": 4}``), validate."""
    data: dict[str, Any] = copy.deepcopy(defaults) if defaults else {}
    source = "(defaults + overrides)"
    if path is not None:
        p = Path(path)
        data = yaml.safe_load(p.read_text()) or {}
        source = str(p)
        if not isinstance(data, dict):
            raise ConfigError(
                f"invalid config {p}: the top level must be a mapping, got {type(data).__name__}"
            )
    for key, value in (overrides or {}).items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return parse_config(data, source)


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
