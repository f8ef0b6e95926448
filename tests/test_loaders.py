"""Loaders against the real shared data (skipped if absent) and small fixtures in the original formats."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from dits.tasks import loaders
from dits.tasks.example import Example
from dits.tasks.files import DatasetFormatError, stable_hash
from dits.tasks.loaders import DATASETS, default_data_root, load_examples

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def data_root() -> Path:
    root = default_data_root()
    if not (root / "gsm8k").is_dir():
        pytest.skip(f"shared data not found at {root}")
    return root


def _render(title: str, sentences: list[str]) -> str:
    """The expected context block of one paragraph (an independent re-statement of the format)."""
    return f"{title}: " + " ".join(s.strip() for s in sentences if s.strip())


def _blocks(context: str) -> list[str]:
    return [block for block in context.split("\n\n") if block]


def _check_multihop_dealing(record: dict, example: Example) -> None:
    """Every unique paragraph is in exactly one agent's context; gold paragraphs are split when >= 2."""
    unique: dict[str, str] = {}
    for title, sentences in record["context"]:
        unique.setdefault(title, _render(title, sentences))
    alice, bob = (_blocks(context) for context in example.contexts)
    assert sorted(alice + bob) == sorted(unique.values())
    assert len(set(alice + bob)) == len(alice + bob), "a paragraph was duplicated"
    gold = {title for title, _ in record["supporting_facts"]}
    gold_alice = [t for t in gold if unique[t] in alice]
    gold_bob = [t for t in gold if unique[t] in bob]
    assert sorted(gold_alice + gold_bob) == sorted(gold)
    assert not set(gold_alice) & set(gold_bob)
    if len(gold) >= 2:
        assert gold_alice and gold_bob, "each agent must hold a gold paragraph"
        assert abs(len(gold_alice) - len(gold_bob)) <= 1, "gold paragraphs are dealt alternately"


# ----------------------------------------------------------------------------------------- real data


@pytest.mark.parametrize(
    ("dataset", "split", "count"),
    [
        ("gsm8k", "train", 1000),
        ("gsm8k", "dev", 300),
        ("arc", "train", 1000),
        ("arc", "dev", 299),
        ("mmlu", "train", 1000),
        ("mmlu", "val", 300),
        ("mmlu", "fewshot", 285),
        ("hotpotqa", "train", 200),
        ("hotpotqa", "dev", 53),
        ("math", "train", 1000),
        ("math", "dev", 300),
    ],
)
def test_record_counts_and_unique_ids(data_root: Path, dataset: str, split: str, count: int) -> None:
    examples = load_examples(dataset, split)
    assert len(examples) == count
    assert len({e.id for e in examples}) == count
    spec = DATASETS[dataset]
    assert all(e.mode == spec.mode and e.metric == spec.metric and e.dataset == dataset for e in examples)


def test_gsm8k_final_answers(data_root: Path) -> None:
    train = load_examples("gsm8k", "train")
    assert train[0].answers == ["72"]
    assert train[0].question.startswith("Natalia sold clips to 48 of her friends in April")
    assert train[0].contexts == ["", ""]
    assert train[1].answers == ["10"]
    answers = {e.answers[0] for e in train}
    assert {"1080", "850000", "109200000"} <= answers  # written "1,080", "850,000", "109,200,000"
    assert not any("," in a for a in answers)


def test_arc_digit_labels_and_choice_counts(data_root: Path) -> None:
    dev = {e.id: e for e in load_examples("arc", "dev")}
    example = dev["NYSEDREGENTS_2014_8_20"]  # labels "1".."4", answerKey "2"
    assert example.answers == ["B", "equal to the total mass of the products"]
    assert example.choices[0] == "greater than the total mass of the products"
    assert "\x02" not in example.question  # the file has a stray control character here
    assert dev["NYSEDREGENTS_2014_8_38"].answers[0] == "A"  # answerKey "1"
    five = dev["TIMSS_2003_8_pg29"]
    assert len(five.choices) == 5 and five.answers == ["E", "heart"]
    assert len(dev["NYSEDREGENTS_2014_4_4"].choices) == 3
    first = load_examples("arc", "dev", limit=1)[0]
    assert first.id == "Mercury_SC_407695" and first.answers[0] == "D"


def test_mmlu_embedded_newlines_crlf_and_subject(data_root: Path) -> None:
    val = load_examples("mmlu", "val")
    history = [e for e in val if e.id.startswith("mmlu-high_school_european_history-")]
    assert len(history) == 4
    first = history[0]
    assert first.question.startswith("This question refers to the following information.\nThe situation is")
    assert first.answers == ["C", "the Bolshevik faction could wait no longer to seize power"]
    assert first.choices[1] == "Kerensky had to move immediately against the Bolsheviks"
    chemistry = next(e for e in val if e.id.startswith("mmlu-college_chemistry-"))  # a CRLF file
    assert chemistry.question == "Reduction of D-xylose with NaBH4 yields a product that is a"
    assert chemistry.choices == [
        "racemic mixture",
        "single pure enantiomer",
        "mixture of two diastereomers in equal amounts",
        "meso compound",
    ]
    assert chemistry.answers[0] == "D"
    assert not any("\r" in e.question or any("\r" in c for c in e.choices) for e in val)


def test_mmlu_duplicate_row_keeps_ids_unique(data_root: Path) -> None:
    fewshot = load_examples("mmlu", "fewshot")
    telescope = [e for e in fewshot if e.question.startswith("A refracting telescope consists of two")]
    assert len(telescope) == 2  # the original college_physics_dev.csv repeats this row
    assert telescope[1].id == telescope[0].id + "~2"


def _math_question(root: Path, relative: str) -> str:
    return json.loads((root / "math" / relative).read_text(encoding="utf-8"))["problem"].strip()


def test_math_boxed_answers(data_root: Path) -> None:
    by_question = {e.question: e for e in load_examples("math", "train")}
    expected = {
        "train/algebra/1397.json": "17",  # "\boxed {17}" (space before the brace), then a second "\boxed{17}"
        "train/intermediate_algebra/351.json": "\\frac{3 + \\sqrt{5}}{2}",  # nested braces
        "train/precalculus/606.json": "\\frac{\\pi}{6}",
        "train/precalculus/230.json": "1",  # text with another \frac after the box
    }
    for relative, answer in expected.items():
        assert by_question[_math_question(data_root, relative)].answers == [answer], relative


def test_hotpotqa_four_paragraph_record(data_root: Path) -> None:
    example = load_examples("hotpotqa", "train")[98]
    assert example.id == "5ac2a291554299657fa28ff6"
    assert example.answers == ["no"]
    alice, bob = (_blocks(c) for c in example.contexts)
    assert len(alice) + len(bob) == 4
    nantong = [i for i, hand in enumerate((alice, bob)) if any(b.startswith("Nantong: ") for b in hand)]
    jingdezhen = [i for i, hand in enumerate((alice, bob)) if any(b.startswith("Jingdezhen: ") for b in hand)]
    assert len(nantong) == 1 and len(jingdezhen) == 1 and nantong != jingdezhen


def test_hotpotqa_full_paragraphs_and_integer_ids(data_root: Path) -> None:
    records = json.loads((data_root / "hotpotqa" / "train.json").read_text(encoding="utf-8"))
    examples = load_examples("hotpotqa", "train")
    assert examples[145].id == "37"  # three re-distributed records carry integer ids
    alu = next(e for e in examples if e.id == "5a77ec115542992a6e59dff7")
    record = next(r for r in records if r["_id"] == "5a77ec115542992a6e59dff7")
    sentences = next(s for t, s in record["context"] if t == "Alû")
    assert len(sentences) == 4  # the supporting fact is sentence 3: a first-sentence-only copy loses it
    assert sum(_render("Alû", sentences) in c for c in alu.contexts) == 1
    assert sum(sentences[3].strip() in c for c in alu.contexts) == 1


@pytest.mark.parametrize("split", ["train", "dev"])
def test_hotpotqa_dealing_invariants(data_root: Path, split: str) -> None:
    records = json.loads((data_root / "hotpotqa" / f"{split}.json").read_text(encoding="utf-8"))
    examples = load_examples("hotpotqa", split, seed=3)
    assert len(records) == len(examples)
    for record, example in zip(records, examples, strict=True):
        _check_multihop_dealing(record, example)
        assert "['" not in example.contexts[0] + example.contexts[1], "no Python list repr in contexts"


def test_hotpotqa_two_paragraph_record_gives_one_each(data_root: Path) -> None:
    example = load_examples("hotpotqa", "dev")[27]
    assert example.id == "5abd259d55429924427fcf1a"
    assert [len(_blocks(c)) for c in example.contexts] == [1, 1]


def test_seeded_splits_are_reproducible_and_seed_dependent(data_root: Path) -> None:
    first = load_examples("hotpotqa", "train", seed=7)
    again = load_examples("hotpotqa", "train", seed=7)
    other = load_examples("hotpotqa", "train", seed=8)
    assert [e.model_dump() for e in first] == [e.model_dump() for e in again]
    changed = sum(a.contexts != b.contexts for a, b in zip(first, other, strict=True))
    assert changed > len(first) // 4
    assert load_examples("hotpotqa", "train", seed=7, limit=5) == first[:5]


def test_explicit_paths_file_and_dataset_dir(data_root: Path) -> None:
    by_file = load_examples("gsm8k", "dev", data_root / "gsm8k" / "dev.jsonl")
    by_dir = load_examples("gsm8k", "dev", data_root / "gsm8k")
    by_root = load_examples("gsm8k", "validation", data_root)
    assert by_file == by_dir == by_root
    assert by_root[0].split == "dev"


def test_default_data_root_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DITS_DATA", str(tmp_path))
    assert default_data_root() == tmp_path
    monkeypatch.delenv("DITS_DATA")
    monkeypatch.chdir(tmp_path)
    assert default_data_root() == tmp_path / "data"  # documented, and never outside the user's folders


# ------------------------------------------------------------------------------------------- fixtures


def test_2wiki_fixture() -> None:
    records = json.loads((FIXTURES / "2wiki" / "dev.json").read_text(encoding="utf-8"))
    examples = load_examples("2wiki", "dev", FIXTURES / "2wiki", seed=1)
    assert [e.id for e in examples] == [r["_id"] for r in records]
    for record, example in zip(records, examples, strict=True):
        _check_multihop_dealing(record, example)
        assert example.mode == "exchange" and example.metric == "f1" and example.choices == []
    assert examples[0].answers == ["Edmund Ashcombe"]
    assert examples[2].answers == ["Night Ferry To Oslo", "Night Ferry to Oslo"]  # aliases where present
    copper = [c.count("The Copper Road: ") for c in examples[1].contexts]
    assert sorted(copper) == [0, 1]  # the record lists this paragraph twice
    bridge = [
        len(
            [
                b
                for b in _blocks(c)
                if b.split(":")[0]
                in {"Night Ferry To Oslo", "The Orchard Wall", "Arne Solberg", "Margaret Fenwick"}
            ]
        )
        for c in examples[2].contexts
    ]
    assert bridge == [2, 2]  # four gold paragraphs, two each


def test_dealing_is_pinned_across_processes() -> None:
    """The deal depends on (seed, id) via a stable hash; a salted hash() would change it per run."""
    assert stable_hash("a", 1) == 9484037261928657086
    examples = load_examples("2wiki", "dev", FIXTURES / "2wiki", seed=0)
    titles = [[block.split(": ")[0] for block in _blocks(c)] for c in examples[0].contexts]
    assert titles == [
        ["Harbour Lights (1935 film)", "Peter Ashcombe"],
        ["Ingrid Walmsley", "The Silent Harbour", "Roger Hale"],
    ]


def test_2wiki_gold_assignment_varies_with_seed() -> None:
    owners = set()
    for seed in range(12):
        example = load_examples("2wiki", "dev", FIXTURES / "2wiki", seed=seed)[0]
        owners.add("Peter Ashcombe: " in example.contexts[0])
    assert owners == {True, False}


def test_triviaqa_fixture(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        examples = load_examples("triviaqa", "dev", FIXTURES / "triviaqa")
    assert [e.id for e in examples] == ["tc_1402", "qz_3311"]  # sfq_2207 has no evidence at all
    assert "skipped 1 records" in caplog.text
    lewis = examples[0]
    assert lewis.answers == [
        "Sinclair Lewis",
        "Harry Sinclair Lewis",
        "Lewis, Sinclair",
        "(Harry) Sinclair Lewis",
    ]
    blocks = [_blocks(c) for c in lewis.contexts]
    # 3 non-empty search descriptions + the lead of the one entity page whose evidence file exists
    assert [len(b) for b in blocks] == [2, 2]
    everything = "\n\n".join(lewis.contexts)
    assert everything.count("Sinclair Lewis: Harry Sinclair Lewis (February 7, 1885") == 1
    assert "Main Street (novel) - Wikipedia: Main Street is a satirical novel" in everything
    assert "Babbitt" not in everything  # empty description
    assert "Nobel Prize in Literature:" not in everything  # entity page without evidence file
    moon = examples[1]
    assert [len(_blocks(c)) for c in moon.contexts] == [2, 1]


def test_triviaqa_shuffle_depends_on_seed() -> None:
    layouts = {
        tuple(load_examples("triviaqa", "dev", FIXTURES / "triviaqa", seed=s)[0].contexts) for s in range(8)
    }
    assert len(layouts) > 1


def test_cbt_fixture() -> None:
    examples = load_examples("cbt", "dev", FIXTURES / "cbt")
    assert [e.id for e in examples] == [f"cbtest_CN_valid_2000ex:{i}" for i in range(3)]
    first = examples[0]
    assert first.answers == ["river"]
    alice, bob = (c.split("\n") for c in first.contexts)
    assert len(alice) == 10 and len(bob) == 10
    assert alice[0].startswith("Once upon a time there lived a miller")
    assert bob[0].startswith("He put some bran and lettuce")
    assert "`` Go and bathe in the XXXXX ," in first.question
    assert first.question.endswith(
        "Options: bag, boots, bran, corn, field, forest, mill, palace, rabbit, river"
    )
    assert examples[2].answers == ["laughter"]
    assert load_examples("cbt", "dev", FIXTURES / "cbt" / "cbtest_CN_valid_2000ex.txt") == examples


# ------------------------------------------------------------------------------------- malformed input


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_gsm8k_missing_marker_names_file_and_line(tmp_path: Path) -> None:
    good = json.dumps({"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"})
    bad = json.dumps({"question": "What is 3 + 3?", "answer": "3 + 3 = 6"})
    path = _write(tmp_path / "gsm8k" / "dev.jsonl", f"{good}\n\n{bad}\n")
    with pytest.raises(DatasetFormatError, match=r"dev\.jsonl, line 3: no '####' in answer") as info:
        load_examples("gsm8k", "dev", tmp_path)
    assert info.value.file == str(path) and info.value.record == "line 3"


def test_gsm8k_missing_field(tmp_path: Path) -> None:
    _write(tmp_path / "train.jsonl", json.dumps({"question": "Q?"}) + "\n")
    with pytest.raises(DatasetFormatError, match=r"train\.jsonl, line 1: missing field 'answer'"):
        load_examples("gsm8k", "train", tmp_path / "train.jsonl")


def test_arc_bad_answer_key(tmp_path: Path) -> None:
    record = {
        "id": "X1",
        "question": {
            "stem": "Which is a metal?",
            "choices": [
                {"text": t, "label": lab}
                for t, lab in zip(["iron", "wood", "glass", "wool"], "ABCD", strict=True)
            ],
        },
        "answerKey": "E",
    }
    _write(tmp_path / "ARC-Challenge-Dev.jsonl", json.dumps(record) + "\n")
    with pytest.raises(
        DatasetFormatError, match=r"line 1: answerKey 'E' not among labels \['A', 'B', 'C', 'D'\]"
    ):
        load_examples("arc", "dev", tmp_path)


def test_mmlu_bad_row_line_number_counts_embedded_newlines(tmp_path: Path) -> None:
    path = tmp_path / "val" / "anatomy_val.csv"
    path.parent.mkdir(parents=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\r\n")
        writer.writerow(["First line\nsecond line\nthird line", "a", "b", "c", "d", "B"])
        writer.writerow(["Too short", "a", "b", "c", "D"])
    with pytest.raises(DatasetFormatError, match=r"anatomy_val\.csv, line 4: expected 6 columns"):
        load_examples("mmlu", "dev", tmp_path)
    with path.open("w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerow(["Q", "a", "b", "c", "d", "F"])
    with pytest.raises(DatasetFormatError, match=r"line 1: answer 'F' is not one of"):
        load_examples("mmlu", "val", tmp_path / "val")


def test_hotpotqa_bad_record_index(tmp_path: Path) -> None:
    good = {
        "_id": "a",
        "question": "Q?",
        "answer": "x",
        "supporting_facts": [["T", 0]],
        "context": [["T", ["s"]]],
    }
    missing = {k: v for k, v in good.items() if k != "answer"} | {"_id": "b"}
    unknown_title = good | {"_id": "c", "supporting_facts": [["Nope", 0]]}
    _write(tmp_path / "dev.json", json.dumps([good, missing]))
    with pytest.raises(DatasetFormatError, match=r"dev\.json, record 1: missing field 'answer'"):
        load_examples("hotpotqa", "dev", tmp_path / "dev.json")
    _write(tmp_path / "dev.json", json.dumps([good, good | {"_id": "d"}, unknown_title]))
    with pytest.raises(DatasetFormatError, match=r"record 2: supporting fact title 'Nope' is not among"):
        load_examples("hotpotqa", "dev", tmp_path / "dev.json")
    _write(tmp_path / "dev.json", '[{"_id": "a",\n "question": }]')
    with pytest.raises(DatasetFormatError, match=r"dev\.json, line 2: invalid JSON"):
        load_examples("hotpotqa", "dev", tmp_path / "dev.json")


def test_cbt_bad_numbering_and_missing_answer(tmp_path: Path) -> None:
    lines = [f"{i} Sentence {i} ." for i in range(1, 21)]
    story = "\n".join(lines) + "\n21 The XXXXX sat .\tcat\t\tcat|dog\n\n"
    bad_number = story + "\n".join([*lines[:4], "6 Skipped five ."]) + "\n"
    path = _write(tmp_path / "cbtest_CN_valid_2000ex.txt", bad_number)
    with pytest.raises(
        DatasetFormatError, match=r"valid_2000ex\.txt, line 27: expected sentence number 5, got '6'"
    ):
        load_examples("cbt", "dev", path)
    _write(path, story + story.replace("\tcat\t\tcat|dog", "\tbird\t\tcat|dog"))
    with pytest.raises(DatasetFormatError, match=r"line 43: answer 'bird' is not among the candidates"):
        load_examples("cbt", "dev", path)


def test_math_missing_box(tmp_path: Path) -> None:
    _write(
        tmp_path / "dev" / "algebra" / "1.json",
        json.dumps({"problem": "1+1?", "solution": "It is $\\boxed{2}$."}),
    )
    _write(tmp_path / "dev" / "algebra" / "12.json", json.dumps({"problem": "2+2?", "solution": "It is 4."}))
    with pytest.raises(
        DatasetFormatError, match=r"12\.json, problem algebra/12: no \\boxed\{\.\.\.\} answer"
    ):
        load_examples("math", "dev", tmp_path)
    assert load_examples("math", "dev", tmp_path, limit=1)[0].answers == ["2"]


# ---------------------------------------------------------------------------------- registry and hub


def test_registry_and_errors(tmp_path: Path) -> None:
    assert set(DATASETS) >= {
        "hotpotqa",
        "2wiki",
        "triviaqa",
        "cbt",
        "gsm8k",
        "math",
        "arc",
        "mmlu",
        "facts",
        "arith",
    }
    with pytest.raises(KeyError, match=r"unknown task\.dataset 'squad'"):
        load_examples("squad", "train")
    with pytest.raises(ValueError, match="no split 'fewshot'"):
        load_examples("gsm8k", "fewshot", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"no gsm8k dev data: looked for dev\.jsonl"):
        load_examples("gsm8k", "dev", tmp_path)
    with pytest.raises(ValueError, match="pass limit=N"):
        load_examples("facts", "train")
    assert len(load_examples("facts", "train", limit=3)) == 3


def test_hub_fallback_converts_rows(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DITS_DATA", str(tmp_path))
    calls: list[tuple[str, str | None, str]] = []
    rows = {
        "allenai/ai2_arc": [
            {
                "id": "Q1",
                "question": "Which is a metal?",
                "choices": {"text": ["wood", "iron", "wool"], "label": ["1", "2", "3"]},
                "answerKey": "2",
            }
        ],
        "cais/mmlu": [
            {"question": f"Q{i}", "subject": "anatomy", "choices": ["w", "x", "y", "z"], "answer": i % 4}
            for i in range(4)
        ],
        "hotpot_qa": [
            {
                "id": f"h{i}",
                "question": "Q?",
                "answer": "A",
                "type": "bridge",
                "level": "easy",
                "supporting_facts": {"title": ["T1", "T2"], "sent_id": [0, 0]},
                "context": {"title": ["T1", "D1", "T2"], "sentences": [["One."], ["Dis."], ["Two."]]},
            }
            for i in range(4)
        ],
    }

    def fake_load_dataset(path: str, config: str | None = None, *, split: str) -> list[dict]:
        calls.append((path, config, split))
        return rows[path]

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    arc = load_examples("arc", "dev")
    assert calls[-1] == ("allenai/ai2_arc", "ARC-Challenge", "validation")
    assert arc[0].answers == ["B", "iron"] and arc[0].choices == ["wood", "iron", "wool"]
    mmlu = load_examples("mmlu", "test")
    assert calls[-1] == ("cais/mmlu", "all", "test")
    assert [e.question for e in mmlu] == ["Q1", "Q3"]  # the odd rows; train takes the even ones
    assert [e.answers[0] for e in mmlu] == ["B", "D"]
    hotpot = load_examples("hotpotqa", "dev")
    assert calls[-1] == ("hotpot_qa", "distractor", "validation")
    assert [e.id for e in hotpot] == ["h0", "h2"]
    assert sorted("\n\n".join(hotpot[0].contexts).split("\n\n")) == ["D1: Dis.", "T1: One.", "T2: Two."]


def test_hub_failure_is_a_clear_file_not_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DITS_DATA", str(tmp_path))
    monkeypatch.setenv("DITS_HELDOUT_DATA", str(tmp_path / "heldout"))

    def offline(spec: object, split: str) -> list:
        raise ConnectionError("network is unreachable")

    monkeypatch.setattr(loaders, "_hub_items", offline)
    with pytest.raises(
        FileNotFoundError, match=r"no gsm8k test data: .*the hub failed too: network is unreachable"
    ):
        load_examples("gsm8k", "test")


def test_heldout_root_serves_test_split(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DITS_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("DITS_HELDOUT_DATA", str(tmp_path / "heldout"))
    line = json.dumps({"question": "What is 5 - 2?", "answer": "5 - 2 = 3\n#### 3"})
    _write(tmp_path / "heldout" / "gsm8k" / "test.jsonl", line + "\n")
    (example,) = load_examples("gsm8k", "test")
    assert example.answers == ["3"] and example.split == "test"
    assert re.fullmatch(r"gsm8k-[0-9a-f]{12}", example.id)
