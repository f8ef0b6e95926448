"""Compute accounting: every engine call and training step charges a run-wide ledger.

"Same budget" comparisons (more rollouts vs. more influence estimation) are measured from these counts,
not assumed. FLOPs use the usual dense-transformer estimate: 2·params per token forward (prefill, decode,
scoring) and 6·params per token trained (forward + backward).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

COUNTERS = ("prompt_tokens", "cached_tokens", "generated_tokens", "scored_tokens", "trained_tokens")


@dataclass
class LedgerCounts:
    """Token counts by kind, and the number of engine calls that produced them."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens whose KV was reused from a shared prefix instead of recomputed (no FLOPs)."""
    generated_tokens: int = 0
    scored_tokens: int = 0
    trained_tokens: int = 0
    calls: int = 0

    def __sub__(self, other: LedgerCounts) -> LedgerCounts:
        return LedgerCounts(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    def __add__(self, other: LedgerCounts) -> LedgerCounts:
        return LedgerCounts(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})


@dataclass
class Ledger:
    """Run-wide token and FLOP counts for a model with ``params`` parameters."""

    params: int
    counts: LedgerCounts | None = None

    def __post_init__(self) -> None:
        if self.counts is None:
            self.counts = LedgerCounts()

    def charge(
        self,
        *,
        prompt_tokens: int = 0,
        cached_tokens: int = 0,
        generated_tokens: int = 0,
        scored_tokens: int = 0,
        trained_tokens: int = 0,
    ) -> None:
        """Add one call's tokens. ``scored_tokens`` are forward-only tokens beyond the prompt."""
        c = self.counts
        assert c is not None
        c.prompt_tokens += prompt_tokens
        c.cached_tokens += cached_tokens
        c.generated_tokens += generated_tokens
        c.scored_tokens += scored_tokens
        c.trained_tokens += trained_tokens
        c.calls += 1

    def add(self, counts: LedgerCounts) -> None:
        """Take over counts charged elsewhere (another process's engine, for work done for this run)."""
        assert self.counts is not None
        self.counts = self.counts + counts

    def snapshot(self) -> LedgerCounts:
        assert self.counts is not None
        return LedgerCounts(**asdict(self.counts))

    def flops(self, counts: LedgerCounts | None = None) -> float:
        c = counts or self.counts
        assert c is not None
        forward = c.prompt_tokens - c.cached_tokens + c.generated_tokens + c.scored_tokens
        return 2.0 * self.params * forward + 6.0 * self.params * c.trained_tokens

    def to_dict(self, counts: LedgerCounts | None = None) -> dict[str, float | int]:
        c = counts or self.counts
        assert c is not None
        return {"params": self.params, **asdict(c), "flops": self.flops(c)}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Ledger:
        d = json.loads(Path(path).read_text())
        counts = LedgerCounts(**{k: int(d[k]) for k in (*COUNTERS, "calls")})
        return cls(params=int(d["params"]), counts=counts)
