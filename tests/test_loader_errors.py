"""Malformed dataset files, in each dataset's original format and layout, fail with one line that names the
file, the line (or record) and what is wrong; a record never reads a file outside its evidence folder; a split
shorter than asked for is an error stating both counts."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from dits.config import TaskConfig
from dits.tasks.files import DatasetFormatError, SplitTooShortError
from dits.tasks.loaders import load_examples
from dits.tasks.source import examples_for

BAD_BYTE = b"\xff"


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def _fails(
    dataset: str, split: str, path: Path, *, file: Path, where: str, reason: str
) -> DatasetFormatError:
    """``load_examples`` raises a DatasetFormatError whose one-line message names file, place and reason."""
    with pytest.raises(DatasetFormatError) as info:
        load_examples(dataset, split, path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{file}, {where}: "), message
    assert re.search(reason, message), message
    assert info.value.file == str(file) and info.value.record == where
    for raw in ("Traceback", "pydantic", "validation error", "UnicodeDecodeError", "sys.set_int_max"):
        assert raw not in message, message
    return info.value


# ------------------------------------------------------------------------------------------ records


def _multihop(example_id: str) -> dict:
    return {
        "_id": example_id,
        "question": "Which river?",
        "answer": "Nile",
        "supporting_facts": [["T", 0]],
        "context": [["T", ["The Nile is long."]], ["D", ["A distractor."]]],
    }


def _gsm8k(n: int) -> str:
    return json.dumps({"question": f"What is {n} + 1?", "answer": f"{n} + 1 = {n + 1}\n#### {n + 1}"})


def _arc(example_id: str, stem: str = "Which is a metal?", n_choices: int = 4) -> str:
    choices = [
        {"text": f"option {i}", "label": chr(ord("A") + i) if i < 26 else f"Z{i}"} for i in range(n_choices)
    ]
    return json.dumps({"id": example_id, "question": {"stem": stem, "choices": choices}, "answerKey": "A"})


def _cbt_story(word: str = "cat") -> str:
    lines = [f"{i} Sentence {i} ." for i in range(1, 21)]
    return "\n".join(lines) + f"\n21 The XXXXX sat .\t{word}\t\tcat|dog\n\n"


def _mmlu_rows(path: Path, rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerows(rows)
    return path


def _trivia_record(question_id: str, pages: list[dict], results: list[dict] | None = None) -> dict:
    return {
        "QuestionId": question_id,
        "Question": "Who wrote Babbitt?",
        "Answer": {"Value": "Sinclair Lewis", "Aliases": ["Sinclair Lewis"]},
        "EntityPages": pages,
        "SearchResults": results or [],
    }


def _trivia(tmp_path: Path, *records: dict) -> Path:
    return _write(
        tmp_path / "triviaqa" / "qa" / "web-dev.json", json.dumps({"Data": list(records)}, indent=2)
    )


# --------------------------------------------------------------------------------------- non-UTF-8


def test_non_utf8_hotpotqa_and_2wiki_name_the_line(tmp_path: Path) -> None:
    text = json.dumps([_multihop("a"), _multihop("b")], indent=1).encode("utf-8")
    lines = text.split(b"\n")
    target = next(i for i, line in enumerate(lines) if b"A distractor." in line)
    lines[target] = lines[target].replace(b"A distractor.", b"A distr" + BAD_BYTE + b"ctor.")
    for dataset in ("hotpotqa", "2wiki"):
        path = _write(tmp_path / dataset / "dev.json", b"\n".join(lines))
        column = lines[target].index(BAD_BYTE) + 1
        _fails(
            dataset,
            "dev",
            tmp_path,
            file=path,
            where=f"line {target + 1}",
            reason=rf"not valid UTF-8 \(byte 0xff at column {column}\)",
        )


def test_non_utf8_triviaqa_question_file_and_evidence_file(tmp_path: Path) -> None:
    record = _trivia_record("tq1", [{"Title": "Lewis", "Filename": "Lewis.txt"}])
    text = json.dumps({"Data": [record]}, indent=2).replace("Babbitt", "Babb\udcffitt", 1)
    path = _write(tmp_path / "triviaqa" / "qa" / "web-dev.json", text.encode("utf-8", "surrogateescape"))
    line = text[: text.index("\udcff")].count("\n") + 1
    _fails("triviaqa", "dev", tmp_path, file=path, where=f"line {line}", reason="not valid UTF-8 .byte 0xff")

    path = _trivia(tmp_path, record)
    evidence = _write(
        tmp_path / "triviaqa" / "evidence" / "wikipedia" / "Lewis.txt", b"Lead.\nBad " + BAD_BYTE
    )
    _fails(
        "triviaqa",
        "dev",
        tmp_path,
        file=path,
        where="record 0",
        reason=rf"EntityPages\[0\]\.Filename: evidence file {re.escape(str(evidence))}, line 2: "
        r"not valid UTF-8 \(byte 0xff at column 5\)",
    )


def test_non_utf8_cbt(tmp_path: Path) -> None:
    text = (_cbt_story() + _cbt_story()).encode("utf-8").replace(b"Sentence 7 .", b"Sentence " + BAD_BYTE, 2)
    path = _write(tmp_path / "cbt" / "cbtest_CN_valid_2000ex.txt", text)
    _fails(
        "cbt",
        "dev",
        tmp_path,
        file=path,
        where="line 7",
        reason=r"not valid UTF-8 \(byte 0xff at column 12\)",
    )


@pytest.mark.parametrize(
    ("dataset", "name", "good", "second"),
    [
        ("gsm8k", "dev.jsonl", _gsm8k(1), _gsm8k(2)),
        ("arc", "ARC-Challenge-Dev.jsonl", _arc("X1"), _arc("X2")),
    ],
)
def test_non_utf8_jsonl(tmp_path: Path, dataset: str, name: str, good: str, second: str) -> None:
    folder = "arc_challenge" if dataset == "arc" else dataset
    data = good.encode() + b"\n\n" + second.encode().replace(b"?", b"?" + BAD_BYTE) + b"\n"
    path = _write(tmp_path / folder / name, data)
    _fails(dataset, "dev", tmp_path, file=path, where="line 3", reason="not valid UTF-8 .byte 0xff at column")


def test_non_utf8_math(tmp_path: Path) -> None:
    _write(
        tmp_path / "math" / "dev" / "algebra" / "1.json",
        json.dumps({"problem": "1+1?", "solution": "$\\boxed{2}$"}),
    )
    text = json.dumps({"problem": "2+2?", "level": "Level 1", "solution": "$\\boxed{4}$"}, indent=4).encode()
    bad = _write(tmp_path / "math" / "dev" / "algebra" / "2.json", text.replace(b"2+2?", b"2+2" + BAD_BYTE))
    _fails(
        "math", "dev", tmp_path, file=bad, where="line 2", reason="not valid UTF-8 .byte 0xff at column 20"
    )


def test_non_utf8_mmlu(tmp_path: Path) -> None:
    path = _mmlu_rows(
        tmp_path / "mmlu" / "val" / "anatomy_val.csv", [["Multi\nline", "a", "b", "c", "d", "A"]]
    )
    path.write_bytes(path.read_bytes() + b"Second question" + BAD_BYTE + b",a,b,c,d,B\n")
    _fails(
        "mmlu",
        "dev",
        tmp_path,
        file=path,
        where="line 3",
        reason=r"not valid UTF-8 \(byte 0xff at column 16\)",
    )


# ------------------------------------------------------------------------------ what json cannot read


def test_huge_integer_jsonl_and_json(tmp_path: Path) -> None:
    digits = "9" * 5000
    path = _write(
        tmp_path / "gsm8k" / "dev.jsonl", f'{_gsm8k(1)}\n{{"question": "Q?", "answer": {digits}}}\n'
    )
    _fails(
        "gsm8k",
        "dev",
        tmp_path,
        file=path,
        where="line 2",
        reason="an integer of 5000 digits; .* at most 4300",
    )

    text = json.dumps([_multihop("a"), _multihop("b")], indent=1)
    text = text.replace('"_id": "b"', f'"_id": {digits}')
    line = text[: text.index(digits)].count("\n") + 1
    assert line > 1
    path = _write(tmp_path / "hotpotqa" / "dev.json", text)
    _fails("hotpotqa", "dev", tmp_path, file=path, where=f"line {line}", reason="an integer of 5000 digits")


def test_deep_nesting_jsonl_and_json(tmp_path: Path) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    path = _write(tmp_path / "arc_challenge" / "ARC-Challenge-Dev.jsonl", f"{_arc('X1')}\n{deep}\n")
    _fails("arc", "dev", tmp_path, file=path, where="line 2", reason="JSON nested 100000 levels deep")

    path = _write(
        tmp_path / "hotpotqa" / "dev.json",
        f'[\n{json.dumps(_multihop("a"))},\n{{"x": "[[[", "y": {deep}}}\n]',
    )
    _fails("hotpotqa", "dev", tmp_path, file=path, where="line 3", reason="JSON nested 100002 levels deep")

    path = _write(tmp_path / "math" / "dev" / "algebra" / "3.json", '{"problem":\n' + deep + "}")
    _fails("math", "dev", tmp_path, file=path, where="line 2", reason="nested 100001 levels deep")


def test_mmlu_field_over_csv_limit(tmp_path: Path) -> None:
    path = _mmlu_rows(
        tmp_path / "mmlu" / "val" / "anatomy_val.csv",
        [["Q1", "a", "b", "c", "d", "A"], ["x" * 200_000, "a", "b", "c", "d", "B"]],
    )
    _fails(
        "mmlu", "dev", tmp_path, file=path, where="line 2", reason="a field is longer than 131072 characters"
    )


# --------------------------------------------------------------------------------------------- ARC


def test_arc_27_choices(tmp_path: Path) -> None:
    path = _write(tmp_path / "ARC-Challenge-Dev.jsonl", f"{_arc('X1')}\n{_arc('X2', n_choices=27)}\n")
    _fails(
        "arc", "dev", path, file=path, where="line 2", reason=r"has 27 choices; at most 26 \(letters A-Z\)"
    )
    path = _write(tmp_path / "ARC-Challenge-Dev.jsonl", _arc("X3", n_choices=26) + "\n")
    assert len(load_examples("arc", "dev", path)[0].choices) == 26


def test_arc_stem_of_control_characters(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "ARC-Challenge-Dev.jsonl", f"{_arc('X1')}\n{_arc('X2', stem=chr(1) + chr(2) + chr(127))}\n"
    )
    _fails(
        "arc",
        "dev",
        path,
        file=path,
        where="line 2",
        reason="field 'stem' has no text besides control characters",
    )


def test_mmlu_question_of_control_characters(tmp_path: Path) -> None:
    path = _mmlu_rows(
        tmp_path / "val" / "anatomy_val.csv",
        [["Q1", "a", "b", "c", "d", "A"], ["\x01\x02", "a", "b", "c", "d", "B"]],
    )
    _fails(
        "mmlu", "dev", path.parent, file=path, where="line 2", reason="question has no text besides control"
    )


# ------------------------------------------------------------------------------------ empty files


@pytest.mark.parametrize(
    ("dataset", "relative", "content", "where", "reason"),
    [
        ("gsm8k", "gsm8k/dev.jsonl", "", "line 1", r"no records \(the file is empty\)"),
        ("gsm8k", "gsm8k/dev.jsonl", "\n  \n", "line 1", r"no records \(the file is empty\)"),
        ("arc", "arc_challenge/ARC-Challenge-Dev.jsonl", "", "line 1", "no records"),
        ("hotpotqa", "hotpotqa/dev.json", "", "line 1", r"no JSON document \(the file is empty\)"),
        ("hotpotqa", "hotpotqa/dev.json", "[]", "top level", r"no records \(the JSON array is empty\)"),
        ("2wiki", "2wiki/dev.json", " [\n] ", "top level", "no records"),
        ("triviaqa", "triviaqa/qa/web-dev.json", '{"Data": []}', "top level", r"the 'Data' list is empty"),
        ("cbt", "cbt/cbtest_CN_valid_2000ex.txt", "", "line 1", r"no stories \(the file is empty\)"),
        ("mmlu", "mmlu/val/anatomy_val.csv", "", "line 1", r"no rows \(the file is empty\)"),
        ("math", "math/dev/algebra/1.json", "", "line 1", "no JSON document"),
    ],
)
def test_empty_files(
    tmp_path: Path, dataset: str, relative: str, content: str, where: str, reason: str
) -> None:
    path = _write(tmp_path / relative, content)
    _fails(dataset, "dev", tmp_path, file=path, where=where, reason=reason)


def test_empty_split_folders(tmp_path: Path) -> None:
    (tmp_path / "mmlu" / "val").mkdir(parents=True)
    folder = tmp_path / "mmlu" / "val"
    _fails("mmlu", "dev", tmp_path, file=folder, where="top level", reason=r"no .*_<split>\.csv files")
    (tmp_path / "math" / "dev" / "algebra").mkdir(parents=True)
    folder = tmp_path / "math" / "dev"
    _fails(
        "math",
        "dev",
        tmp_path,
        file=folder,
        where="top level",
        reason=r"no problems \(no <subject>/<n>\.json",
    )


def test_triviaqa_without_any_evidence_is_an_error(tmp_path: Path) -> None:
    path = _trivia(tmp_path, _trivia_record("tq1", [{"Title": "Lewis", "Filename": "Lewis.txt"}]))
    _fails(
        "triviaqa",
        "dev",
        tmp_path,
        file=path,
        where="records 0..0",
        reason="no usable records: all 1 have no evidence",
    )


# ------------------------------------------------------------------------------- short splits


def test_split_shorter_than_configured(tmp_path: Path) -> None:
    path = _write(tmp_path / "gsm8k" / "train.jsonl", "".join(_gsm8k(i) + "\n" for i in range(3)))
    task = TaskConfig(dataset="gsm8k", path=str(tmp_path), train=5, dev=0, test=0)
    with pytest.raises(SplitTooShortError) as info:
        examples_for(task, "train")
    message = str(info.value)
    assert message.startswith(f"{path}, train split: 5 examples requested but the split has only 3")
    assert "task.train = 5" in message and "\n" not in message
    assert (info.value.requested, info.value.available) == (5, 3)

    with pytest.raises(
        SplitTooShortError, match=r"4 examples requested but the split has only 3.*a limit of 4"
    ):
        examples_for(task, "train", 4)  # what `dits evaluate/synthesize --limit 4` call
    assert len(examples_for(task, "train", 4, up_to=True)) == 3
    assert len(examples_for(task, "train", 3)) == 3
    assert len(examples_for(task.model_copy(update={"train": 2}), "train")) == 2
    assert len(load_examples("gsm8k", "train", tmp_path, limit=5, up_to=True)) == 3
    with pytest.raises(SplitTooShortError, match=re.escape(f"{path}, train split: 5 examples requested")):
        load_examples("gsm8k", "train", tmp_path, limit=5)
    assert len(load_examples("gsm8k", "train", tmp_path)) == 3  # no limit: the whole split


def test_short_split_counts_skipped_records(tmp_path: Path) -> None:
    folder = tmp_path / "triviaqa" / "evidence" / "wikipedia"
    _write(folder / "Lewis.txt", "Harry Sinclair Lewis was an American novelist.")
    good = _trivia_record("tq1", [{"Title": "Lewis", "Filename": "Lewis.txt"}])
    path = _trivia(tmp_path, good, _trivia_record("tq2", [{"Title": "Gone", "Filename": "Gone.txt"}]))
    task = TaskConfig(dataset="triviaqa", path=str(tmp_path), dev=2)
    with pytest.raises(
        SplitTooShortError, match=r"only 1 \(1 records skipped without evidence text\)"
    ) as info:
        examples_for(task, "dev")
    assert info.value.file == str(path)


def test_builtin_tasks_are_unaffected() -> None:
    assert len(examples_for(TaskConfig(dataset="facts", train=7), "train")) == 7


# --------------------------------------------------------------------------------- path escape


SECRET = "TOP-SECRET-CONTENT-4711 must never reach an agent"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    return _write(tmp_path / "outside" / "secret.txt", SECRET + "\n")


def _assert_escape_refused(tmp_path: Path, record: dict, field: str, filename: str) -> None:
    folder = tmp_path / "triviaqa" / "evidence" / ("web" if field.startswith("Search") else "wikipedia")
    _write(tmp_path / "triviaqa" / "evidence" / "wikipedia" / "Lewis.txt", "Sinclair Lewis was a novelist.")
    path = _trivia(tmp_path, _trivia_record("ok", [{"Title": "Lewis", "Filename": "Lewis.txt"}]), record)
    error = _fails(
        "triviaqa",
        "dev",
        tmp_path,
        file=path,
        where="record 1",
        reason=rf"{re.escape(field)} {re.escape(repr(filename))} (points|links) outside the evidence folder "
        + re.escape(str(folder)),
    )
    assert SECRET not in str(error)


def test_triviaqa_absolute_filename_is_refused(tmp_path: Path, outside: Path) -> None:
    record = _trivia_record("evil", [{"Title": "Host", "Filename": str(outside)}])
    _assert_escape_refused(tmp_path, record, "EntityPages[0].Filename", str(outside))


def test_triviaqa_dotdot_filename_is_refused(tmp_path: Path, outside: Path) -> None:
    relative = "../../../outside/secret.txt"
    assert (tmp_path / "triviaqa" / "evidence" / "wikipedia" / relative).resolve() == outside.resolve()
    page = {"Title": "Ok", "Filename": "Lewis.txt"}
    record = _trivia_record("evil", [page, {"Title": "Up", "Filename": relative}])
    _assert_escape_refused(tmp_path, record, "EntityPages[1].Filename", relative)


def test_triviaqa_search_result_filename_is_refused(tmp_path: Path, outside: Path) -> None:
    relative = "../../../outside/secret.txt"
    results = [{"Title": "T", "Description": "A description.", "Filename": relative}]
    record = _trivia_record("evil", [{"Title": "Lewis", "Filename": "Lewis.txt"}], results)
    _assert_escape_refused(tmp_path, record, "SearchResults[0].Filename", relative)


def test_triviaqa_symlink_out_of_evidence_is_refused(tmp_path: Path, outside: Path) -> None:
    link = tmp_path / "triviaqa" / "evidence" / "wikipedia" / "Innocent.txt"
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    record = _trivia_record("evil", [{"Title": "Innocent", "Filename": "Innocent.txt"}])
    _assert_escape_refused(tmp_path, record, "EntityPages[0].Filename", "Innocent.txt")


def test_triviaqa_inside_paths_still_read(tmp_path: Path) -> None:
    folder = tmp_path / "triviaqa" / "evidence" / "wikipedia"
    _write(folder / "sub" / "Lewis.txt", "Harry Sinclair Lewis was an American novelist.")
    pages = [{"Title": "Lewis", "Filename": "sub/../sub/Lewis.txt"}]
    results = [{"Title": "Web", "Description": "Lewis won in 1930.", "Filename": "119/119_10.txt"}]
    _trivia(tmp_path, _trivia_record("tq1", pages, results))
    (example,) = load_examples("triviaqa", "dev", tmp_path)
    assert "Lewis: Harry Sinclair Lewis was an American novelist." in "\n\n".join(example.contexts)
