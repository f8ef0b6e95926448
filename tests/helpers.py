"""Test doubles and fixtures shared by several test modules (each was once private to one of them).

- :class:`ScriptedRollouter` (with :data:`TASKS`, :func:`reward_of`): the MCTS driver's model replaced by a
  policy deterministic in each request's seed and a reward that is a known function of the transcript.
- :class:`SeededEngine` (with :data:`EXAMPLES`): an engine whose utterances depend only on the row seed.
- :func:`many_examples`, :func:`search_config`, :data:`LOW`, :func:`tree_lines`: small
  ``grow_pool`` runs on the seeded engine.
- :data:`INFLUENCE_PROTOCOL`, :func:`hash_metric`: the influence estimators' tiny protocol and metric.
- :data:`DPO_PAIRS` (with :func:`make_pair`, :data:`V_SUM`, :data:`V_KELO`): two short preference pairs.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dits.config import RunConfig, parse_config
from dits.engine.base import Completion, Engine, SamplingParams, ScoredCompletion, View
from dits.ledger import Ledger
from dits.mas.dialogue import Transcript
from dits.mas.protocol import ProtocolConfig
from dits.records import PreferencePair
from dits.search.mcts import RolloutRequest, RolloutResult
from dits.search.pairs import PairConfig
from dits.tasks.example import Example

# -- a scripted MCTS policy ---------------------------------------------------------------------------

# Near-duplicates on purpose: "42." / "42!" (1/25) and "42?" / "42??" (1/29) merge at 0.1, and the answer
# lines differ by one character from each other (filtered at 0.25, not merged).
VOCAB = {
    0: [
        "Alice: I think it is 42.",
        "Alice: I think it is 42!",
        "Alice: no idea, sorry",
        "Alice: the answer is <A>7</A>",
        "Alice: the answer is <A>42</A>",
    ],
    1: [
        "Bob: are you sure about 42?",
        "Bob: are you sure about 42??",
        "Bob: I disagree with that",
        "Bob: the answer is <A>42</A>",
        "Bob: the answer is <A>7</A>",
    ],
}
MAX_TURNS = 6
_ANSWER = re.compile(r"<A>(.*?)</A>")


def _answer(utterance: str) -> str | None:
    m = _ANSWER.search(utterance)
    return m.group(1) if m else None


def ended(conversation: list[str]) -> bool:
    """Stop rule: a parsed answer equal to the previous parsed answer, or MAX_TURNS utterances."""
    last = None
    for i, u in enumerate(conversation):
        a = _answer(u)
        if a is not None:
            if a == last:
                return True
            last = a
        if i + 1 >= MAX_TURNS:
            return True
    return False


def reward_of(conversation: list[str]) -> float:
    """A known function of the texts: share of utterances mentioning 42, +1 if the agreed answer is 42."""
    if not conversation:
        return 0.0
    share = sum("42" in u for u in conversation) / len(conversation)
    final = _answer(conversation[-1])
    return share + (1.0 if final == "42" and ended(conversation) and len(conversation) < MAX_TURNS else 0.0)


class ScriptedRollouter:
    """Deterministic in each request's seed; records every call."""

    def __init__(self) -> None:
        self.calls: list[list[RolloutRequest]] = []

    def __call__(self, requests: list[RolloutRequest]) -> list[RolloutResult]:
        self.calls.append(list(requests))
        return [self.one(r) for r in requests]

    @staticmethod
    def one(req: RolloutRequest) -> RolloutResult:
        rng = np.random.default_rng(req.seed)
        conv = list(req.prefix)
        cont: list[str] = []
        while not ended(conv):
            u = VOCAB[len(conv) % 2][int(rng.integers(len(VOCAB[0])))]
            conv.append(u)
            cont.append(u)
        r = reward_of(conv)
        return RolloutResult(
            continuation=cont,
            reward=r,
            metric=float(r > 1),
            stop_reason="max_turns" if len(conv) >= MAX_TURNS else "agree",
            tokens=sum(len(u.split()) for u in cont),
        )


TASKS = ["task-a", "task-b", "task-c", "task-d"]
"""Task ids for :class:`ScriptedRollouter` searches."""


# -- a seeded engine ----------------------------------------------------------------------------------

UTTERANCES = {
    0: [
        "My notes say Zorvath lives in Melbrook.",
        "<A>Melbrook</A>",
        "I do not know where anyone lives, sorry about that, truly I do not know it at all",
        "Where does Zorvath live? <A>Varn</A>",
    ],
    1: [
        "<A>Melbrook</A>",
        "<A>Varn</A>",
        "My notes do not mention Zorvath.",
        "Bob thinks and thinks and thinks and thinks and thinks and thinks about it",
    ],
}


class SeededEngine(Engine):
    """Picks an utterance by the row seed; reports one more generated token than ``count_tokens`` gives,
    so a prefix rebuilt from text alone would get a different reward than the one it was sampled with."""

    def __init__(self) -> None:
        self.ledger = Ledger(params=1)
        self.calls: list[tuple[list[View], SamplingParams, list[int]]] = []
        self.score_calls = 0
        self._adapter: str | None = None

    def generate(
        self, views: Sequence[View], sampling: SamplingParams, seeds: Sequence[int] | None = None
    ) -> list[list[Completion]]:
        seeds = list(seeds) if seeds is not None else list(range(len(views)))
        self.calls.append((list(views), sampling, seeds))
        out = []
        for view, seed in zip(views, seeds, strict=True):
            speaker = 0 if view[0]["content"].startswith("You are Alice") else 1
            pool = UTTERANCES[speaker]
            words = pool[int(np.random.default_rng(seed).integers(len(pool)))].split()
            cut = len(words) > sampling.max_new_tokens
            words = words[: sampling.max_new_tokens]
            text = " " + " ".join(words)
            n = len(words) + 1
            self.ledger.charge(generated_tokens=n)
            out.append([Completion(text, list(range(n)), 10, n, "length" if cut else "stop", n)])
        return out

    def score(
        self, views: Sequence[View], completions: Sequence[str], prefix: str = ""
    ) -> list[ScoredCompletion]:
        self.score_calls += 1
        return [
            ScoredCompletion(list(range(len(c.split()))), [-0.1 * (len(w) % 7 + 1) for w in c.split()])
            for c in completions
        ]

    def score_alone(self, texts: Sequence[str], prefix: str = "") -> list[ScoredCompletion]:
        return self.score([[] for _ in texts], texts, prefix)

    def load_adapter(self, name: str, path: str) -> None:
        raise NotImplementedError

    def set_adapter(self, name: str | None) -> None:
        self._adapter = name

    @property
    def active_adapter(self) -> str | None:
        return self._adapter

    def count_tokens(self, text: str) -> int:
        return len(text.split())


EXAMPLES = [
    Example(
        id="ex-a",
        dataset="facts",
        split="train",
        question="In which city does Zorvath live?",
        answers=["Melbrook"],
        contexts=["Zorvath lives in Melbrook.", ""],
        mode="exchange",
        metric="f1",
    ),
    Example(
        id="ex-b",
        dataset="facts",
        split="train",
        question="In which city does Kelo live?",
        answers=["Varn"],
        contexts=["", "Kelo lives in Varn."],
        mode="exchange",
        metric="f1",
    ),
]
"""Two facts tasks whose answers :data:`UTTERANCES` can give."""


# -- small grow_pool runs -----------------------------------------------------------------------------


def many_examples(n: int) -> list[Example]:
    """``n`` tasks (``n`` even): copies of :data:`EXAMPLES` under distinct ids."""
    return [ex.model_copy(update={"id": f"{ex.id}-{i}"}) for i in range(n // 2) for ex in EXAMPLES]


def search_config(**search: object) -> RunConfig:
    """A small search (explore 3, expand 2, overridable) of at most 5 turns of 12 tokens, no short
    conversation penalty."""
    return parse_config(
        {
            "search": {"explore": 3, "expand": 2, **search},
            "protocol": {"max_turns": 5, "max_new_tokens": 12},
            "reward": {"min_tokens": 0},
        }
    )


LOW = PairConfig(tau=-10.0, min_gap=0.0)
"""Pair thresholds that let (nearly) every sibling pair through, so small searches mine some pairs."""


def tree_lines(path: Path) -> list[dict]:
    """The lines of a ``trees.jsonl`` as parsed JSON (byte-level layout aside)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- influence ----------------------------------------------------------------------------------------

INFLUENCE_PROTOCOL = ProtocolConfig(max_turns=2, max_new_tokens=12, worked_example=False)
"""Tiny conversations (2 turns of 12 tokens) for the estimators on the embedded model."""


def hash_metric(example: Example, transcript: Transcript) -> float:
    """A metric in [0, 1) that is a hash of the conversation text: the embedded model solves nothing, and a
    metric that varies between samples is what makes the estimators' weights matter."""
    return int(hashlib.sha256("|".join(transcript.texts).encode()).hexdigest()[:8], 16) / 2**32


# -- preference pairs for training --------------------------------------------------------------------

V_SUM = [
    {"role": "system", "content": "You are Alice. Give the answer as <A>answer</A>."},
    {"role": "user", "content": "Problem: What is 2 + 3?"},
]
V_KELO = [
    {"role": "system", "content": "You are Bob. Give the answer as <A>answer</A>."},
    {"role": "user", "content": "Question: Where does Kelo live?\nYour notes:\nKelo lives in Varn."},
]


def make_pair(i: int, view: View, chosen: str, rejected: str) -> PreferencePair:
    """A root-level pair of task ``task{i}`` with ``view`` as its prompt, Q 1 against 0."""
    return PreferencePair(
        tree_task_id=f"task{i}",
        node_id=f"n{i}",
        prefix=[],
        speaker=0,
        chosen=chosen,
        rejected=rejected,
        chosen_id=f"c{i}",
        rejected_id=f"r{i}",
        q_chosen=1.0,
        q_rejected=0.0,
        visits_chosen=1,
        visits_rejected=1,
        prompt=view,
    )


DPO_PAIRS = [
    make_pair(0, V_SUM, "2 + 3 = 5. <A>5</A>", "2 + 3 = 6. <A>6</A>"),
    make_pair(1, V_KELO, "<A>Varn</A>", "I do not know."),
]
"""Two short pairs (arithmetic, a fact) for DPO on the embedded model."""


# -- the protocol's two example tasks and the tiny pipeline config --------------------------------------

FACTS = Example(
    id="f1", dataset="facts", split="test", question="Where does Zorvath live?", answers=["Melbrook"],
    contexts=["Zorvath lives in Melbrook.", "Kiral lives in Doma."], mode="exchange", metric="f1",
)  # fmt: skip
ARITH = Example(
    id="a1", dataset="arith", split="test", question="What is 12 + 7?", answers=["19"],
    contexts=["", ""], mode="debate", metric="numeric",
)  # fmt: skip
"""An information-exchange task and a debate task, each with its answer in hand."""

TINY = {
    "name": "tiny",
    "engine": {"dtype": "float32"},  # the shared engine's
    "task": {"dataset": "facts", "train": 2, "dev": 2, "test": 3, "knobs": {"hops": 1, "n_distractor": 0}},
    "protocol": {"max_turns": 2, "max_new_tokens": 10},
    "search": {"explore": 1, "expand": 2},
    "pairs": {"tau": -10.0, "min_gap": 0.0},
    "influence": {"estimator": "likelihood", "chunk_size": 1, "val_tasks": 2, "samples_per_task": 1},
    "train": {"dpo": {"max_steps": 1, "batch_size": 2}},
    "pipeline": {
        "recipe": "idpo",
        "iterations": 1,
        "methods": ["q", "q-budget", "mix"],
        "baselines": ["cot"],
        "scaling": [2],
    },
}
"""The smallest pipeline config that runs every stage on the embedded model (float32: the shared engine's)."""
