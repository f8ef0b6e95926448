"""The run config refuses what it cannot run, naming the key, and records what it filled (issue: nothing lost
or silently changed).

Each test fails on the earlier behaviour: a printed config that kept the old dataset's β and sft_from when
``task.dataset`` changed, NaN and infinity accepted, any string as the run's directory name, ``task.dev=0``
refused only after sft-data, sft and search ran (``task.test=0`` after the model loaded), an
AttributeError/TypeError for a section that is not a mapping, and ``<unicode string>`` for a YAML error.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from pydantic import BaseModel

from dits.config import DATASET_KEYS, RECIPES, ConfigError, RunConfig, load_config, parse_overrides
from dits.pipeline import DEMO, Pipeline, demo_config
from dits.tasks.loaders import DATASETS, DatasetSpec, method_defaults


def _refused(overrides: dict[str, Any], *fragments: str, defaults: dict[str, Any] | None = None) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides, defaults=defaults)
    message = str(err.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


# -- messages name the dotted key and what is allowed ------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        ({"search.explor": 8}, ["search.explor: unknown key"]),
        ({"engine.backend": "tpu"}, ["engine.backend: 'tpu' is not allowed; allowed values: 'hf'"]),
        ({"protocol.max_turns": 0}, ["protocol.max_turns: Input should be greater than or equal to 1"]),
        ({"pairs.keep_top_fraction": -1}, ["pairs.keep_top_fraction: Input should be greater than 0"]),
        ({"task": 5}, ["task: Input should be a valid dictionary"]),
        ({"train": [1]}, ["train: Input should be a valid dictionary"]),
        ({"train.dpo": 3}, ["train.dpo: Input should be a valid dictionary"]),
        ({"task.dataset": 5}, ["task.dataset: Input should be a valid string"]),
        ({"task.dataset": "nosuch"}, ["task.dataset: unknown task.dataset 'nosuch'; known: hotpotqa, 2wiki"]),
        ({"pipeline.recipe": "nope"}, ["pipeline.recipe: 'nope' is not allowed; allowed values: 'isft'"]),
    ],
)
def test_a_bad_value_names_its_key_and_what_is_allowed(overrides, fragments):
    _refused(overrides, "invalid config (defaults + overrides):", *fragments)


def test_a_dotted_key_through_a_value_names_the_key():
    """``--set search.explore.deep=1`` was a TypeError/AttributeError (``int.setdefault``)."""
    _refused(
        {"search.explore.deep": 1}, "search.explore.deep: search.explore is 2, not a section", defaults=DEMO
    )
    _refused({"name.x": 1}, "name.x: name is 'demo', not a section", defaults=DEMO)
    _refused({"search..explore": 1}, "'search..explore' is not a dotted key")


def test_overrides_and_files_fail_as_config_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="--set expects KEY=VALUE"):
        parse_overrides(["search.explore"])
    with pytest.raises(ConfigError, match=r"--set task.knobs: '\{hops: 2' is not a YAML value \(line 1"):
        parse_overrides(["task.knobs={hops: 2"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntask:\n  dataset: facts\n   train: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert f"invalid config {bad}: YAML syntax error at line 4, column 9" in str(err.value)
    assert "<unicode string>" not in str(err.value)
    with pytest.raises(ConfigError, match=f"no config file {re.escape(str(tmp_path / 'nope.yaml'))}"):
        load_config(tmp_path / "nope.yaml")
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("task: 5\n")
    with pytest.raises(
        ConfigError, match=f"invalid config {re.escape(str(scalar))}:\n  task: Input should be"
    ):
        load_config(scalar)
    with pytest.raises(
        ConfigError, match=rf"{re.escape(str(scalar))} \+ overrides: task.train: task is 5, not a section"
    ):
        load_config(scalar, {"task.train": 3})


# -- the dataset's defaults: recorded as unset, so another dataset fills them again -------------------------


def _printed_demo(capsys, *argv: str) -> str:
    from dits.cli import main

    assert main(["demo", "--print-config", *argv]) == 0
    return capsys.readouterr().out


def _load_text(text: str, tmp_path: Path) -> RunConfig:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return load_config(path)


def test_a_printed_config_with_another_dataset_takes_that_datasets_values(capsys, tmp_path: Path):
    facts, arith = method_defaults("facts"), method_defaults("arith")
    assert (facts.dpo_beta, facts.sft_from) != (arith.dpo_beta, arith.sft_from)  # else the test shows nothing
    text = _printed_demo(capsys)
    assert _load_text(text, tmp_path) == demo_config()  # the printed config is the config
    changed = _load_text(text.replace("dataset: facts", "dataset: arith"), tmp_path)
    assert changed.task.dataset == "arith"
    assert (changed.train.dpo.beta, changed.train.sft_from) == (arith.dpo_beta, arith.sft_from)
    assert changed.influence.beta == arith.dpo_beta
    assert changed.from_dataset == set(DATASET_KEYS)


def test_the_record_says_which_keys_were_filled(capsys, tmp_path: Path):
    text = _printed_demo(capsys)
    data = yaml.safe_load(text)
    assert (data["train"]["dpo"]["beta"], data["train"]["sft_from"], data["influence"]["beta"]) == (None,) * 3
    assert "train.dpo.beta=0.1, train.sft_from=previous, influence.beta=0.1" in text  # the comment says
    # The effective values are unchanged: the model and what stages record of it hold the numbers.
    cfg = demo_config()
    assert (cfg.train.dpo.beta, cfg.train.sft_from, cfg.influence.beta) == (0.1, "previous", 0.1)
    assert cfg.sections("train", "influence")["train"]["dpo"]["beta"] == 0.1
    assert cfg.model_dump()["influence"]["beta"] == 0.1


def test_a_key_set_by_hand_is_kept_and_influence_beta_follows_it(capsys, tmp_path: Path):
    text = _printed_demo(capsys, "--set", "train.dpo.beta=0.3", "--set", "train.sft_from=initial")
    data = yaml.safe_load(text)
    assert (data["train"]["dpo"]["beta"], data["train"]["sft_from"], data["influence"]["beta"]) == (
        0.3, "initial", None
    )  # fmt: skip
    cfg = _load_text(
        text.replace("dataset: facts", "dataset: arith").replace("beta: 0.3", "beta: 0.2"), tmp_path
    )
    assert (cfg.train.dpo.beta, cfg.train.sft_from, cfg.influence.beta) == (0.2, "initial", 0.2)
    assert cfg.from_dataset == {"influence.beta"}
    # influence.beta set apart from train.dpo.beta is recorded as set
    cfg = load_config(None, {"influence.beta": 0.4, "task.dataset": "gsm8k"})
    assert yaml.safe_load(cfg.to_yaml())["influence"]["beta"] == 0.4
    assert load_config(None, None, defaults=yaml.safe_load(cfg.to_yaml())) == cfg


def test_null_means_the_datasets_value():
    cfg = load_config(None, {"task.dataset": "gsm8k", "train.dpo.beta": None, "train.sft_from": None})
    assert (cfg.train.dpo.beta, cfg.train.sft_from) == (0.5, "initial")


# -- finite numbers ---------------------------------------------------------------------------------------


def _float_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    out: list[str] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _float_keys(ann, f"{prefix}{name}.")
        elif ann is float or float in get_args(ann):
            out.append(f"{prefix}{name}")
    return out


FLOAT_KEYS = _float_keys(RunConfig)


def test_every_float_key_is_found():
    assert {"reward.lambda_tok", "rollout.temperature", "train.dpo.lr", "select.weight", "guide.lam"} <= set(
        FLOAT_KEYS
    )


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_no_float_key_takes_nan_or_infinity(key: str, value: float):
    """Refused naming the key, as not finite; a bounded key of ``select`` (whose section is checked by the run
    config's walk over every number, not by ``allow_inf_nan=False``) may be refused as out of its bounds."""
    message = _refused({key: value}, f"\n  {key}: ")
    assert "finite number" in message or (key.startswith("select.") and "should be" in message), message


@pytest.mark.parametrize("item", ["reward.lambda_tok=.nan", "rollout.temperature=.inf", "train.dpo.lr=.inf"])
def test_the_reported_cases_as_set(item: str):
    key = item.partition("=")[0]
    _refused(parse_overrides([item]), f"{key}: Input should be a finite number")


def test_knobs_are_finite_too():
    _refused({"task.knobs": {"hops": math.nan}}, "task.knobs.hops: must be a finite number, got nan")


# -- the run's name --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "  ", ".", "..", "a/b", "../up", "/abs", "a\\b", "C:run"])
def test_name_must_be_a_plain_name(name: str):
    _refused({"name": name}, f"name: {name!r} is not allowed; a plain name")


@pytest.mark.parametrize("name", ["run", "paper-gsm8k", "demo.v2", "run_1"])
def test_plain_names_pass(name: str):
    assert load_config(None, {"name": name}).name == name


# -- what the recipe reads, checked before any work -------------------------------------------------------


def test_a_split_the_recipe_reads_must_hold_tasks():
    _refused({"task.dev": 0}, "task.dev: must be >= 1 (got 0): the dev split is read by the influence stage")
    _refused({"task.test": 0}, "task.test: must be >= 1 (got 0): the test split is read by pipeline.recipe")
    _refused(
        {"task.train": 0}, "task.train: must be >= 1 (got 0): the train split is read by pipeline.recipe"
    )
    # with dev=0 and test=0 both are named
    _refused({"task.dev": 0, "task.test": 0}, "task.dev: must be", "task.test: must be")


def test_dev_is_needed_only_when_influence_is_read():
    assert load_config(None, {"task.dev": 0, "pipeline.methods": ["q"]}).task.dev == 0
    assert load_config(None, {"task.dev": 0, "pipeline.recipe": "isft"}).task.dev == 0
    _refused(
        {"task.dev": 0, "pipeline.methods": ["q"], "guide.lam": 0.5}, "influence-guided search (guide.lam"
    )


def test_a_dataset_without_a_split_the_recipe_reads_is_refused():
    spec = DATASETS["facts"]
    DATASETS.add("nodev", DatasetSpec("nodev", "exchange", "f1", files={"train": ("t",), "test": ("x",)},
                                      defaults=spec.defaults))  # fmt: skip
    try:
        _refused(
            {"task.dataset": "nodev"}, "task.dataset: 'nodev' has no dev split, but the dev split is read"
        )
        assert load_config(None, {"task.dataset": "nodev", "pipeline.methods": ["q"]}).task.dataset == "nodev"
    finally:
        DATASETS.remove("nodev")


def test_the_pipeline_checks_before_it_writes_anything(tmp_path: Path):
    """A recipe naming a stage that does not exist was refused after the base model was evaluated."""
    RECIPES.add("bogus", ("search", "nosuch", "evaluate"))
    try:
        cfg = load_config(None, {"pipeline.recipe": "bogus"}, defaults=DEMO)
        with pytest.raises(
            ValueError, match=r"pipeline.recipe 'bogus' names stages that do not exist: \['nosuch'\]"
        ):
            Pipeline(cfg, tmp_path, progress=False).run()
    finally:
        RECIPES.remove("bogus")
    assert [p.name for p in (tmp_path / "demo").iterdir()] == [".lock"]  # no config.yaml, no stage
