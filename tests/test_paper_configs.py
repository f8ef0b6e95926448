"""The paper configs (configs/paper/<dataset>.yaml) hold the published hyperparameters.

The expected numbers are copied here from docs/design.md (sections 5, 6, 7, 7b), not read from the library's
defaults, so a wrong number in a YAML file (or a file that silently relies on a default that drifted)
fails.

Each per-dataset file lays its own keys over ``configs/paper/_base.yaml`` (``base: _base.yaml``). The files
were one complete file per dataset until that split; ``tests/fixtures/paper_configs/<dataset>.json`` holds
each config as it resolved at commit baf7fcd, the last commit with the complete files, so the split is
shown to change no resolved value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from dits.config import ConfigError, RunConfig, load_config
from dits.tasks.loaders import DATASETS, default_data_root

PAPER_DIR = Path(__file__).resolve().parents[1] / "configs" / "paper"
BASE = PAPER_DIR / "_base.yaml"
"""The shared part: not a paper config (``_``-prefixed, no dataset), only a base for the per-dataset files."""
RECORDED = Path(__file__).resolve().parent / "fixtures" / "paper_configs"

# dataset -> (mode, lambda_tok, lambda_read, pair tau, SFT lr, iSFT threshold, DPO beta); docs/design.md
# sections 5, 6, 7b and the references' per-dataset values (Optima: tau, threshold; the DITS recipes: beta).
PAPER: dict[str, tuple[str, float, float, float, float, float, float]] = {
    "hotpotqa": ("exchange", -0.6, 1.0, 0.4, 2e-5, 0.5, 0.1),
    "2wiki": ("exchange", -0.6, 1.0, 0.4, 2e-5, 0.5, 0.5),
    "triviaqa": ("exchange", -0.6, 1.0, 0.43, 2e-5, 0.6, 0.7),
    "cbt": ("exchange", -0.6, 1.0, 0.4, 2e-5, 0.5, 0.7),
    "gsm8k": ("debate", -0.4, 0.9, 0.45, 1e-6, 0.6, 0.5),
    "math": ("debate", -0.4, 0.9, 0.45, 1e-6, 0.6, 0.1),
    "arc": ("debate", -0.5, 0.6, 0.45, 1e-6, 0.6, 0.1),
    "mmlu": ("debate", -0.6, 0.7, 0.45, 1e-6, 0.7, 0.1),
}


def _load(name: str) -> RunConfig:
    return load_config(PAPER_DIR / f"{name}.yaml")


def test_one_file_per_paper_dataset_and_no_other():
    files = sorted(p.stem for p in PAPER_DIR.glob("*.yaml"))
    assert [f for f in files if not f.startswith("_")] == sorted(PAPER)
    assert [f for f in files if f.startswith("_")] == [BASE.stem]


@pytest.mark.parametrize("name", sorted(PAPER))
def test_resolved_config_is_the_recorded_one(name: str):
    """Every resolved value (the file, its base and the library defaults) is the one recorded from the
    complete file at baf7fcd. Nothing in the dump depends on the machine: ``engine.dtype`` is spelled out
    (``bfloat16``, not ``auto``) and ``engine.device`` / ``executor.threads`` stay unset, so no
    normalising is needed. A deliberate change of a paper number or of a library default the paper
    configs rely on shows here: rewrite the fixture in the same commit and say why."""
    got = _load(name).model_dump(mode="json")
    assert got == json.loads((RECORDED / f"{name}.json").read_text(encoding="utf-8"))


def test_base_is_not_a_runnable_config():
    """``dits run configs/paper/_base.yaml`` fails naming the missing dataset instead of running the
    embedded default dataset with the paper's model."""
    with pytest.raises(ConfigError, match=r"task\.dataset"):
        load_config(BASE)


def _leaves(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of a YAML mapping (lists are values)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_per_dataset_files_hold_only_their_own_keys():
    """A per-dataset file restates nothing of the base, and what all of them set alike belongs in the base:
    no key/value pair (``base:`` aside) is the same in all eight files."""
    base = _leaves(yaml.safe_load(BASE.read_text(encoding="utf-8")))
    own: dict[str, dict[str, Any]] = {}
    for name in sorted(PAPER):
        data = yaml.safe_load((PAPER_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
        assert data.pop("base") == BASE.name
        own[name] = _leaves(data)
        restated = {k: v for k, v in own[name].items() if k in base and base[k] == v}
        assert not restated, f"{name}.yaml restates the base: {restated}"
    first, *rest = own.values()
    shared = {k: v for k, v in first.items() if all(k in o and o[k] == v for o in rest)}
    assert not shared, f"set alike in every per-dataset file (move them to {BASE.name}): {shared}"


@pytest.mark.parametrize("path", sorted(PAPER_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_comments_name_no_data_folder_outside_the_users(path: Path):
    """The data root is $DITS_DATA, else data/ in the working directory, else the hub: nothing else."""
    assert "../shared" not in path.read_text(encoding="utf-8")


@pytest.mark.parametrize("name", sorted(PAPER))
def test_dataset_specific_numbers(name: str):
    mode, lambda_tok, lambda_read, tau, sft_lr, threshold, beta = PAPER[name]
    cfg = _load(name)
    assert cfg.task.dataset == name
    assert DATASETS[name].mode == mode  # the loader plays the dataset in the mode the table assumes
    assert (cfg.reward.lambda_tok, cfg.reward.lambda_read) == (lambda_tok, lambda_read)
    assert cfg.pairs.tau_for(name) == tau
    assert cfg.train.sft.lr == sft_lr
    assert cfg.sft_data.threshold_for(name) == threshold
    assert cfg.sft_data.slice_for(name) == ((0.1, 0.8) if name == "math" else (0.0, 0.7))
    assert cfg.train.dpo.beta == cfg.influence.beta == beta
    assert cfg.train.sft_from == "initial"  # DITS: iSFT always from the initial model


@pytest.mark.parametrize("name", sorted(PAPER))
def test_library_defaults_are_the_published_numbers(name: str):
    """A config that names only the dataset gets the same per-dataset numbers the paper config spells out."""
    _, lambda_tok, lambda_read, tau, _, threshold, beta = PAPER[name]
    cfg = load_config(None, {"task.dataset": name})
    from dits.reward import weights_for
    from dits.tasks.example import Example

    ex = Example(id="e", dataset=name, split="test", question="q", answers=["a"], contexts=["", ""],
                 mode=PAPER[name][0], metric="f1")  # fmt: skip
    assert weights_for(ex, cfg.reward) == (lambda_tok, lambda_read)
    assert cfg.pairs.tau_for(name) == tau
    assert cfg.sft_data.threshold_for(name) == threshold
    assert cfg.train.dpo.beta == cfg.influence.beta == beta
    # Optima's choice of SFT start: the previous model for information exchange, the initial one for debate.
    assert cfg.train.sft_from == ("previous" if PAPER[name][0] == "exchange" else "initial")


@pytest.mark.parametrize("name", sorted(PAPER))
def test_shared_reference_numbers(name: str):
    cfg = _load(name)
    assert cfg.name == f"paper-{name}"
    e = cfg.engine
    assert (e.backend, e.model, e.dtype) == ("vllm", "meta-llama/Meta-Llama-3-8B-Instruct", "bfloat16")
    assert cfg.protocol.max_turns == 10
    assert cfg.rollout.temperature == 0.7
    s = cfg.search
    assert (s.explore, s.expand, s.select_dist, s.merge_dist, s.top_k, s.policy) == (
        8, 3, 0.25, 0.1, 10, "reference"
    )  # fmt: skip
    assert (cfg.pairs.min_gap, cfg.pairs.keep_top_fraction) == (0.2, 0.5)
    sft = cfg.sft_data
    assert (sft.n_samples, sft.temperature, sft.token_norm) == (10, 0.7, "task_max")

    t = cfg.train
    assert t.full_finetune
    assert 1 <= t.sft.epochs <= 3 and t.sft.max_length == 2048
    assert (t.dpo.lr, t.dpo.epochs, t.dpo.max_length) == (5e-7, 1, 2048)
    assert t.dpo.batch_size * t.dpo.grad_accum == 64
    assert 0.1 <= t.dpo.beta <= 0.7

    i = cfg.influence
    assert (i.estimator, i.chunk_size, i.val_tasks, i.lr, i.optimizer) == ("rollout", 5, 20, 5e-5, "adamw")
    assert i.beta == t.dpo.beta  # the probe takes the step the training takes
    assert cfg.task.dev >= i.val_tasks  # influence draws V validation tasks from the dev split

    sel = cfg.select
    assert (sel.strategy, sel.ratio, sel.weight) == ("mix", 0.5, 1.0)
    p = cfg.pipeline
    assert (p.recipe, p.iterations, p.methods) == ("isft-dpo", 3, ["mix"])


@pytest.mark.parametrize("name", sorted(PAPER))
def test_train_section_is_the_library_reference(name: str):
    """Apart from beta (per dataset), the train section is ``TrainConfig.reference`` for the mode, with
    iSFT from the initial model (DITS)."""
    from dits.train.config import TrainConfig

    cfg = _load(name)
    ref = TrainConfig.reference(PAPER[name][0], sft_from="initial")  # type: ignore[arg-type]
    got = cfg.train.model_dump()
    want = ref.model_dump()
    got["dpo"].pop("beta"), want["dpo"].pop("beta")
    assert got == want


@pytest.mark.parametrize("name", sorted(PAPER))
def test_header_names_the_command(name: str):
    text = (PAPER_DIR / f"{name}.yaml").read_text()
    header = text.split("\n\n", 1)[0]
    assert header.startswith("# Paper reproduction:")
    assert f"dits run configs/paper/{name}.yaml" in header


@pytest.mark.parametrize("name", sorted(n for n, spec in DATASETS.items() if n in PAPER and spec.directory))
def test_three_iterations_fit_the_local_train_split(name: str):
    """Iteration i takes task.train iSFT tasks and task.train search tasks of the train split, so the split
    must hold 2 x train x iterations tasks."""
    from dits.pipeline import tasks_per_iteration
    from dits.tasks.source import examples_for

    if not (default_data_root() / DATASETS[name].directory).is_dir():
        pytest.skip(f"no local {name} data (read from the hub)")
    cfg = _load(name)
    need = tasks_per_iteration(cfg) * cfg.pipeline.iterations
    assert need == 2 * cfg.task.train * cfg.pipeline.iterations
    assert len(examples_for(cfg.task, "train", limit=need)) == need
    assert len(examples_for(cfg.task, "dev")) == cfg.task.dev
