"""Task metrics: SQuAD token F1 / exact match, numeric match, choice match, MATH equivalence.

docs/design.md section 5. Two reference bugs are guarded against here: F1 was computed over model sub-word
tokens after ``strip("m=")`` (which eats the leading "m" of "mammal"), and exact match compared a string
with a list of aliases (always false). MATH answers are compared with math-verify's LaTeX parser only:
its plain-expression parser goes through ``sympy.parse_expr``, i.e. ``eval``, which must never see model
output. Every symbolic comparison runs under a wall-clock limit.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import re
import signal
import string
import threading
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from fractions import Fraction
from multiprocessing.pool import Pool
from typing import TypeVar

from dits.tasks.example import Example, choice_letter

T = TypeVar("T")
logger = logging.getLogger(__name__)

MATH_TIMEOUT_S = 5.0
"""Default wall-clock limit of one :func:`math_equiv` call."""

_WORKER_GRACE_S = 20.0
"""Extra time the caller waits on the worker process (its own start-up, imports) before killing it."""

# ----------------------------------------------------------------------------------------------- F1 / EM

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _is_punctuation(char: str) -> bool:
    return char in string.punctuation or unicodedata.category(char).startswith("P")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower-case, drop punctuation, drop the articles a/an/the, squeeze spaces."""
    text = "".join(char for char in text.lower() if not _is_punctuation(char))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _aliases(gold: str | Sequence[str]) -> list[str]:
    """Gold answers as a list; a bare string is one alias, never a sequence of characters."""
    aliases = [gold] if isinstance(gold, str) else list(gold)
    if not aliases:
        raise ValueError("no gold answer given")
    return aliases


_YES_NO = frozenset({"yes", "no", "noanswer"})


def _f1_single(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    # The official HotpotQA (and 2WikiMultihopQA) rule: a yes/no answer is all or nothing, so "no" earns no
    # partial credit against "no, he did not" and "yes it is" none against "yes".
    if (pred in _YES_NO or ref in _YES_NO) and pred != ref:
        return 0.0
    pred_tokens, gold_tokens = pred.split(), ref.split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, gold: str | Sequence[str]) -> float:
    """Token F1 between the normalised prediction and gold, maximised over the gold aliases."""
    return max(_f1_single(prediction, alias) for alias in _aliases(gold))


def exact_match(prediction: str, gold: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold alias."""
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(alias) for alias in _aliases(gold)))


# ------------------------------------------------------------------------------------------------ numeric

_NUMBER = re.compile(
    r"(?<![\w.])(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+)(?:\s*/\s*(\d+)(?![\w.]))?(?![\w])"
)
_SIMPLE_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*(-?\d+)\s*\}\s*\{\s*(\d+)\s*\}")


def parse_number(text: str) -> Fraction | None:
    """The value of the last number in ``text``: ``$1,080.00`` -> 1080, ``50%`` -> 50, ``3/4`` -> 3/4.

    Thousands separators must be well formed (``1,080``; ``1,08`` reads as two numbers). Returns
    ``None`` if the text holds no number.
    """
    cleaned = text.replace("−", "-").replace("\\$", "").replace("\\%", "").replace("\\,", ",")
    cleaned = _SIMPLE_FRAC.sub(r"\1/\2", cleaned)
    matches = _NUMBER.findall(cleaned)
    if not matches:
        return None
    whole, denominator = matches[-1]
    value = Fraction(whole.replace(",", ""))
    if denominator:
        if int(denominator) == 0:
            return None
        value /= int(denominator)
    return value


def numeric_match(prediction: str, gold: str) -> bool:
    """Whether the last number of the prediction equals the gold number by value (``72.0`` == ``72``)."""
    gold_value = parse_number(gold)
    if gold_value is None:
        raise ValueError(f"gold answer {gold!r} holds no number")
    predicted = parse_number(prediction)
    return predicted is not None and predicted == gold_value


# ------------------------------------------------------------------------------------------------- choice

_LETTER_ONLY = re.compile(r"^(?:option|choice|answer)?\s*[(\[]?\s*([A-Za-z])\s*[)\].:]?$", re.IGNORECASE)
_LETTER_THEN_TEXT = re.compile(r"^[(\[]?([A-Z])[)\].:]\s+\S")


def predicted_choice(prediction: str, choices: Sequence[str]) -> str | None:
    """The option letter a prediction names: ``B``, ``(b)``, ``B. dry palms``, or an option's exact text."""
    text = prediction.strip()
    letters = [choice_letter(i) for i in range(len(choices))]
    normalized = normalize_answer(text)
    by_text = [
        letter
        for letter, option in zip(letters, choices, strict=True)
        if normalized and normalize_answer(option) == normalized
    ]
    if len(by_text) == 1:
        return by_text[0]
    for pattern in (_LETTER_ONLY, _LETTER_THEN_TEXT):
        match = pattern.match(text)
        if match and match.group(1).upper() in letters:
            return match.group(1).upper()
    return None


def choice_match(prediction: str, gold_letter: str, choices: Sequence[str]) -> bool:
    """Whether the prediction names the gold option, by letter or by the option's text."""
    return predicted_choice(prediction, choices) == gold_letter.strip().upper()


# --------------------------------------------------------------------------------------------------- math

_LATEX_NOISE = re.compile(r"\\left|\\right|\\!|\\,|\\;|\\ |\s|\$|\^\{?\\circ\}?|\\displaystyle")
_HUGE_NUMBER = re.compile(r"\d\s*\^\s*\{?\s*\d+\s*\}?\s*\^|\^\s*\{?\s*-?\d{5,}|\d{4,}\s*!")
"""Integer power towers, 5-digit exponents, big factorials: sympy would evaluate them in C, out of
reach of any signal."""


def _latex_key(latex: str) -> str:
    """A cheap canonical form for the string fast path of :func:`math_equiv`."""
    key = _LATEX_NOISE.sub("", latex)
    key = re.sub(r"\\[dt]frac", r"\\frac", key)
    key = re.sub(r"\\text\{([^{}]*)\}", r"\1", key)
    return key.rstrip(".")


class _Deadline(BaseException):
    """Raised by SIGALRM; a BaseException so that math-verify's ``except Exception`` cannot swallow it."""


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns when its own signal timeouts are off; here they are replaced, not missing."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


def call_with_deadline(seconds: float, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` interrupted after ``seconds`` of wall-clock time (raises :class:`TimeoutError`).

    Uses ``SIGALRM``, so only from the main thread. An alarm that was already pending (an outer
    deadline) is re-armed afterwards with what is left of it.
    """

    def on_alarm(signum: int, frame: object) -> None:
        raise _Deadline

    started = time.monotonic()
    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    previous_timer, _ = signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        return fn(*args)
    except _Deadline:
        raise TimeoutError(f"gave up after {seconds:g} s") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_timer > 0:
            signal.setitimer(signal.ITIMER_REAL, max(previous_timer - (time.monotonic() - started), 1e-3))


def _verify_untimed(gold: str, prediction: str) -> bool:
    """math-verify on LaTeX only (no ``parse_expr``, i.e. no ``eval``); the caller limits its time."""
    from math_verify import parse, verify
    from math_verify.parser import LatexExtractionConfig

    config = [LatexExtractionConfig()]

    def as_latex(answer: str) -> str:
        return answer if "\\boxed" in answer else f"$\\boxed{{{answer}}}$"

    gold_parsed = parse(as_latex(gold), extraction_config=config, parsing_timeout=None)
    pred_parsed = parse(as_latex(prediction), extraction_config=config, parsing_timeout=None)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _verify_in_main_thread(gold: str, prediction: str, timeout_s: float) -> bool:
    try:
        return call_with_deadline(timeout_s, _verify_untimed, gold, prediction)
    except TimeoutError:
        logger.warning("math_equiv timed out after %.1f s on gold %r", timeout_s, gold[:80])
        return False


_pool: Pool | None = None
_pool_lock = threading.Lock()


def _close_pool() -> None:
    global _pool
    if _pool is not None:
        _pool.terminate()
        _pool = None


atexit.register(_close_pool)


def _verify_in_worker(gold: str, prediction: str, timeout_s: float) -> bool:
    """Off the main thread SIGALRM is unavailable: run in a worker process that can be killed."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = multiprocessing.get_context("spawn").Pool(processes=1)
        pending = _pool.apply_async(_verify_in_main_thread, (gold, prediction, timeout_s))
        try:
            return bool(pending.get(timeout=timeout_s + _WORKER_GRACE_S))
        except multiprocessing.TimeoutError:
            logger.warning("math_equiv worker hung past %.1f s; restarting it", timeout_s + _WORKER_GRACE_S)
            _close_pool()
            return False


def math_equiv(gold: str, prediction: str, timeout_s: float = MATH_TIMEOUT_S) -> bool:
    """Whether ``prediction`` is mathematically equivalent to ``gold`` (both LaTeX, e.g. boxed contents).

    Equal canonical strings match without sympy. Otherwise math-verify compares them symbolically
    within ``timeout_s`` seconds of wall-clock time: in-process under SIGALRM on the main thread, in a
    killable worker process from other threads. Power towers (``9^{9^9}``), which sympy would evaluate
    in C where no signal reaches, are refused up front. A timeout counts as not equivalent.
    """
    if not prediction.strip():
        return False
    if _latex_key(gold) == _latex_key(prediction):
        return True
    if _HUGE_NUMBER.search(prediction) or len(prediction) > 2000:
        return False
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        return _verify_in_main_thread(gold, prediction, timeout_s)
    return _verify_in_worker(gold, prediction, timeout_s)


# --------------------------------------------------------------------------------------------- dispatcher


def score_answer(example: Example, prediction: str | None) -> float:
    """The task metric of one parsed answer, in [0, 1]; ``None`` (no answer given) scores 0."""
    if prediction is None or not prediction.strip():
        return 0.0
    if example.metric == "f1":
        return f1_score(prediction, example.answers)
    if example.metric == "numeric":
        return float(any(numeric_match(prediction, gold) for gold in example.answers))
    if example.metric == "choice":
        return float(choice_match(prediction, example.answers[0], example.choices))
    return float(math_equiv(example.answers[0], prediction))


def answers_agree(example: Example, first: str, second: str) -> bool:
    """Whether two parsed answers say the same thing under the example's metric (the stop rule's test).

    Both answers are model output, so neither is trusted as gold: choice compares the letters both name,
    numeric their values, math their symbolic equivalence (both screened), f1 their normalised text.
    """
    if not first.strip() or not second.strip():
        return False
    if example.metric == "choice":
        letter = predicted_choice(first, example.choices)
        return letter is not None and letter == predicted_choice(second, example.choices)
    if example.metric == "numeric":
        value = parse_number(first)
        return value is not None and value == parse_number(second)
    if example.metric == "math":
        if _HUGE_NUMBER.search(second) or len(second) > 2000:
            return False
        return math_equiv(second, first)
    return normalize_answer(first) == normalize_answer(second)
