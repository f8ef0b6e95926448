"""Information-exchange datasets: HotpotQA, 2WikiMultiHopQA, TriviaQA (rc), CBT.

Each record becomes an :class:`Example` whose context is split between Alice and Bob as docs/design.md
section 4 describes, so that neither agent can answer alone. Contexts are plain text: one
``Title: sentence sentence ...`` paragraph per block, blocks separated by a blank line. All randomness
comes from :func:`example_rng` (seed, example id), so a split is the same in every run, whatever the
load order or limit.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

from dits.tasks.example import Example
from dits.tasks.files import (
    DatasetFormatError,
    RecordError,
    check_utf8,
    example_rng,
    open_text,
    read_text,
    require,
    require_id,
    require_text,
)

WIKI_SNIPPET_CHARS = 800
"""TriviaQA entity pages are whole Wikipedia articles; an agent gets the lead paragraphs up to this size."""


@dataclass(frozen=True)
class Paragraph:
    """One titled context paragraph of HotpotQA / 2Wiki."""

    title: str
    sentences: tuple[str, ...]

    def render(self) -> str:
        """``Title: sentence sentence ...`` (sentences keep their text, lose stray edge spaces)."""
        body = " ".join(sentence.strip() for sentence in self.sentences if sentence.strip())
        return f"{self.title}: {body}" if self.title else body


def join_blocks(blocks: Sequence[str]) -> str:
    """An agent's context: blocks separated by one blank line."""
    return "\n\n".join(block for block in blocks if block)


def parse_paragraphs(value: Any) -> list[Paragraph]:
    """``[[title, [sentence, ...]], ...]`` (the original nested-list layout) into paragraphs."""
    if not isinstance(value, list):
        raise RecordError(
            f"field 'context' should be a list of [title, [sentences]], not {type(value).__name__}"
        )
    paragraphs = []
    for index, item in enumerate(value):
        if (
            not isinstance(item, list | tuple)
            or len(item) != 2
            or not isinstance(item[0], str)
            or not isinstance(item[1], list)
            or not all(isinstance(sentence, str) for sentence in item[1])
        ):
            raise RecordError(f"context[{index}] should be [title, [sentences]]")
        paragraphs.append(Paragraph(item[0], tuple(item[1])))
    return paragraphs


def parse_gold_titles(value: Any, titles: Sequence[str]) -> list[str]:
    """Titles named by ``supporting_facts`` (``[[title, sentence_index], ...]``), in first-mention order.

    A title must name a context paragraph (exactly, else case-insensitively): a gold fact whose paragraph
    is missing would make the question unanswerable for both agents.
    """
    if not isinstance(value, list) or not value:
        raise RecordError("field 'supporting_facts' should be a non-empty list of [title, sentence_index]")
    by_lower = {title.lower(): title for title in titles}
    gold: list[str] = []
    for index, fact in enumerate(value):
        if not isinstance(fact, list | tuple) or len(fact) != 2 or not isinstance(fact[0], str):
            raise RecordError(f"supporting_facts[{index}] should be [title, sentence_index]")
        title = fact[0] if fact[0] in titles else by_lower.get(fact[0].lower())
        if title is None:
            raise RecordError(f"supporting fact title {fact[0]!r} is not among the context titles")
        if title not in gold:
            gold.append(title)
    return gold


def deal_paragraphs(
    paragraphs: Sequence[Paragraph], gold_titles: Sequence[str], rng: random.Random
) -> tuple[str, str]:
    """Split paragraphs between Alice and Bob.

    Paragraphs are deduplicated by title (first occurrence kept). Gold paragraphs, in a seeded order,
    are dealt alternately, so with two or more gold paragraphs each agent holds at least one; each
    distractor goes to one agent by a seeded coin. Each agent's paragraphs keep the file's order, so the
    position of a paragraph says nothing about whether it is gold.
    """
    unique: list[Paragraph] = []
    seen: set[str] = set()
    for paragraph in paragraphs:
        if paragraph.title not in seen:
            seen.add(paragraph.title)
            unique.append(paragraph)
    gold_order = [title for title in gold_titles if title in seen]
    rng.shuffle(gold_order)
    owner: dict[str, int] = {title: turn % 2 for turn, title in enumerate(gold_order)}
    for paragraph in unique:
        if paragraph.title not in owner:
            owner[paragraph.title] = 0 if rng.random() < 0.5 else 1
    hands: tuple[list[str], list[str]] = ([], [])
    for paragraph in unique:
        hands[owner[paragraph.title]].append(paragraph.render())
    return join_blocks(hands[0]), join_blocks(hands[1])


def _string_list(record: Mapping[str, Any], key: str) -> list[str]:
    value = record.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise RecordError(f"field {key!r} should be a list of strings")
    return value


def _unique(values: Sequence[str]) -> list[str]:
    out: list[str] = []
    for value in values:
        value = value.strip()
        if value and value not in out:
            out.append(value)
    return out


def multihop_example(record: Mapping[str, Any], dataset: str, split: str, seed: int) -> Example:
    """A HotpotQA (distractor) or 2WikiMultiHopQA record in the original nested-list layout.

    Aliases, where a copy has them (``answer_aliases``), follow the gold answer.
    """
    example_id = require_id(record, "_id")
    paragraphs = parse_paragraphs(require(record, "context", list))
    gold_titles = parse_gold_titles(record.get("supporting_facts"), [p.title for p in paragraphs])
    alice, bob = deal_paragraphs(paragraphs, gold_titles, example_rng(seed, example_id))
    answers = _unique([require_text(record, "answer"), *_string_list(record, "answer_aliases")])
    return Example(
        id=example_id,
        dataset=dataset,
        split=split,
        question=require_text(record, "question").strip(),
        answers=answers,
        contexts=[alice, bob],
        mode="exchange",
        metric="f1",
    )


def _lead_paragraphs(text: str, budget: int = WIKI_SNIPPET_CHARS) -> str:
    """The first paragraphs of an article, at least one, up to ``budget`` characters."""
    kept: list[str] = []
    size = 0
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if kept and size + len(line) > budget:
            break
        kept.append(line)
        size += len(line)
    return " ".join(kept)


def evidence_file(folder: Path, filename: str, field: str) -> Path:
    """``folder / filename``, checked to stay inside ``folder``: an absolute name, or one whose ``..``
    parts climb out, is a :class:`RecordError` (a record must never make the loader read a file outside
    the dataset's evidence folder; :func:`_read_evidence` checks symlinks when a file is read)."""
    if "\x00" in filename:
        raise RecordError(f"{field} {filename!r} is not a file name (it holds a NUL character)")
    relative = PurePath(filename)
    inside = not relative.is_absolute() and not relative.drive
    if inside and ".." in relative.parts:
        inside = not os.path.normpath(relative).startswith("..")
    if not inside:
        raise RecordError(f"{field} {filename!r} points outside the evidence folder {folder}")
    return folder / relative


def _read_evidence(path: Path, folder: Path, field: str) -> str:
    """The text of an evidence file that must resolve (links followed) to a file inside ``folder``."""
    if not path.resolve().is_relative_to(folder.resolve()):
        raise RecordError(
            f"{field} {str(path.relative_to(folder))!r} links outside the evidence folder {folder}"
        )
    try:
        return read_text(path)
    except DatasetFormatError as exc:
        raise RecordError(f"{field}: evidence file {exc}") from exc


def triviaqa_snippets(record: Mapping[str, Any], evidence_root: Path | None) -> list[str]:
    """Evidence snippets of a TriviaQA rc record.

    Each search result gives ``Title: Description``. Each entity page gives the lead of its article,
    read from ``WikiContext`` (hub copies) or from ``evidence/wikipedia/<Filename>`` when the evidence
    folder of the release sits next to the question file. Duplicates are dropped. A ``Filename`` that
    points outside ``evidence/wikipedia/`` (entity pages) or ``evidence/web/`` (search results) is a
    :class:`RecordError`: it is never read.
    """
    snippets: list[str] = []
    results = record.get("SearchResults") or []
    if not isinstance(results, list):
        raise RecordError("field 'SearchResults' should be a list")
    for index, result in enumerate(results):
        if not isinstance(result, Mapping):
            raise RecordError(f"SearchResults[{index}] should be an object")
        filename = result.get("Filename")
        if evidence_root is not None and isinstance(filename, str) and filename:
            evidence_file(evidence_root / "web", filename, f"SearchResults[{index}].Filename")
        description = str(result.get("Description") or "").strip()
        if description:
            title = str(result.get("Title") or "").strip()
            snippets.append(f"{title}: {description}" if title else description)
    pages = record.get("EntityPages") or []
    if not isinstance(pages, list):
        raise RecordError("field 'EntityPages' should be a list")
    for index, page in enumerate(pages):
        if not isinstance(page, Mapping):
            raise RecordError(f"EntityPages[{index}] should be an object")
        text = page.get("WikiContext")
        filename = page.get("Filename")
        if evidence_root is not None and isinstance(filename, str) and filename:
            folder = evidence_root / "wikipedia"
            field = f"EntityPages[{index}].Filename"
            article = evidence_file(folder, filename, field)
            if not text and article.is_file():
                text = _read_evidence(article, folder, field)
        if isinstance(text, str) and text.strip():
            title = str(page.get("Title") or "").strip()
            lead = _lead_paragraphs(text)
            snippets.append(f"{title}: {lead}" if title else lead)
    return _unique(snippets)


def triviaqa_example(
    record: Mapping[str, Any], split: str, seed: int, evidence_root: Path | None = None
) -> Example | None:
    """A TriviaQA rc record (an element of the file's ``Data`` list); ``None`` if it has no evidence.

    Snippets are shuffled with the example's RNG and dealt alternately, Alice first.
    """
    example_id = require_id(record, "QuestionId")
    answer = require(record, "Answer", Mapping)
    value = require_text(answer, "Value")
    aliases = _string_list(answer, "Aliases") or _string_list(answer, "NormalizedAliases")
    snippets = triviaqa_snippets(record, evidence_root)
    if not snippets:
        return None
    example_rng(seed, example_id).shuffle(snippets)
    return Example(
        id=example_id,
        dataset="triviaqa",
        split=split,
        question=require_text(record, "Question").strip(),
        answers=_unique([value, *aliases]),
        contexts=[join_blocks(snippets[0::2]), join_blocks(snippets[1::2])],
        mode="exchange",
        metric="f1",
    )


@dataclass(frozen=True)
class CbtStory:
    """One CBT question: the numbered story sentences, the cloze query, its answer and candidates."""

    sentences: tuple[str, ...]
    query: str
    answer: str
    candidates: tuple[str, ...]


def _cbt_query(text: str) -> tuple[str, str, tuple[str, ...]]:
    parts = text.split("\t")
    if len(parts) != 4 or parts[2] != "":
        raise RecordError("query line should be 'N question<TAB>answer<TAB><TAB>cand1|cand2|...'")
    query, answer, _, candidates_text = parts
    candidates = tuple(candidate for candidate in candidates_text.strip().split("|") if candidate)
    if "XXXXX" not in query:
        raise RecordError("query has no XXXXX blank")
    if not answer.strip():
        raise RecordError("query has an empty answer")
    if answer not in candidates:
        raise RecordError(f"answer {answer!r} is not among the candidates {list(candidates)}")
    return query.strip(), answer, candidates


def read_cbt(path: Path) -> Iterator[tuple[str, CbtStory]]:
    """``("line N", story)`` for each question of a ``cbtest_*.txt`` file (N: the story's first line).

    Stories are numbered lines ``1 text`` ... ``20 text`` followed by the query line ``21 ...`` and a
    blank line. ``_BOOK_TITLE_`` lines, where a copy has them, are skipped.
    """
    sentences: list[str] = []
    start = 0
    stories = 0
    with open_text(path) as fh:
        for number, raw in enumerate(fh, start=1):
            check_utf8(path, number, raw)
            line = raw.rstrip("\r\n")
            if not line.strip():
                if sentences:
                    raise DatasetFormatError(path, f"line {start}", "story ends without a query line")
                continue
            if line.startswith("_BOOK_TITLE_"):
                continue
            head, _, text = line.partition(" ")
            expected = len(sentences) + 1
            if not head.isdigit() or int(head) != expected:
                problem = f"expected sentence number {expected}, got {head!r}"
                raise DatasetFormatError(path, f"line {number}", problem)
            if expected == 1:
                start = number
            if "\t" not in text:
                sentences.append(text.strip())
                continue
            if not sentences:
                raise DatasetFormatError(path, f"line {number}", "query line without a story")
            try:
                query, answer, candidates = _cbt_query(text)
            except RecordError as exc:
                raise DatasetFormatError(path, f"line {number}", str(exc)) from exc
            stories += 1
            yield f"line {start}", CbtStory(tuple(sentences), query, answer, candidates)
            sentences = []
    if sentences:
        raise DatasetFormatError(path, f"line {start}", "story ends without a query line")
    if not stories:
        raise DatasetFormatError(path, "line 1", "no stories (the file is empty)")


def cbt_example(story: CbtStory, example_id: str, split: str, dataset: str = "cbt") -> Example:
    """First half of the story to Alice (the larger half if odd), second half to Bob; the candidates
    are appended to the question."""
    half = (len(story.sentences) + 1) // 2
    question = f"Which word fills the blank XXXXX? {story.query}\nOptions: {', '.join(story.candidates)}"
    return Example(
        id=example_id,
        dataset=dataset,
        split=split,
        question=question,
        answers=[story.answer],
        contexts=["\n".join(story.sentences[:half]), "\n".join(story.sentences[half:])],
        mode="exchange",
        metric="f1",
    )
