"""Stable seed derivation: the same parts always give the same seed, on any machine and in any order.

Python's ``hash()`` is salted per process, so it must never seed anything that has to be reproducible.
"""

from __future__ import annotations

import hashlib
import json


def derive_seed(*parts: object, bits: int = 31) -> int:
    """A seed from JSON-able parts through SHA-256.

    31 bits by default so that every backend (numpy, torch, vLLM) accepts it as is."""
    digest = hashlib.sha256(json.dumps(list(parts), separators=(",", ":")).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - bits)
