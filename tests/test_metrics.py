"""Metrics and answer parsing against hand-worked cases."""

from __future__ import annotations

import threading
import time

import pytest
from pydantic import ValidationError

from dits.tasks.answers import extract_boxed, extract_tagged, fallback_answer, last_number, parse_answer
from dits.tasks.example import Example
from dits.tasks.metrics import (
    answers_agree,
    call_with_deadline,
    choice_match,
    exact_match,
    f1_score,
    math_equiv,
    normalize_answer,
    numeric_match,
    parse_number,
    score_answer,
)


def _example(metric: str, answers: list[str], choices: list[str] | None = None) -> Example:
    mode = "exchange" if metric == "f1" else "debate"
    contexts = ["Alice's notes", "Bob's notes"] if mode == "exchange" else ["", ""]
    return Example(id="t1", dataset="test", split="dev", question="Q?", answers=answers, contexts=contexts,
                   choices=choices or [], mode=mode, metric=metric)  # fmt: skip


# ------------------------------------------------------------------------------------------- F1 and EM


def test_normalisation_keeps_leading_m() -> None:
    assert normalize_answer("The Mammal!") == "mammal"
    assert normalize_answer("  Minnesota, U.S.A. ") == "minnesota usa"
    assert normalize_answer("an apple and the tree") == "apple and tree"
    assert normalize_answer("“Quoted” — text…") == "quoted text"


def test_f1_hand_worked() -> None:
    # pred tokens [cat, sat, on, mat], gold [cat, on, mat]: P = 3/4, R = 1, F1 = 6/7
    assert f1_score("the cat sat on mat", "cat on the mat") == pytest.approx(6 / 7)
    # pred [mammals, of, minnesota], gold [minnesota]: P = 1/3, R = 1, F1 = 1/2
    assert f1_score("mammals of Minnesota", "Minnesota") == pytest.approx(0.5)
    assert f1_score("mammal", "mammal") == 1.0
    assert f1_score("Minnesota", "minnesota.") == 1.0
    assert f1_score("the", "the") == 1.0  # both normalise to empty
    assert f1_score("the", "Paris") == 0.0
    assert f1_score("dog dog", "dog") == pytest.approx(2 / 3)  # P = 1/2 (counts are clipped), R = 1


def test_f1_and_em_take_the_best_alias() -> None:
    aliases = ["Sinclair Lewis", "Harry Sinclair Lewis", "Lewis, Sinclair"]
    assert f1_score("Harry Sinclair Lewis", aliases) == 1.0
    assert f1_score("Harry Lewis", aliases) == pytest.approx(2 * (2 / 2 * 2 / 3) / (1 + 2 / 3))
    assert exact_match("lewis sinclair", aliases) == 1.0
    assert exact_match("Sinclair", aliases) == 0.0


def test_a_bare_string_gold_is_one_alias_not_characters() -> None:
    assert exact_match("b", "bcd") == 0.0
    assert f1_score("b", "bcd") == 0.0
    with pytest.raises(ValueError, match="no gold"):
        f1_score("x", [])


# ------------------------------------------------------------------------------------------- numeric


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("1,080", "1080", True),
        ("$1,080.00", "1080", True),
        ("72.0", "72", True),
        ("0.50", "0.5", True),
        (".5", "0.5", True),
        ("50%", "50", True),
        ("\\$18", "18", True),
        ("The answer is 18 apples", "18", True),
        ("109,200,000", "109200000", True),
        ("−3", "-3", True),
        ("3", "-3", False),
        ("1,08", "108", False),
        ("17", "71", False),
        ("72.5", "72", False),
        ("no number here", "4", False),
    ],
)
def test_numeric_match(prediction: str, gold: str, expected: bool) -> None:
    assert numeric_match(prediction, gold) is expected


def test_parse_number_values() -> None:
    assert parse_number("It costs $2,500.") == 2500
    assert parse_number("3/4 of them") * 4 == 3
    assert parse_number("\\frac{1}{2}") * 2 == 1
    assert parse_number("step 1 gives 5, step 2 gives 12") == 12
    assert parse_number("nothing") is None
    with pytest.raises(ValueError, match="holds no number"):
        numeric_match("4", "four")


# -------------------------------------------------------------------------------------------- choice

CHOICES = ["dry palms", "wet palms", "palms covered with oil", "palms covered with lotion"]


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("A", True),
        ("a", True),
        ("(A)", True),
        ("A.", True),
        ("Option A", True),
        ("A. dry palms", True),
        ("dry palms", True),
        ("Dry palms.", True),
        ("B", False),
        ("wet palms", False),
        ("E", False),
        ("A or B", False),
    ],
)
def test_choice_match(prediction: str, expected: bool) -> None:
    assert choice_match(prediction, "A", CHOICES) is expected


def test_choice_text_that_starts_with_a_letter_word() -> None:
    choices = ["a rock", "a plant", "an animal"]  # option text "a plant" must not read as letter A
    assert choice_match("a plant", "B", choices)
    assert not choice_match("a plant", "A", choices)


# ---------------------------------------------------------------------------------------------- math


@pytest.mark.parametrize(
    ("gold", "prediction", "expected"),
    [
        ("\\frac{1}{2}", "0.5", True),
        ("\\frac{1}{2}", "\\dfrac12", True),
        ("\\frac{1}{2}", "1/2", True),
        ("0.5", "\\frac{1}{2}", True),
        ("\\frac{1}{3}", "0.5", False),
        ("\\frac{3 + \\sqrt{5}}{2}", "\\frac{3+\\sqrt5}{2}", True),
        ("\\frac{3 + \\sqrt{5}}{2}", "\\frac{3-\\sqrt5}{2}", False),
        ("x^2+2x+1", "(x+1)^2", True),
        (
            "\\begin{pmatrix} 0 & 0 \\\\ 0 & 0 \\end{pmatrix}",
            "\\begin{pmatrix}0&0\\\\0&0\\end{pmatrix}",
            True,
        ),
        ("1 + \\sqrt{2}, 1 - \\sqrt{2}", "1-\\sqrt2, 1+\\sqrt2", True),
        ("\\text{(C)}", "(C)", True),
        ("17", "17", True),
        ("17", "", False),
    ],
)
def test_math_equiv(gold: str, prediction: str, expected: bool) -> None:
    assert math_equiv(gold, prediction) is expected


def test_math_equiv_never_routes_through_parse_expr(monkeypatch: pytest.MonkeyPatch) -> None:
    import math_verify.parser

    calls: list[str] = []
    original = math_verify.parser.parse_expr_cached
    monkeypatch.setattr(math_verify.parser, "parse_expr_cached", lambda s: (calls.append(s), original(s))[1])
    assert math_equiv("2", "1+1")
    assert not math_equiv("2", "The result is 1+1")  # plain-text expressions are not evaluated
    assert calls == []


def test_math_equiv_refuses_power_towers_fast() -> None:
    started = time.monotonic()
    assert not math_equiv("9", "9^{9^{9}}")
    assert not math_equiv("1", "10^{100000}")
    assert time.monotonic() - started < 1.0


def test_deadline_interrupts_and_restores_outer_alarm() -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        call_with_deadline(0.2, time.sleep, 5)
    assert time.monotonic() - started < 1.5
    # nested: the inner call finishes, the outer deadline must still fire
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        call_with_deadline(0.4, lambda: (call_with_deadline(0.1, lambda: None), time.sleep(5)))
    assert time.monotonic() - started < 1.5


def test_math_equiv_from_a_worker_thread() -> None:
    results: list[bool] = []

    def run() -> None:
        results.extend([math_equiv("\\frac{1}{2}", "0.5"), math_equiv("\\frac{1}{2}", "0.25")])

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=60)
    assert results == [True, False]


# ---------------------------------------------------------------------------------------- dispatcher


def test_score_answer_dispatch() -> None:
    qa = _example("f1", ["Sinclair Lewis", "Harry Sinclair Lewis"])
    assert score_answer(qa, "harry sinclair lewis") == 1.0
    assert score_answer(qa, "Lewis") == pytest.approx(2 / 3)
    assert score_answer(qa, None) == 0.0
    assert score_answer(qa, "   ") == 0.0
    gsm = _example("numeric", ["1080"])
    assert score_answer(gsm, "$1,080") == 1.0
    assert score_answer(gsm, "1008") == 0.0
    arc = _example("choice", ["B", "wet palms"], CHOICES)
    assert score_answer(arc, "(B)") == 1.0
    assert score_answer(arc, "wet palms") == 1.0
    assert score_answer(arc, "A") == 0.0
    math = _example("math", ["\\frac{1}{2}"])
    assert score_answer(math, "0.5") == 1.0
    assert score_answer(math, "2") == 0.0


def test_answers_agree_by_metric() -> None:
    arc = _example("choice", ["B", "wet palms"], CHOICES)
    assert answers_agree(arc, "b", "(B) wet palms")
    assert answers_agree(arc, "wet palms", "B")
    assert not answers_agree(arc, "A", "B")
    assert not answers_agree(arc, "maybe", "unsure")  # two unparseable answers do not agree
    gsm = _example("numeric", ["1080"])
    assert answers_agree(gsm, "1,080", "$1080.00")
    assert not answers_agree(gsm, "1080", "1008")
    math = _example("math", ["1"])
    assert answers_agree(math, "\\frac{2}{4}", "0.5")
    assert not answers_agree(math, "9", "9^{9^{9}}")
    qa = _example("f1", ["Paris"])
    assert answers_agree(qa, "The Eiffel Tower.", "eiffel tower")
    assert not answers_agree(qa, "Paris, France", "Paris")
    assert not answers_agree(qa, "", "")


def test_example_validation() -> None:
    with pytest.raises(ValidationError, match="one string per agent"):
        Example(id="x", dataset="d", split="dev", question="Q", answers=["a"], contexts=["only one"],
                mode="exchange", metric="f1")  # fmt: skip
    with pytest.raises(ValidationError, match="no private context"):
        Example(id="x", dataset="d", split="dev", question="Q", answers=["1"], contexts=["x", ""],
                mode="debate", metric="numeric")  # fmt: skip
    with pytest.raises(ValidationError, match="not an option letter"):
        _example("choice", ["E"], CHOICES)
    with pytest.raises(ValidationError, match="non-empty gold"):
        _example("f1", [])
    example = _example("choice", ["C", "palms covered with oil"], CHOICES)
    assert Example.model_validate_json(example.model_dump_json()) == example
    with pytest.raises(ValidationError):
        example.id = "changed"  # type: ignore[misc]


# ------------------------------------------------------------------------------------------- parsing


def test_extract_tagged_takes_the_last_tag() -> None:
    assert extract_tagged("I think <A>Paris</A>. No wait: < a > Lyon </ A >") == "Lyon"
    assert extract_tagged("<A>\n42\n</A>") == "42"
    assert extract_tagged("<A></A>") is None
    assert extract_tagged("The answer is Paris.") is None
    assert extract_tagged("<A>unclosed") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so $\\boxed{\\frac{3 + \\sqrt{5}}{2}}$.", "\\frac{3 + \\sqrt{5}}{2}"),
        ("first $\\boxed{1}$ then $\\boxed{2}$", "2"),
        ("$\\boxed {17}.$$", "17"),
        ("the answer is $\\boxed 5$.", "5"),
        ("hence \\boxed 12.", "12"),
        ("\\fbox{3}", "3"),
        ("$\\boxed{\\{1,2\\}}$", "\\{1,2\\}"),
        ("$\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}$", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
        ("good $\\boxed{7}$ then broken \\boxed{8", "7"),
        ("\\boxedfoo{3}", None),
        ("no box", None),
    ],
)
def test_extract_boxed(text: str, expected: str | None) -> None:
    assert extract_boxed(text) == expected


def test_parse_answer_by_metric() -> None:
    math = _example("math", ["2"])
    assert parse_answer("<A>3</A> so $\\boxed{2}$", math) == "2"
    assert parse_answer("<A>3</A>", math) == "3"
    qa = _example("f1", ["Paris"])
    assert parse_answer("$\\boxed{2}$ <A>Paris</A>", qa) == "Paris"
    assert parse_answer("Paris", qa) is None


def test_fallback_answer() -> None:
    arc = _example("choice", ["B", "wet palms"], CHOICES)
    assert fallback_answer("I believe the answer is (C) because oil heats.", arc) == "C"
    assert fallback_answer("Let me think.\nB\n", arc) == "B"
    assert fallback_answer("Rubbing wet palms gives more heat.", arc) == "B"
    assert fallback_answer("A plant needs light.", arc) is None  # the article "A" is not a letter answer
    assert fallback_answer("palms, palms", arc) is None
    gsm = _example("numeric", ["72"])
    assert fallback_answer("48 + 24 = 72 clips. The answer is 72.", gsm) == "72"
    assert fallback_answer("She sold 48 and then 1,080 more", gsm) == "1,080"
    qa = _example("f1", ["Melbrook"])
    assert fallback_answer("Alice: Zorvath lives in Melbrook.", qa) == "Zorvath lives in Melbrook."
    assert fallback_answer("Hmm.\nThe answer is Melbrook. Done", qa) == "Melbrook"
    math = _example("math", ["5"])
    assert fallback_answer("so x = 5", math) == "5"
    assert fallback_answer("   ", qa) is None
    assert last_number("between 3.5 and 4.25.") == "4.25"
