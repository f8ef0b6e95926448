"""One error path in the command line: a known error prints one line ``dits: error: ...`` naming the file,
key or path and exits 2; ``--debug`` adds the traceback; a bug still shows its traceback.

Each case runs ``dits.cli.main`` in-process and fails before a model is built (building one fails the test).
Before, these gave an AttributeError or TypeError traceback (``task: 5``, ``--set search.explore.deep=1``),
a YAML error at ``<unicode string>``, a FileNotFoundError traceback, a multi-line message with exit status
1, or (``--max-turns 0``) no error at all.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from dits.artifacts import StageChanged
from dits.cli import build_parser, main


@pytest.fixture(autouse=True)
def _no_model_and_sigterm_restored(monkeypatch) -> Iterator[None]:
    """A command that got as far as building an engine fails the test (the cases fail before); ``main``'s
    SIGTERM handler is not left behind for the rest of the session."""
    import dits.engine
    import dits.stages.context

    def refuse(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(dits.engine, "engine_from_config", refuse)
    monkeypatch.setattr(dits.stages.context, "engine_from_config", refuse)
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def _error(capsys, *argv: str) -> str:
    """The one stderr line of a failing command (exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dits: error: "), err
    assert str(exit_.value) == lines[0].removeprefix("dits: error: ")
    return lines[0]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {
        "syntax": "name: x\ntask:\n  dataset: facts\n   train: 3\n",
        "scalar": "task: 5\n",
        "dev0": "task:\n  dev: 0\n",
    }
    paths = {}
    for name, text in out.items():
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(text, encoding="utf-8")
    return paths


def test_a_yaml_syntax_error_names_the_file_and_line(capsys, files):
    line = _error(capsys, "run", str(files["syntax"]))
    assert f"invalid config {files['syntax']}: YAML syntax error at line 4, column 9" in line


def test_a_section_that_is_not_a_mapping(capsys, files):
    line = _error(capsys, "run", str(files["scalar"]))
    assert line == (
        f"dits: error: invalid config {files['scalar']}: task: Input should be a valid dictionary or "
        "instance of TaskConfig (got 5)"
    )


def test_a_dotted_key_through_a_value(capsys):
    line = _error(capsys, "demo", "--set", "search.explore.deep=1")
    assert "search.explore.deep: search.explore is 2, not a section with keys" in line


def test_a_missing_config_file(capsys, tmp_path: Path):
    assert (
        _error(capsys, "run", str(tmp_path / "nope.yaml"))
        == f"dits: error: no config file {tmp_path / 'nope.yaml'}"
    )
    line = _error(capsys, "select", "--pairs", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o"))
    assert line == f"dits: error: no pairs file {tmp_path / 'p.jsonl'}"


def test_every_key_error_of_a_config_is_on_the_one_line(capsys, files):
    argv = ["run", str(files["dev0"]), "--set", "protocol.max_turns=0", "--set", "reward.lambda_tok=.nan"]
    line = _error(capsys, *argv)
    assert line.startswith(f"dits: error: invalid config {files['dev0']} + overrides: protocol.max_turns: ")
    assert "; reward.lambda_tok: Input should be a finite number (got nan)" in line
    # the recipe's checks run once the sections validate: both splits named
    line = _error(capsys, "run", str(files["dev0"]), "--set", "task.test=0")
    assert "task.dev: must be >= 1 (got 0)" in line and "; task.test: must be >= 1 (got 0)" in line


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (
            ["evaluate", "--max-turns", "0"],
            "protocol.max_turns: Input should be greater than or equal to 1 (got 0)",
        ),
        (
            ["evaluate", "--protocol.max_turns", "0"],
            "protocol.max_turns: Input should be greater than or equal to 1",
        ),
        (
            ["synthesize", "--keep-fraction", "-1", "--tau", "5"],
            "pairs.keep_top_fraction: Input should be greater than 0",
        ),
        (["synthesize", "--tau", ".inf"], "pairs.tau: Input should be a finite number (got inf)"),
        (
            ["synthesize", "--search.explore", "-1"],
            "search.explore: Input should be greater than or equal to 0",
        ),
        (
            ["select", "--pairs", "p", "--out", "o", "--ratio", "0"],
            "select.ratio: Input should be greater than 0",
        ),
        (
            ["influence", "--pairs", "p", "--influence.chunk_size", "0"],
            "influence.chunk_size: Input should be",
        ),
        (["demo", "--set", "name=../elsewhere"], "name: '../elsewhere' is not allowed; a plain name"),
        (
            ["demo", "--set", "rollout.temperature=.inf"],
            "rollout.temperature: Input should be a finite number",
        ),
        (["demo", "--set", "train.dpo.lr=.inf"], "train.dpo.lr: Input should be a finite number"),
        (
            ["demo", "--set", "task.dev=0"],
            "task.dev: must be >= 1 (got 0): the dev split is read by the influence",
        ),
        (["demo", "--set", "task.test=0"], "task.test: must be >= 1 (got 0): the test split is read by"),
        (
            ["demo", "--set", "search.explore"],
            "--set expects KEY=VALUE with a dotted key, got 'search.explore'",
        ),
        (["demo", "--set", "task.knobs={hops: 2"], "--set task.knobs: '{hops: 2' is not a YAML value"),
    ],
)
def test_flags_and_set_are_validated_by_the_config_model(capsys, argv, fragment):
    """The ``--SECTION.KEY`` flags, their short aliases and ``--set`` go through ``load_config``; a value out
    of bounds is an error, not the default (``--max-turns 0`` was dropped by an ``if v``)."""
    assert fragment in _error(capsys, *argv)


def test_a_flag_given_overrides_even_with_a_null(tmp_path: Path):
    """Only the flags given override the file (their defaults are suppressed), and ``null`` is a value."""
    from dits.cli import _load

    path = tmp_path / "c.yaml"
    path.write_text("pairs:\n  tau: 0.3\nsearch:\n  explore: 5\n")
    args = build_parser().parse_args(["synthesize", "--config", str(path)])
    assert (_load(args).pairs.tau, _load(args).search.explore) == (0.3, 5)
    args = build_parser().parse_args(
        ["synthesize", "--config", str(path), "--tau", "null", "--search.explore", "0"]
    )
    assert (_load(args).pairs.tau, _load(args).search.explore) == (None, 0)


def test_a_dataset_file_in_the_wrong_format_names_the_file(capsys, tmp_path: Path):
    bad = tmp_path / "hp.json"
    bad.write_text('[{"_id": "a"}]')
    line = _error(capsys, "evaluate", "--dataset", "hotpotqa", "--path", str(bad), "--limit", "2")
    assert str(bad) in line


def test_a_stages_refusal_of_a_value_is_one_line(capsys, tmp_path: Path):
    line = _error(capsys, "evaluate", "--split", "foo", "--out", str(tmp_path))
    assert "split must be one of" in line and "'foo'" in line
    line = _error(capsys, "evaluate", "--limit", "0", "--out", str(tmp_path))
    assert line == "dits: error: no facts test tasks to evaluate (check --limit, task.test)"
    line = _error(capsys, "evaluate", "--adapter", str(tmp_path / "none"), "--out", str(tmp_path))
    assert f"--adapter {tmp_path / 'none'}: not an adapter directory" in line


def test_a_stage_changed_names_the_stage(capsys, monkeypatch, tmp_path: Path):
    import dits.pipeline

    def changed(self):
        raise StageChanged(
            f"{self.run_dir}/base/evaluate was made from other inputs (protocol.max_turns: 9 -> 4). Use a "
            "new run name, or --force to redo this stage and the ones after it."
        )

    monkeypatch.setattr(dits.pipeline.Pipeline, "run", changed)
    line = _error(capsys, "demo", "--runs-dir", str(tmp_path))
    assert (
        f"{tmp_path / 'demo'}/base/evaluate was made from other inputs (protocol.max_turns: 9 -> 4)" in line
    )


def test_a_key_error_of_an_unknown_name_is_its_message(capsys, monkeypatch, tmp_path: Path):
    import dits.stages.select

    def unknown(*args, **kwargs):
        raise KeyError("unknown adapter 'x'; loaded adapters: []")

    monkeypatch.setattr(dits.stages.select, "select_to_dir", unknown)
    (tmp_path / "p.jsonl").write_text("")
    line = _error(
        capsys, "select", "--pairs", str(tmp_path / "p.jsonl"), "--strategy", "q", "--out", str(tmp_path)
    )
    assert line == "dits: error: unknown adapter 'x'; loaded adapters: []"  # not the KeyError's repr


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_prints_the_traceback_too(capsys, files, where: str):
    argv = ["run", str(files["scalar"])]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "Traceback (most recent call last)" in err and "ConfigError" in err
    assert err.splitlines()[-1].startswith(f"dits: error: invalid config {files['scalar']}: task:")


@pytest.mark.parametrize("error", [TypeError("a bug"), AttributeError("a bug"), RuntimeError("a bug")])
def test_a_bug_is_not_caught(capsys, monkeypatch, tmp_path: Path, error: Exception):
    import dits.stages.select

    def bug(*args, **kwargs):
        raise error

    monkeypatch.setattr(dits.stages.select, "select_to_dir", bug)
    (tmp_path / "p.jsonl").write_text("")
    with pytest.raises(type(error), match="a bug"):
        main(["select", "--pairs", str(tmp_path / "p.jsonl"), "--strategy", "q", "--out", str(tmp_path)])
    assert "dits: error" not in capsys.readouterr().err


def test_ctrl_c_and_sigterm_pass_through(monkeypatch, tmp_path: Path):
    import dits.stages.select

    (tmp_path / "p.jsonl").write_text("")
    argv = ["select", "--pairs", str(tmp_path / "p.jsonl"), "--strategy", "q", "--out", str(tmp_path)]
    for raised, caught in ((KeyboardInterrupt(), KeyboardInterrupt), (SystemExit(143), SystemExit)):

        def stop(*args, raised=raised, **kwargs):
            raise raised

        monkeypatch.setattr(dits.stages.select, "select_to_dir", stop)
        with pytest.raises(caught) as info:
            main(argv)
        assert info.value is raised  # not turned into exit 2


def test_a_second_run_on_a_locked_run_directory_stops_at_once(capsys, tmp_path: Path) -> None:
    """Another process holds ``runs/demo``: ``dits demo`` names it in one line and touches nothing."""
    import subprocess
    import sys
    import time

    code = "import sys, time; from dits.artifacts import lock_dir; lock_dir(sys.argv[1]); "
    code += "print('ok', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "demo")], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ok"
        start = time.monotonic()
        line = _error(capsys, "demo", "--runs-dir", str(tmp_path), "--no-progress")
        assert time.monotonic() - start < 30
        assert f"{tmp_path / 'demo'} is in use by pid {holder.pid} on " in line
        assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == [".lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()


def test_corrupt_bookkeeping_and_a_torn_input_are_one_line_naming_the_file(capsys, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{garbage")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("")
    line = _error(capsys, "influence", "--pairs", str(pairs), "--out", str(out), "--no-progress")
    assert f"{out / 'manifest.json'} is not a valid manifest.json (" in line and "--force" in line
    pairs.write_text('{"tree_task_id": "t"')  # a torn last line: never silently dropped
    line = _error(capsys, "select", "--pairs", str(pairs), "--strategy", "q", "--out", str(tmp_path / "s"))
    assert f"{pairs}:1: torn last line" in line
