"""Reading the answer out of an utterance.

The protocol's contract (docs/design.md section 4) is strict: an answer is the content of the *last*
``<A>...</A>`` tag, or for MATH the last balanced ``\\boxed{...}``. :func:`parse_answer` implements exactly
that. Small models often answer in plain prose instead; :func:`fallback_answer` is a separate, documented
heuristic so that the protocol decides explicitly whether an untagged answer counts.
"""

from __future__ import annotations

import re

from dits.tasks.example import Example, choice_letter

_TAG = re.compile(r"<\s*a\s*>(.*?)<\s*/\s*a\s*>", re.IGNORECASE | re.DOTALL)
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_NUMBER = re.compile(r"(?<![\w.])[-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\w])|(?<![\w.])[-−]?\.\d+")
_ANSWER_PHRASE = re.compile(
    r"(?:final answer|the answer|answer)\s*(?:is|:|=)\s*(?::\s*)?(.+?)(?:(?<!\d)\.(?!\d)|\n|$)",
    re.IGNORECASE,
)
_SPEAKER = re.compile(r"^\s*(?:Alice|Bob)\s*:\s*")


def extract_tagged(text: str) -> str | None:
    """Content of the last ``<A>...</A>`` (case-insensitive, spaces allowed inside the tags), stripped."""
    matches = _TAG.findall(text)
    if not matches:
        return None
    answer = matches[-1].strip()
    return answer or None


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """The group ``{...}`` opening at ``text[start]`` and the index after it; ``\\{``/``\\}`` are literal."""
    depth = 0
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` with balanced braces.

    Also reads ``\\boxed {17}`` (space before the brace) and the brace-less ``\\boxed 5`` (up to the next
    space or ``$``). An unbalanced last box is skipped in favour of an earlier complete one.
    """
    for match in reversed(list(_BOX_COMMAND.finditer(text))):
        rest = match.end()
        while rest < len(text) and text[rest] == " ":
            rest += 1
        if rest < len(text) and text[rest] == "{":
            group = _braced(text, rest)
            if group is not None and group[0].strip():
                return group[0].strip()
            continue
        token = re.match(r"[^\s${}]+", text[rest:])
        if token:
            value = token.group(0)
            return value[:-1] if len(value) > 1 and value[-1] in ".,;" else value
    return None


def parse_answer(text: str, example: Example) -> str | None:
    """The answer the protocol reads from an utterance, or ``None`` if it gave none.

    MATH: the last ``\\boxed{}`` anywhere in the utterance, else the content of the last ``<A>`` tag.
    Everything else: the content of the last ``<A>`` tag.
    """
    if example.metric == "math":
        boxed = extract_boxed(text)
        if boxed is not None:
            return boxed
    return extract_tagged(text)


def _answer_phrase(text: str) -> str | None:
    matches = _ANSWER_PHRASE.findall(text)
    if not matches:
        return None
    value = matches[-1].strip().strip("*").strip()
    return value or None


def last_number(text: str) -> str | None:
    """The last number written in ``text`` (thousands separators allowed), as written."""
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _choice_fallback(text: str, example: Example) -> str | None:
    letters = [choice_letter(i) for i in range(len(example.choices))]
    options = "".join(letters)
    phrase = re.findall(rf"(?i:answer)\s*(?:is|:)\s*\(?([{options}])\b", text)
    if phrase:
        return phrase[-1]
    lone = re.findall(rf"^\s*\(?([{options}])[).:]?\s*$", text, re.MULTILINE)
    if lone:
        return lone[-1]
    lowered = text.lower()
    named = [
        letter
        for letter, option in zip(letters, example.choices, strict=True)
        if option.strip() and option.strip().lower() in lowered
    ]
    return named[0] if len(named) == 1 else None


def fallback_answer(text: str, example: Example) -> str | None:
    """A best-effort answer from an utterance without an ``<A>`` tag (``None`` if nothing plausible).

    - choice: "answer is (B)" / "answer: B", else a line holding only an option letter, else the one
      option whose text appears verbatim (ambiguous mentions give ``None``);
    - numeric: "answer is N" if present, else the last number in the text;
    - math: the last ``\\boxed{}``, else "answer is X", else the last number;
    - f1: "answer is X" up to the end of the sentence, else the last non-empty line (without a leading
      ``Alice:``/``Bob:``), which earns partial F1 credit only through overlapping words.
    """
    if not text.strip():
        return None
    if example.metric == "choice":
        return _choice_fallback(text, example)
    if example.metric == "numeric":
        phrase = _answer_phrase(text)
        number = last_number(phrase) if phrase else None
        return number if number is not None else last_number(text)
    if example.metric == "math":
        return extract_boxed(text) or _answer_phrase(text) or last_number(text)
    phrase = _answer_phrase(text)
    if phrase:
        return phrase
    lines = [_SPEAKER.sub("", line).strip() for line in text.strip().splitlines()]
    lines = [line for line in lines if line]
    return lines[-1] if lines else None
