"""Normalised character edit distance, the one measure the search uses to merge and to filter utterances.

Optima normalises the Levenshtein distance by ``max(len(a), len(b)) + 1`` (not by ``max(len)`` as most
libraries do), so two empty strings are at distance 0 rather than undefined, and a one-character string is
never at distance 1 from the empty string. Both the sibling merge and the selection filter compare with a
strict ``<`` against their threshold, as the reference does.
"""

from __future__ import annotations

from rapidfuzz.distance import Levenshtein

__all__ = ["edit_distance", "is_near", "normalized_distance"]


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance over Unicode code points (insert, delete, substitute all cost 1)."""
    return int(Levenshtein.distance(a, b))


def normalized_distance(a: str, b: str) -> float:
    """``Levenshtein(a, b) / (max(len(a), len(b)) + 1)``: in [0, 1), 0 exactly when ``a == b``."""
    return edit_distance(a, b) / (max(len(a), len(b)) + 1)


def is_near(a: str, b: str, threshold: float) -> bool:
    """Whether ``normalized_distance(a, b) < threshold`` (strict, as in the reference implementation)."""
    return normalized_distance(a, b) < threshold
