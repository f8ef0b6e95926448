"""One entry point for every dataset: :func:`load_examples`, and the registry :data:`DATASETS`.

Real datasets are read from local files in their original formats (``$DITS_DATA``, else ``data/`` in the
working directory); where no local copy exists and ``path`` was not given, the Hugging Face hub
is tried with the names the reference code used. Built-in tasks (``facts``, ``arith``) are generated.

Splits are ``train``, ``dev`` (alias ``validation``/``val``) and ``test``. For MMLU, ``dev`` is the
dev-like ``val/`` folder; the original 5-shot ``dev/`` folder is the split ``fewshot``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dits.registry import Registry
from dits.tasks.builtin import BUILTIN_DATASETS
from dits.tasks.choice import MmluRow, arc_example, mmlu_example, read_mmlu_csv
from dits.tasks.defaults import MethodDefaults, defaults_table
from dits.tasks.example import Example, MetricName, Mode, canonical_split
from dits.tasks.files import DatasetFormatError, RecordError, SplitTooShortError, iter_json_array, iter_jsonl
from dits.tasks.math_data import gsm8k_example, iter_math_dir, math_example
from dits.tasks.qa import CbtStory, cbt_example, multihop_example, read_cbt, triviaqa_example

logger = logging.getLogger(__name__)

Item = tuple[str, str, Any]
"""A raw record with its location: (file or hub source, record label, raw record)."""

Maker = Callable[[Any, str, int, Path | None], Example | None]
"""Raw record, split, seed, the located file (``None`` for the hub) -> example (``None``: skip it)."""


# --------------------------------------------------------------------------------------------- locations


def default_data_root() -> Path:
    """Where local dataset files live: ``$DITS_DATA``, else ``data/`` in the working directory.

    Neither need exist: a dataset whose files are not found there is loaded from the Hugging Face hub.
    """
    env = os.environ.get("DITS_DATA")
    return Path(env).expanduser() if env else Path.cwd() / "data"


def default_heldout_root() -> Path:
    """Test-like subsets: ``$DITS_HELDOUT_DATA``, else ``heldout/`` inside the data root."""
    env = os.environ.get("DITS_HELDOUT_DATA")
    return Path(env).expanduser() if env else default_data_root() / "heldout"


# -------------------------------------------------------------------------------------------------- hub


@dataclass(frozen=True)
class HubSplit:
    """A split read from the hub: ``split`` (slicing allowed), keeping rows ``i % stride == offset``
    (or the other rows when ``complement``), to carve disjoint dev/test halves where the hub has one."""

    split: str
    stride: int = 1
    offset: int = 0
    complement: bool = False

    def keeps(self, index: int) -> bool:
        return (index % self.stride == self.offset) != self.complement


@dataclass(frozen=True)
class HubSource:
    """Where a dataset lives on the hub and how its rows become the original file records."""

    path: str
    config: str | None
    splits: Mapping[str, HubSplit]
    convert: Callable[[Mapping[str, Any]], Any]


def _columns(value: Any, *keys: str) -> list[list[Any]]:
    """Hub layouts store lists of pairs as a dict of columns; turn either layout into row lists."""
    if isinstance(value, Mapping):
        present = [key for key in keys if key in value]
        if len(present) != len(keys):
            raise RecordError(f"expected columns {list(keys)}, got {sorted(value)}")
        return [list(row) for row in zip(*(value[key] for key in keys), strict=True)]
    return [list(row) for row in value]


def _hub_multihop(row: Mapping[str, Any]) -> dict[str, Any]:
    context = row["context"]
    sentences_key = "sentences" if not isinstance(context, Mapping) or "sentences" in context else "content"
    return {
        "_id": row.get("_id") or row.get("id"),
        "question": row["question"],
        "answer": row["answer"],
        "type": row.get("type"),
        "supporting_facts": _columns(row["supporting_facts"], "title", "sent_id"),
        "context": _columns(context, "title", sentences_key),
    }


def _hub_triviaqa(row: Mapping[str, Any]) -> dict[str, Any]:
    answer = row["answer"]
    results = _columns(row.get("search_results") or {"title": [], "description": []}, "title", "description")
    pages = _columns(
        row.get("entity_pages") or {"title": [], "filename": [], "wiki_context": []},
        "title",
        "filename",
        "wiki_context",
    )
    return {
        "QuestionId": row["question_id"],
        "Question": row["question"],
        "Answer": {
            "Value": answer["value"],
            "Aliases": list(answer.get("aliases") or []),
            "NormalizedAliases": list(answer.get("normalized_aliases") or []),
        },
        "SearchResults": [{"Title": title, "Description": text} for title, text in results],
        "EntityPages": [
            {"Title": title, "Filename": filename, "WikiContext": text} for title, filename, text in pages
        ],
    }


def _hub_cbt(row: Mapping[str, Any]) -> CbtStory:
    return CbtStory(tuple(row["sentences"]), row["question"], row["answer"], tuple(row["options"]))


def _hub_arc(row: Mapping[str, Any]) -> dict[str, Any]:
    choices = _columns(row["choices"], "text", "label")
    return {
        "id": row["id"],
        "question": {"stem": row["question"], "choices": [{"text": t, "label": lab} for t, lab in choices]},
        "answerKey": row["answerKey"],
    }


def _hub_mmlu(row: Mapping[str, Any]) -> MmluRow:
    options = list(row["choices"])
    if len(options) != 4 or not isinstance(row["answer"], int) or not 0 <= row["answer"] < 4:
        raise RecordError("expected 4 choices and an answer index 0..3")
    return MmluRow(
        row["subject"],
        row["question"],
        (options[0], options[1], options[2], options[3]),
        "ABCD"[row["answer"]],
    )


def _identity(row: Mapping[str, Any]) -> Mapping[str, Any]:
    return row


_HALVES = {"dev": HubSplit("validation", 2, 0), "test": HubSplit("validation", 2, 1)}


# ------------------------------------------------------------------------------------------------ specs


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: how it is played and scored, where its files are, how they are read."""

    name: str
    mode: Mode
    metric: MetricName
    directory: str = ""
    """Folder under the data root (empty for built-in tasks)."""
    files: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Per split, candidate paths (relative to the dataset folder) in order of preference."""
    read: Callable[[Path], Iterator[Item]] | None = None
    make: Maker | None = None
    hub: HubSource | None = None
    builtin: bool = False
    split_dir_glob: str = ""
    """For folder-per-split datasets: what a split folder holds, so ``path`` may name that folder."""
    defaults: MethodDefaults | None = None
    """The published hyperparameters a config key left at ``None`` takes (:mod:`dits.tasks.defaults`)."""

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.files) if self.files else ("train", "dev", "test")


def _read_json_array(path: Path) -> Iterator[Item]:
    for label, record in iter_json_array(path):
        yield str(path), label, record


def _read_triviaqa(path: Path) -> Iterator[Item]:
    for label, record in iter_json_array(path, key="Data"):
        yield str(path), label, record


def _read_jsonl(path: Path) -> Iterator[Item]:
    for label, record in iter_jsonl(path):
        yield str(path), label, record


def _read_cbt(path: Path) -> Iterator[Item]:
    for index, (label, story) in enumerate(read_cbt(path)):
        yield str(path), label, (f"{path.stem}:{index}", story)


def _read_math(path: Path) -> Iterator[Item]:
    for file, label, record in iter_math_dir(path):
        yield str(file), label, record


def _read_mmlu(path: Path) -> Iterator[Item]:
    files = [path] if path.is_file() else sorted(path.glob("*.csv"))
    if not files:
        raise DatasetFormatError(path, "top level", "no rows (no <subject>_<split>.csv files)")
    for file in files:
        for label, row in read_mmlu_csv(file):
            yield str(file), label, row


def _evidence_root(question_file: Path) -> Path:
    """The rc release keeps ``qa/<file>.json`` next to ``evidence/``."""
    base = question_file.parent.parent if question_file.parent.name == "qa" else question_file.parent
    return base / "evidence"


def _cbt_make(dataset: str) -> Maker:
    def make(raw: tuple[str, CbtStory], split: str, seed: int, source: Path | None) -> Example:
        example_id, story = raw
        return cbt_example(story, example_id, split, dataset)

    return make


def _mh(dataset: str) -> Maker:
    return lambda record, split, seed, source: multihop_example(record, dataset, split, seed)


def _triviaqa_make(record: Any, split: str, seed: int, source: Path | None) -> Example | None:
    return triviaqa_example(record, split, seed, _evidence_root(source) if source else None)


def _cbt_files(kind: str) -> dict[str, tuple[str, ...]]:
    return {
        "train": (f"cbtest_{kind}_train.txt",),
        "dev": (f"cbtest_{kind}_valid_2000ex.txt", f"cbtest_{kind}_valid*.txt"),
        "test": (f"cbtest_{kind}_test_2500ex.txt", f"cbtest_{kind}_test*.txt"),
    }


def _cbt_hub(config: str) -> HubSource:
    splits = {"train": HubSplit("train"), "dev": HubSplit("validation"), "test": HubSplit("test")}
    return HubSource("cbt", config, splits, _hub_cbt)


_PUBLISHED = defaults_table()

DATASETS: Registry[DatasetSpec] = Registry("task.dataset")
"""Every dataset name :func:`load_examples` accepts, with its protocol mode and metric (``task.dataset``
takes its allowed values from here): the real ones below, then the built-in tasks."""
for _spec in (
    DatasetSpec(
        "hotpotqa",
        "exchange",
        "f1",
        "hotpotqa",
        {
            "train": ("train.json", "hotpot_train_v1.1.json"),
            "dev": ("dev.json", "hotpot_dev_distractor_v1.json"),
            "test": ("test.json",),
        },
        _read_json_array,
        _mh("hotpotqa"),
        HubSource("hotpot_qa", "distractor", {"train": HubSplit("train"), **_HALVES}, _hub_multihop),
        defaults=_PUBLISHED["hotpotqa"],
    ),
    DatasetSpec(
        "2wiki",
        "exchange",
        "f1",
        "2wiki",
        {"train": ("train.json",), "dev": ("dev.json",), "test": ("test.json",)},
        _read_json_array,
        _mh("2wiki"),
        HubSource("xanhho/2WikiMultihopQA", None, {"train": HubSplit("train"), **_HALVES}, _hub_multihop),
        defaults=_PUBLISHED["2wiki"],
    ),
    DatasetSpec(
        "triviaqa",
        "exchange",
        "f1",
        "triviaqa",
        {
            split: (
                f"qa/web-{split}.json",
                f"web-{split}.json",
                f"qa/wikipedia-{split}.json",
                f"wikipedia-{split}.json",
                f"{split}.json",
            )
            for split in ("train", "dev", "test")
        },
        _read_triviaqa,
        _triviaqa_make,
        HubSource("mandarjoshi/trivia_qa", "rc", {"train": HubSplit("train"), **_HALVES}, _hub_triviaqa),
        defaults=_PUBLISHED["triviaqa"],
    ),
    DatasetSpec(
        "cbt",
        "exchange",
        "f1",
        "cbt",
        _cbt_files("CN"),
        _read_cbt,
        _cbt_make("cbt"),
        _cbt_hub("CN"),
        defaults=_PUBLISHED["cbt"],
    ),
    DatasetSpec(
        "cbt_ne",
        "exchange",
        "f1",
        "cbt",
        _cbt_files("NE"),
        _read_cbt,
        _cbt_make("cbt_ne"),
        _cbt_hub("NE"),
        defaults=_PUBLISHED["cbt"],
    ),
    DatasetSpec(
        "gsm8k",
        "debate",
        "numeric",
        "gsm8k",
        {"train": ("train.jsonl",), "dev": ("dev.jsonl",), "test": ("test.jsonl",)},
        _read_jsonl,
        lambda record, split, seed, source: gsm8k_example(record, split),
        HubSource(
            "gsm8k",
            "main",
            {
                "train": HubSplit("train[:1000]+train[1300:]"),
                "dev": HubSplit("train[1000:1300]"),
                "test": HubSplit("test"),
            },
            _identity,
        ),
        defaults=_PUBLISHED["gsm8k"],
    ),
    DatasetSpec(
        "math",
        "debate",
        "math",
        "math",
        {"train": ("train",), "dev": ("dev",), "test": ("test",)},
        _read_math,
        lambda record, split, seed, source: math_example(record, split),
        HubSource(
            "hendrycks/competition_math",
            None,
            {
                "train": HubSplit("train", 15, 14, complement=True),
                "dev": HubSplit("train", 15, 14),
                "test": HubSplit("test"),
            },
            _identity,
        ),
        split_dir_glob="*/*.json",
        defaults=_PUBLISHED["math"],
    ),
    DatasetSpec(
        "arc",
        "debate",
        "choice",
        "arc_challenge",
        {
            "train": ("ARC-Challenge-Train.jsonl",),
            "dev": ("ARC-Challenge-Dev.jsonl",),
            "test": ("ARC-Challenge-Test.jsonl",),
        },
        _read_jsonl,
        lambda record, split, seed, source: arc_example(record, split),
        HubSource(
            "allenai/ai2_arc",
            "ARC-Challenge",
            {"train": HubSplit("train"), "dev": HubSplit("validation"), "test": HubSplit("test")},
            _hub_arc,
        ),
        defaults=_PUBLISHED["arc"],
    ),
    DatasetSpec(
        "mmlu",
        "debate",
        "choice",
        "mmlu",
        {"train": ("train",), "dev": ("val",), "test": ("test",), "fewshot": ("dev",)},
        _read_mmlu,
        lambda row, split, seed, source: mmlu_example(row, split),
        HubSource(
            "cais/mmlu",
            "all",
            {
                "train": HubSplit("test", 2, 0),
                "dev": HubSplit("validation"),
                "test": HubSplit("test", 2, 1),
                "fewshot": HubSplit("dev"),
            },
            _hub_mmlu,
        ),
        split_dir_glob="*.csv",
        defaults=_PUBLISHED["mmlu"],
    ),
):
    DATASETS.add(_spec.name, _spec)
for _name, _task in BUILTIN_DATASETS.items():
    _spec = DatasetSpec(_name, _task.mode, _task.metric, builtin=True, defaults=_PUBLISHED[_task.like])
    DATASETS.add(_name, _spec)


def dataset_spec(dataset: str) -> DatasetSpec:
    """The registry entry, or a ``KeyError`` listing the names that exist."""
    return DATASETS[dataset]


def method_defaults(dataset: str) -> MethodDefaults:
    """The published defaults of a registered dataset; a clear error for one registered without them."""
    spec = dataset_spec(dataset)
    if spec.defaults is None:
        raise ValueError(
            f"dataset {dataset!r} has no published defaults (reward weights, pairs.tau, sft_data threshold "
            "and slice, train.dpo.beta, train.sft_from): add a MethodDefaults to its DatasetSpec in "
            "dits.tasks.loaders, or set those keys in the config"
        )
    return spec.defaults


# -------------------------------------------------------------------------------------------- resolving


def _locate(spec: DatasetSpec, base: Path, split: str) -> Path | None:
    """The split's file (or folder) under ``base``, which may be a data root or the dataset folder."""
    if base.is_file():
        return base
    for folder in (base / spec.directory, base):
        for pattern in spec.files[split]:
            if any(char in pattern for char in "*?["):
                matches = sorted(folder.glob(pattern))
                if matches:
                    return matches[0]
            elif (folder / pattern).exists():
                return folder / pattern
    if spec.split_dir_glob and base.is_dir() and any(base.glob(spec.split_dir_glob)):
        return base
    return None


def _hub_items(spec: DatasetSpec, split: str) -> Iterator[Item]:
    """Rows of the hub copy, converted to the original file records."""
    assert spec.hub is not None
    import datasets

    hub_split = spec.hub.splits[split]
    rows = datasets.load_dataset(spec.hub.path, spec.hub.config, split=hub_split.split)
    source = f"hub:{spec.hub.path}" + (f"/{spec.hub.config}" if spec.hub.config else "")
    for index, row in enumerate(rows):
        if not hub_split.keeps(index):
            continue
        label = f"row {index} of {hub_split.split}"
        try:
            raw = spec.hub.convert(row)
        except (RecordError, KeyError, TypeError, ValueError) as exc:
            raise DatasetFormatError(source, label, f"unexpected hub row ({exc})") from exc
        if spec.name.startswith("cbt"):
            raw = (f"{spec.name}-{split}:{index}", raw)
        yield source, label, raw


def _invalid(exc: ValidationError) -> str:
    """A pydantic error in one line: ``field: message; ...``."""
    parts = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        parts.append(f"{where}: {error['msg']}" if where else error["msg"])
    return "not a valid example (" + "; ".join(parts) + ")"


def _examples(
    spec: DatasetSpec, items: Iterable[Item], split: str, seed: int, limit: int | None, source: Path | None
) -> tuple[list[Example], int]:
    """The examples, and how many records were skipped (no evidence text)."""
    assert spec.make is not None
    examples: list[Example] = []
    seen: dict[str, int] = {}
    skipped = 0
    origin = str(source)
    for origin, label, raw in items:
        if limit is not None and len(examples) >= limit:
            break
        try:
            example = spec.make(raw, split, seed, source)
        except RecordError as exc:
            raise DatasetFormatError(origin, label, str(exc)) from exc
        except ValidationError as exc:
            raise DatasetFormatError(origin, label, _invalid(exc)) from exc
        if example is None:
            skipped += 1
            continue
        repeats = seen.get(example.id, 0)
        seen[example.id] = repeats + 1
        if repeats:
            # Original files repeat a few records verbatim (MMLU dev has one); ids stay unique per split.
            logger.info("%s: %s repeats id %s", origin, label, example.id)
            example = example.model_copy(update={"id": f"{example.id}~{repeats + 1}"})
        examples.append(example)
    if skipped:
        logger.warning("%s %s: skipped %d records without any evidence text", spec.name, split, skipped)
        if not examples and limit != 0:
            problem = f"no usable records: all {skipped} have no evidence text"
            if source is not None:
                problem += f" (is the evidence folder {_evidence_root(source)} there?)"
            raise DatasetFormatError(source or origin, f"records 0..{skipped - 1}", problem)
    return examples, skipped


def _checked_count(
    examples: list[Example], skipped: int, where: str, split: str, limit: int | None, up_to: bool
) -> list[Example]:
    if not up_to and limit is not None and len(examples) < limit:
        detail = f" ({skipped} records skipped without evidence text)" if skipped else ""
        raise SplitTooShortError(where, split, limit, len(examples), detail)
    return examples


def load_examples(
    dataset: str,
    split: str,
    path: str | Path | None = None,
    *,
    seed: int = 0,
    limit: int | None = None,
    up_to: bool = False,
) -> list[Example]:
    """The examples of one split, in file order, contexts dealt with ``seed``.

    ``path`` may be the split's file (folder for MATH/MMLU), the dataset's folder, or a data root; when
    it is ``None``, :func:`default_data_root` (and for ``test`` :func:`default_heldout_root`) is
    searched, then the hub. ``limit`` keeps the first ``limit`` examples; it never changes their contexts.
    A split holding fewer is a :class:`~dits.tasks.files.SplitTooShortError` naming the file or folder
    read and both counts, unless ``up_to`` (then fewer are returned). A malformed record, and a file
    without records, raises :class:`DatasetFormatError` naming the file and the line or record.

    Built-in tasks are generated: ``limit`` is then the number of examples (required), with default
    difficulty; use :func:`dits.tasks.builtin.make_builtin` for the knobs.
    """
    spec = dataset_spec(dataset)
    split = canonical_split(split)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if spec.builtin:
        from dits.tasks.builtin import make_builtin

        if limit is None:
            raise ValueError(f"{dataset} is generated: pass limit=N (or call make_builtin for the knobs)")
        return make_builtin(dataset, split, limit, seed)
    if split not in spec.splits:
        raise ValueError(f"{dataset} has no split {split!r}; splits: {list(spec.splits)}")
    assert spec.read is not None
    if path is not None:
        bases = [Path(path).expanduser()]
    else:
        bases = [default_data_root()] + ([default_heldout_root()] if split == "test" else [])
    for base in bases:
        source = _locate(spec, base, split)
        if source is not None:
            examples, skipped = _examples(spec, spec.read(source), split, seed, limit, source)
            return _checked_count(examples, skipped, str(source), split, limit, up_to)
    wanted = ", ".join(spec.files[split])
    looked = f"looked for {wanted} under {', '.join(str(b) for b in bases)} (and their {spec.directory}/)"
    if path is not None or spec.hub is None:
        raise FileNotFoundError(f"no {dataset} {split} data: {looked}")
    logger.info("no local %s %s data (%s); trying the hub", dataset, split, looked)
    try:
        examples, skipped = _examples(spec, _hub_items(spec, split), split, seed, limit, None)
    except DatasetFormatError:
        raise
    except Exception as exc:
        raise FileNotFoundError(f"no {dataset} {split} data: {looked}; the hub failed too: {exc}") from exc
    hub = spec.hub.splits[split].split
    where = f"hub:{spec.hub.path}" + (f"/{spec.hub.config}" if spec.hub.config else "") + f" ({hub})"
    return _checked_count(examples, skipped, where, split, limit, up_to)
