"""One entry point from a run config's ``task`` section to examples: built-in generators or dataset files.

Stages call :func:`examples_for` instead of choosing between :func:`~dits.tasks.builtin.make_builtin` and
:func:`~dits.tasks.loaders.load_examples` themselves, so every stage of a run sees the same examples for a
split (same seed, same knobs, same count).
"""

from __future__ import annotations

from typing import Protocol

from dits.tasks.builtin import BUILTIN_DATASETS, make_builtin
from dits.tasks.example import SPLITS, Example, canonical_split
from dits.tasks.files import SplitTooShortError
from dits.tasks.loaders import load_examples

__all__ = ["TaskSource", "examples_for", "split_count"]


class TaskSource(Protocol):
    """What :func:`examples_for` reads from a task config (``dits.config.TaskConfig`` has these fields)."""

    dataset: str
    path: str | None
    seed: int
    train: int
    dev: int
    test: int
    knobs: dict[str, object]


def split_count(task_cfg: TaskSource, split: str) -> int:
    """The configured number of tasks of ``split`` (``validation``/``val`` mean ``dev``)."""
    name = canonical_split(split)
    if name not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} (or 'validation'), got {split!r}")
    return int(getattr(task_cfg, name))


def examples_for(
    task_cfg: TaskSource, split: str, limit: int | None = None, *, up_to: bool = False
) -> list[Example]:
    """The examples of ``split``: ``limit`` of them if given, else the configured count for the split.

    Built-in datasets are generated with ``task_cfg.knobs`` and ``task_cfg.seed``; file datasets are read
    (contexts dealt with ``task_cfg.seed``) and cut to the count. A file split holding fewer examples than
    that count is a :class:`~dits.tasks.files.SplitTooShortError` naming the file (or folder) read, the
    count asked for and the count available, unless ``up_to`` (then the caller gets what there is and
    checks the length itself). The first ``n`` examples never depend on ``n``, so a smaller limit gives a
    prefix of a larger one.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    n = split_count(task_cfg, split) if limit is None else limit
    if task_cfg.dataset in BUILTIN_DATASETS:
        return make_builtin(task_cfg.dataset, split, n, task_cfg.seed, **dict(task_cfg.knobs))
    if task_cfg.knobs:
        raise ValueError(
            f"task.knobs {sorted(task_cfg.knobs)} apply only to built-in datasets {list(BUILTIN_DATASETS)}, "
            f"not to {task_cfg.dataset!r}"
        )
    args = (task_cfg.dataset, split, task_cfg.path)
    try:
        return load_examples(*args, seed=task_cfg.seed, limit=n, up_to=up_to)
    except SplitTooShortError as exc:
        asked = f"task.{canonical_split(split)} = {n}" if limit is None else f"a limit of {n}"
        detail = (
            f"{exc.detail} ({task_cfg.dataset}, {asked}); ask for at most {exc.available} "
            "or point task.path at a larger split"
        )
        raise SplitTooShortError(exc.file, canonical_split(split), n, exc.available, detail) from None
